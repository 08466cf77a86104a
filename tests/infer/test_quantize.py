"""Weight quantization: each scheme's rounding stays within half a step of a brute-force recompute, int4 packs
losslessly, layers and whole models stay close to fp32, w8a8 matches a hand-written per-token reference, a tied
head is untied, bytes shrink as promised, and a saved model loads back to bit-identical logits."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge.config import UserError
from lmforge.infer.generate import generate
from lmforge.infer.quantize import (
    SCHEMES,
    QuantizedLinear,
    dequantize_int4,
    load_quantized,
    pack_int4,
    quantization_report,
    quantize_int4,
    quantize_int8,
    quantize_model,
    save_quantized,
    unpack_int4,
)
from lmforge.model import ModelConfig, Transformer

needs_fbgemm = pytest.mark.skipif(
    torch.backends.quantized.engine not in ("fbgemm", "x86"), reason="w8a8 needs the fbgemm/x86 quantized engine"
)
ALL = ["int8", pytest.param("w8a8", marks=needs_fbgemm), "int4", "bf16"]
# Relative error (Frobenius) of a layer's output / the model's logits against fp32: int8 and bf16 ~0.5-1%,
# w8a8 adds 7-bit activations, int4 ~ a 16-level grid per group.
LAYER_TOL = {"int8": 0.02, "w8a8": 0.04, "int4": 0.2, "bf16": 0.01}
LOGIT_TOL = {"int8": 0.03, "w8a8": 0.06, "int4": 0.25, "bf16": 0.02}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/infer/conftest.py


def tiny(**kw):
    base = dict(vocab_size=256, max_seq_len=64, n_layer=2, d_model=128, n_head=4)
    return ModelConfig(**{**base, **kw})


def model_and_ids(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(tiny(**kw)).eval(), torch.randint(0, 256, (2, 32))


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- one weight matrix ------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ALL)
def test_schemes_are_the_one_list_and_store_its_bytes_per_weight(scheme):
    # lmforge.hardware holds the scheme names (the CLI's --quantize choices, the planner's bytes per weight);
    # SCHEMES is keyed by them, and each class stores what the planner counts.
    from lmforge.hardware import QUANT_SCHEMES, quant_bytes_per_weight
    from lmforge.scaling.estimate import quantized_linear_bytes

    assert tuple(SCHEMES) == QUANT_SCHEMES and SCHEMES[scheme].scheme == scheme
    layer = SCHEMES[scheme].from_linear(nn.Linear(1024, 256, bias=True), group_size=64)
    stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert stored == quantized_linear_bytes(1024, 256, True, scheme, 64)
    weights = stored - 4 * 256  # less the fp32 bias
    assert weights / (1024 * 256) == pytest.approx(quant_bytes_per_weight(scheme, 64), rel=0.005)


def test_int8_rounding_is_within_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.05
    w[5] = 0  # an all-zero row
    w[7, 3] = 2.0  # an outlier: only its own row's step grows
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    for r in range(w.shape[0]):
        step = w[r].abs().max().item() / 127 or 1.0
        assert scale[r].item() == pytest.approx(step, rel=1e-6)
        assert torch.equal(q[r], torch.round(w[r] / scale[r]).to(torch.int8))
        assert (q[r].float() * scale[r] - w[r]).abs().max() <= step / 2 * (1 + 1e-5)


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_rounding_is_within_half_a_step_per_group(group_size):
    torch.manual_seed(0)
    w = torch.randn(24, 200)  # 200 is not a multiple of the group: the last group is padded
    packed, scale, zero = quantize_int4(w, group_size)
    n_groups = -(-200 // group_size)
    assert packed.shape == (24, n_groups * group_size // 2) and packed.dtype == torch.uint8
    assert scale.shape == zero.shape == (24, n_groups) and zero.max() <= 15
    deq = dequantize_int4(packed, scale, zero, 200)
    assert deq.shape == w.shape
    for r in range(w.shape[0]):
        for start in range(0, 200, group_size):
            chunk = w[r, start : start + group_size]
            lo, hi = min(chunk.min().item(), 0.0), max(chunk.max().item(), 0.0)
            step = (hi - lo) / 15
            assert scale[r, start // group_size].item() == pytest.approx(step, rel=1e-6)
            assert (deq[r, start : start + group_size] - chunk).abs().max() <= step / 2 * (1 + 1e-5)


def test_int4_pack_unpack_round_trip_is_exact():
    assert pack_int4(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)).tolist() == [[0x31, 0x42]]  # halves
    q = torch.randint(0, 16, (5, 7, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 7, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)


# ---- one layer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ALL)
def test_quantized_layer_is_close_to_fp32(scheme):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(2, 3, 96)
    module = SCHEMES[scheme].from_linear(linear, group_size=64)
    with torch.no_grad():
        y, y_fp32 = module(x), linear(x)
        assert y.shape == y_fp32.shape and y.dtype == torch.float32
        assert rel_error(y, y_fp32) < LAYER_TOL[scheme]
        assert module.bias.dtype == torch.float32 and torch.equal(module.bias, linear.bias)
        assert rel_error(module.dequantize(), linear.weight) < LAYER_TOL[scheme]
        if scheme in ("int8", "int4"):  # weight-only: exactly a matmul with the dequantized weight
            torch.testing.assert_close(y, F.linear(x, module.dequantize(), linear.bias), rtol=1e-5, atol=1e-6)


def w8a8_reference(x, q, w_scale, bias, per_token=True):
    """Quantize activations by hand, multiply integers exactly, rescale. Each token is divided by its absmax
    (per_token), then one asymmetric 7-bit grid covers the tensor: fbgemm's reduce_range, with the zero point
    nudged as PyTorch's ChooseQuantizationParams does it."""
    a = x.abs().amax(-1, keepdim=True) if per_token else torch.ones(x.shape[0], 1)
    xn = x / a
    lo, hi = min(xn.min().item(), 0.0), max(xn.max().item(), 0.0)
    scale = (hi - lo) / 127
    zero = -lo / scale if -abs(lo / scale) < 127 - abs(hi / scale) else 127 - hi / scale
    zero = min(max(round(zero), 0), 127)
    xq = (torch.round(xn * (1.0 / torch.tensor(scale, dtype=torch.float32))) + zero).clamp(0, 255)
    acc = (xq - zero).double() @ q.double().T  # exact integer sums
    return (acc * scale * w_scale.double() * a.double()).float() + bias


