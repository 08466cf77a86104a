"""lmforge.scaling.estimate: 6·N·D against Chinchilla's Table 3, the compute-optimal size of a budget, time and
cost, training memory arithmetic on a tiny config, serving memory (weights as lmforge.infer.quantize stores them,
KV cache as its KVStore stores it) and the 128K-context KV worked example. Arithmetic only, no training."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from lmforge.config import UserError
from lmforge.model import ModelConfig
from lmforge.scaling import estimate as est

GiB = 2**30

# Hoffmann et al. 2022, Table 3: parameters, FLOPs, tokens of the compute-optimal models (Approach 1).
TABLE3 = [
    (4.0e8, 1.92e19, 8.0e9),
    (1.0e9, 1.21e20, 20.2e9),
    (1.0e10, 1.23e22, 205.1e9),
    (6.7e10, 5.76e23, 1.5e12),  # the Gopher budget; tokens rounded to 1.5T, so 6ND is 4.7% above
    (1.75e11, 3.85e24, 3.7e12),
    (2.8e11, 9.90e24, 5.9e12),
    (5.2e11, 3.43e25, 11.0e12),
    (1.0e12, 1.27e26, 21.2e12),
    (1.0e13, 1.30e28, 216.2e12),
]
SHARED_TABLE3 = Path(__file__).resolve().parents[3] / "shared" / "data" / "chinchilla_table3.csv"


@pytest.mark.parametrize("n, c, d", TABLE3)
def test_6nd_reproduces_chinchilla_table3(n, c, d):
    tolerance = 0.05 if n == 6.7e10 else 0.01
    assert est.flops_6nd(n, d) == pytest.approx(c, rel=tolerance)


def test_6nd_matches_the_shared_table3_csv():
    if not SHARED_TABLE3.is_file():
        pytest.skip(f"{SHARED_TABLE3} not present (reference data outside the repository)")
    with open(SHARED_TABLE3, newline="") as f:
        rows = [(float(r["parameters"]), float(r["flops"]), float(r["tokens"])) for r in csv.DictReader(f)]
    assert rows == TABLE3
    for n, c, d in rows:
        assert est.flops_6nd(n, d) == pytest.approx(c, rel=0.05 if n == 6.7e10 else 0.01)


def test_a_1e20_budget_buys_0_91b_parameters_and_18_3b_tokens():
    n, d = est.compute_optimal(1e20)
    assert n == pytest.approx(0.913e9, rel=1e-3) and d == pytest.approx(18.26e9, rel=1e-3)
    assert est.flops_6nd(n, d) == pytest.approx(1e20)
    # 13B parameters on 260B tokens is 20 tokens/parameter too, but for ~200× the budget
    assert est.flops_6nd(13e9, 260e9) == pytest.approx(2.03e22, rel=1e-3)
    n40, d40 = est.compute_optimal(1e20, tokens_per_param=40)
    assert d40 / n40 == pytest.approx(40) and n40 == pytest.approx(n / math.sqrt(2))


def test_training_flops_uses_the_config_count():
    cfg = ModelConfig(vocab_size=256, max_seq_len=64, n_layer=2, d_model=64, n_head=4)
    assert est.training_flops(cfg, 1000) == pytest.approx(1000 * cfg.flops_per_token(64))
    with pytest.raises(ValueError, match="tokens"):
        est.training_flops(cfg, 0)


def test_time_and_cost_by_hand():
    h100 = est.accelerator("h100")
    assert h100.name == "H100 SXM" and h100.peak_flops == 989e12 and h100.memory_bytes == 80 * GiB
    t = est.training_time(1e21, h100, mfu=0.5, n_accelerators=8, price_per_hour=2.0)
    hours = 1e21 / (989e12 * 0.5 * 3600)  # 561.7 GPU-hours
    assert t.accelerator_hours == pytest.approx(hours) and t.wall_hours == pytest.approx(hours / 8)
    assert t.cost == pytest.approx(2.0 * hours)
    assert est.training_time(1e21, h100).cost is None
    with pytest.raises(ValueError, match="fraction"):
        est.training_time(1e21, h100, mfu=40)


@pytest.mark.parametrize(
    "name, label, tflops, gib",
    [("A100", "A100", 312, 80), ("a100-40gb", "A100 40GB", 312, 40), ("H100 PCIe", "H100 PCIe", 756, 80),
     ("h200", "H200", 989, 141), ("tpu-v4", "TPU v4", 275, 32)],
)  # fmt: skip
def test_accelerator_table_and_overrides(name, label, tflops, gib):
    acc = est.accelerator(name)
    assert (acc.name, acc.peak_flops, acc.memory_bytes) == (label, tflops * 1e12, gib * GiB)
    mine = est.accelerator(name, peak_tflops=100, memory_gib=16)
    assert (mine.peak_flops, mine.memory_bytes) == (100e12, 16 * GiB)


def test_unknown_accelerator_or_dtype_is_a_clear_error():
    with pytest.raises(UserError, match="unknown accelerator 'v100'"):
        est.accelerator("v100")
    assert est.accelerator("v100", peak_tflops=125, memory_gib=32).peak_flops == 125e12
    with pytest.raises(UserError, match="no datasheet fp32 peak"):
        est.accelerator("tpu v4", dtype="fp32")


# ---- training memory ---------------------------------------------------------------------------------------

TINY = dict(vocab_size=64, max_seq_len=8, n_layer=1, d_model=8, n_head=2, position="learned", ffn="gelu",
            norm="layernorm", bias=True)  # fmt: skip


def test_layer_activations_of_a_tiny_gpt_by_hand():
    per = est.layer_activations(ModelConfig(**TINY), seq_len=8, precision="fp32")
    # bytes per token, d = 8, d_ff = 32, 2 heads, fp32: block input + x+attn (2·4d), LN mean and rstd (2·8),
    # the two LN outputs the linears save (4d each), q k v and the attention output (4·4d) + log-sum-exp (4·2),
    # GELU's input and output (2·4·d_ff)
    assert per == {"residual": 64, "norms": 16, "attention inputs": 32, "ffn inputs": 32,
                   "q k v, output": 136, "ffn hidden": 256}  # fmt: skip
    mixed = est.layer_activations(ModelConfig(**TINY), seq_len=8, precision="bf16")
    # autocast: a 16-bit cast of the LN output per linear (q, k, v: 3; up: 1); matmul outputs in 2 bytes
    assert mixed["attention inputs"] == 3 * 2 * 8 and mixed["ffn inputs"] == 2 * 8
    assert mixed["q k v, output"] == 2 * 32 + 8 and mixed["ffn hidden"] == 2 * 2 * 32
    dropped = est.layer_activations(ModelConfig(**TINY, dropout=0.1), seq_len=8)
    assert dropped["dropout masks"] == 2 * 8  # one bool per element on CUDA
    naive = est.layer_activations(ModelConfig(**TINY, attention="naive"), seq_len=8, precision="fp32")
    assert naive["scores"] == 2 * 8 * 4  # fp32 softmax output, heads × keys per query


def test_training_memory_of_a_tiny_gpt_by_hand():
    cfg = ModelConfig(**TINY)
    n = cfg.param_counts()["total"]
    m = est.training_memory(cfg, micro_batch=2, seq_len=8, precision="fp32")
    tokens = 16
    block = 536 * tokens  # the per-token sum above
    head = (4 * 8 + (4 * 8 + 8) + 4 * 64) * tokens  # head input, last hidden state + LN stats, log-softmax
    saved = 16 * tokens + head + block  # + token ids and targets
    assert (m.weights, m.optimizer, m.gradients) == (4 * n, 8 * n, 0)
    assert m.per_layer == block and m.activations == saved
    assert m.phase == "loss backward" and m.temporary == 2 * 4 * 64 * tokens  # two fp32 b·s·V gradients
    assert m.total == 12 * n + saved + 2 * 4 * 64 * tokens

    ck = est.training_memory(cfg, micro_batch=2, seq_len=8, precision="fp32", checkpointing=True)
    # the loss backward now holds only the block input; the block's own backward (recomputed) is the peak:
    # its activations + the output gradient, GELU's gradients and the down-projection's weight gradient
    transient = (4 * 8 + 4 * 32) * tokens + 4 * 8 * 32
    assert ck.phase == "backward, block 0"
    assert ck.activations == 16 * tokens + block and ck.temporary == transient
    assert ck.gradients == 4 * 64 * 8  # the tied head/embedding gradient
    assert ck.total == 12 * n + 16 * tokens + block + transient + 4 * 64 * 8


def test_mixed_precision_sharding_and_accumulation():
    cfg = ModelConfig(vocab_size=512, max_seq_len=64, n_layer=4, d_model=64, n_head=4)
    n = cfg.param_counts()["total"]
    fp32 = est.training_memory(cfg, micro_batch=4, precision="fp32")
    bf16 = est.training_memory(cfg, micro_batch=4, precision="bf16")
    assert bf16.weights + bf16.optimizer == fp32.weights + fp32.optimizer == 12 * n  # fp32 master weights + Adam
    casts = 2 * (4 * 64 * 64 + 2 * 64 * 256)  # each block's 16-bit weights, saved for backward
    assert bf16.detail["weight_casts_per_layer"] == casts
    fsdp = est.training_memory(cfg, micro_batch=4, ranks=8, sharding="fsdp")
    assert fsdp.optimizer == pytest.approx(8 * n / 8)
    ddp = est.training_memory(cfg, micro_batch=4, ranks=8)
    assert ddp.optimizer == 8 * n and ddp.detail["ddp_buckets"] == 4 * n
    acc = est.training_memory(cfg, micro_batch=4, grad_accumulation=4)
    assert acc.gradients == 4 * n  # the earlier micro-batches' gradients stay through the later ones
    with pytest.raises(ValueError, match="sharding"):
        est.training_memory(cfg, micro_batch=1, sharding="zero9")


def test_korthikanti_formula():
    s, b, h, a, layers = 2048, 1, 12288, 96, 96  # GPT-3 175B
    sbh = s * b * h
    assert est.korthikanti_activation_bytes(s, b, h, a, layers) == layers * sbh * (34 + 5 * a * s / h)
    assert est.korthikanti_activation_bytes(s, b, h, a, layers, "selective") == layers * 34 * sbh
    assert est.korthikanti_activation_bytes(s, b, h, a, layers, "full") == layers * 2 * sbh


# ---- serving ------------------------------------------------------------------------------------------------

LLAMA_7B = dict(vocab_size=32000, max_seq_len=4096, n_layer=32, d_model=4096, n_head=32, position="rope",
                ffn="swiglu", norm="rmsnorm", bias=False, tie_embeddings=False, d_ff=11008)  # fmt: skip


def test_kv_cache_mha_gqa_mqa_and_int8_by_hand():
    mha = ModelConfig(**LLAMA_7B)
    gqa = ModelConfig(**LLAMA_7B, n_kv_head=8)
    mqa = ModelConfig(**LLAMA_7B, n_kv_head=1)
    assert est.kv_bytes_per_token(mha, "bf16") == 2 * 32 * 32 * 128 * 2 == 512 * 1024  # 0.5 MiB a token
    assert est.kv_bytes_per_token(gqa, "bf16") / est.kv_bytes_per_token(mha, "bf16") == 8 / 32
    assert est.kv_bytes_per_token(mqa, "bf16") / est.kv_bytes_per_token(mha, "bf16") == 1 / 32
    # int8: a byte per value + one scale per token and head for K and for V, in the model's dtype
    assert est.kv_bytes_per_token(gqa, "int8", "bf16") == 2 * 32 * 8 * (128 + 2)
    assert est.kv_bytes_per_token(gqa, "fp32", "fp32") == gqa.kv_bytes_per_token("float32")
    assert est.kv_cache_bytes(gqa, 4096, 8, "bf16") == 4096 * 8 * 2 * 32 * 8 * 128 * 2


def test_int8_kv_bytes_match_lmforge_kvstore():
    import torch

    from lmforge.infer.kv_cache import KVStore

    cfg = ModelConfig(vocab_size=64, n_layer=2, d_model=64, n_head=4, n_kv_head=2)
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for kv in ("int8", "bf16", "fp32"):
            store = KVStore(cfg, 1, 4, dtype=dtype, kv_dtype=kv)
            assert est.kv_bytes_per_token(cfg, kv, name) == store.bytes_per_slot()


@pytest.mark.parametrize("scheme", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_match_quantization_report(scheme, tied):
    from lmforge.infer.quantize import quantization_report, quantize_model
    from lmforge.model import Transformer

    cfg = ModelConfig(vocab_size=100, max_seq_len=16, n_layer=2, d_model=96, n_head=4, n_kv_head=2,
                      tie_embeddings=tied, bias=tied, ffn="swiglu" if tied else "gelu")  # fmt: skip
    model = quantize_model(Transformer(cfg), scheme, group_size=64)
    assert est.weight_bytes(cfg, "fp32", scheme, 64) == quantization_report(cfg, model)["model_bytes"]
    assert est.weight_bytes(cfg, "fp32") == cfg.weight_bytes("float32")


def test_largest_batch_and_context_that_fit_by_hand():
    cfg = ModelConfig(**LLAMA_7B, n_kv_head=8)
    weights = cfg.param_counts()["total"] * 2
    per_token = 2 * 32 * 8 * 128 * 2  # 128 KiB
    s = est.serving_memory(cfg, 80 * GiB, context=4096, batch=4, reserve=0.1)
    free = 0.9 * 80 * GiB - weights
    assert s.weights == weights and s.kv_per_token == per_token and s.kv_cache == 4 * 4096 * per_token
    assert s.max_batch == int(free // (4096 * per_token)) and s.max_context == int(free // (4 * per_token))
    assert s.fits
    small = est.serving_memory(cfg, 12 * GiB, context=4096)  # 11.9 GB of bf16 weights: no room left
    assert not small.fits and small.max_batch == 0
    int4 = est.serving_memory(cfg, 12 * GiB, context=4096, quantize="int4")
    assert int4.fits and int4.max_batch > 0
    split = est.serving_memory(cfg, 80 * GiB, context=4096, shards=2)
    assert split.weights == weights / 2


def test_128k_worked_example_counts_elements_not_bytes():
    ex = est.kv_worked_example()  # 128K context × kv_dim 1024 × 40 layers × 2 (K and V)
    assert ex.elements == 128 * 1024 * 1024 * 40 * 2 == 10_737_418_240
    assert ex.bytes["int8"] == ex.elements  # reading the product as bytes assumes 1 byte per element
    assert ex.bytes["bf16"] == 20 * GiB and ex.bytes["bf16"] == pytest.approx(21.47e9, rel=1e-3)
    assert ex.bytes["fp32"] == 40 * GiB
    text = "\n".join(ex.lines())
    assert "elements" in text and "1 byte per element" in text and "21.5 GB (20.0 GiB)" in text
    # the same figure from a model with 40 layers and 8 KV heads × 128 (kv_dim 1024), per sequence
    cfg = ModelConfig(vocab_size=32000, max_seq_len=131072, n_layer=40, d_model=5120, n_head=40, n_kv_head=8)
    assert est.kv_cache_bytes(cfg, 128 * 1024, 1, "bf16") == ex.bytes["bf16"]
    assert est.kv_cache_bytes(cfg, 128 * 1024, 4, "bf16") == 4 * ex.bytes["bf16"]  # a batch multiplies it
    assert est.kv_worked_example(batch=4).bytes["bf16"] == 80 * GiB