@needs_fbgemm
def test_w8a8_matches_a_per_token_reference():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(6, 96)
    x[3] *= 50  # an outlier token
    module = SCHEMES["w8a8"].from_linear(linear)
    q, w_scale = module.int8_weight()
    q_ref, scale_ref = quantize_int8(linear.weight)  # the same grid as weight-only int8
    assert torch.equal(q, q_ref) and torch.equal(w_scale, scale_ref)
    with torch.no_grad():
        y, y_fp32 = module(x), linear(x)
    ref = w8a8_reference(x, q, w_scale, linear.bias.detach())
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    for i in range(x.shape[0]):  # one token at a time (decode steps): fbgemm's own grid is per token
        with torch.no_grad():
            y_i = module(x[i : i + 1])
        ref_i = w8a8_reference(x[i : i + 1], q, w_scale, linear.bias.detach(), per_token=False)
        torch.testing.assert_close(y_i, ref_i, rtol=1e-4, atol=1e-4 * ref_i.abs().max().item())
    # Per-token scales: the outlier does not coarsen the other tokens, as one per-tensor grid would.
    normal = [0, 1, 2, 4, 5]
    per_tensor = w8a8_reference(x, q, w_scale, linear.bias.detach(), per_token=False)
    assert rel_error(y[normal], y_fp32[normal]) * 5 < rel_error(per_tensor[normal], y_fp32[normal])


# ---- whole models -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ALL)
def test_model_logits_and_greedy_tokens_stay_close(scheme):
    model, ids = model_and_ids()
    quantized = quantize_model(copy.deepcopy(model), scheme)
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    with torch.no_grad():
        logits, logits_fp32 = quantized(ids), model(ids)
    assert rel_error(logits, logits_fp32) < LOGIT_TOL[scheme]
    agree = (logits.argmax(-1) == logits_fp32.argmax(-1)).float().mean().item()
    assert agree >= (0.85 if scheme == "int4" else 0.95)
    # Greedy decoding through the KV cache runs the quantized layers one token at a time.
    prompt = ids[0, :8].tolist()
    tokens = generate(quantized, prompt, max_new_tokens=8, temperature=0)
    tokens_fp32 = generate(model, prompt, max_new_tokens=8, temperature=0)
    assert len(tokens) == 8 and (scheme == "int4" or tokens[0] == tokens_fp32[0])


@pytest.mark.parametrize("scheme", ALL)
def test_tied_head_becomes_an_untied_quantized_copy(scheme):
    model, ids = model_and_ids()
    assert model.lm_head.weight is model.tok_emb.weight
    embedding = model.tok_emb.weight.detach().clone()
    quantize_model(model, scheme)
    assert model.tok_emb.weight.dtype == torch.float32 and torch.equal(model.tok_emb.weight, embedding)
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.scheme == scheme
    emb_ptr = model.tok_emb.weight.data_ptr()
    assert all(t.data_ptr() != emb_ptr for t in model.lm_head.state_dict().values())
    assert rel_error(model.lm_head.dequantize(), embedding) < LAYER_TOL[scheme]
    assert model.quantization == {"scheme": scheme, "group_size": 64 if scheme == "int4" else None,
                                  "include_lm_head": True}  # fmt: skip


@pytest.mark.parametrize("scheme, goal", [("int8", 0.27), pytest.param("w8a8", 0.27, marks=needs_fbgemm),
                                          ("int4", 0.16), ("bf16", 0.51)])  # fmt: skip
def test_quantized_bytes_meet_the_goals(scheme, goal):
    model, _ = model_and_ids()  # d_model 128, d_ff 512: whole int4 groups of 64
    quantized = quantize_model(copy.deepcopy(model), scheme)
    report = quantization_report(model, quantized)
    assert report["layers"] == 2 * 6 + 1 and report["ratio"] <= goal
    assert report["model_fp32_bytes"] == model.cfg.weight_bytes("float32")
    assert quantization_report(model.cfg, quantized) == report
    assert report["model_bytes"] < report["model_fp32_bytes"]


@pytest.mark.parametrize("scheme", ALL)
def test_save_load_gives_bit_identical_logits(scheme, tmp_path):
    model, ids = model_and_ids(ffn="swiglu", position="rope", bias=False, tie_embeddings=False)
    quantize_model(model, scheme, group_size=32)
    path = save_quantized(model, tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["scheme"] == scheme and json.loads(meta["group_size"]) == (32 if scheme == "int4" else None)
    assert json.loads(meta["model_config"])["ffn"] == "swiglu"
    loaded = load_quantized(path)
    assert loaded.quantization == model.quantization and not loaded.training
    assert type(loaded.blocks[1].ffn.gate) is type(model.blocks[1].ffn.gate)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_head_left_tied_round_trips(tmp_path):
    model, ids = model_and_ids()
    quantize_model(model, "int8", include_lm_head=False)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.tok_emb.weight
    loaded = load_quantized(save_quantized(model, tmp_path / "model.safetensors"))
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_bad_inputs_say_what_to_do(tmp_path):
    model, _ = model_and_ids()
    with pytest.raises(UserError, match="use one of int8, w8a8, int4, bf16") as info:
        quantize_model(model, "int3")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="even"):
        quantize_model(model, "int4", group_size=33)
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match="already quantized") as misuse:  # only a program can do these: not a user's
        quantize_model(model, "int8")
    assert not isinstance(misuse.value, UserError)
    fresh, _ = model_and_ids()
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(fresh, tmp_path / "fp32.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(UserError, match="is not a quantized lmforge model.*give a file written by save_quantized"):
        load_quantized(plain)
