"""The Transformer: every option builds and runs, padding and caching give the full-recompute answer,
estimates match what the module really holds, checkpointing and compile change nothing."""

import itertools
import math

import pytest
import torch

from lmforge.infer import ContiguousKVCache
from lmforge.model import ModelConfig, Transformer

KERNELS = ["sdpa", "naive", "sliding_window", "block_sparse", "linear"]
POSITIONS = ["sinusoidal", "learned", "relative", "alibi", "rope", "none"]


def tiny(**kw):
    base = dict(vocab_size=61, max_seq_len=48, n_layer=2, d_model=32, n_head=4, init_std=0.2)
    base.update(kw)
    if base.get("attention") == "sliding_window":
        base.setdefault("window", 6)
    return ModelConfig(**base)


def valid_combinations():
    for attention, position in itertools.product(KERNELS, POSITIONS):
        try:
            tiny(attention=attention, position=position)
        except ValueError:
            continue
        yield attention, position


COMBOS = list(valid_combinations())


def test_invalid_combinations_say_what_to_change():
    with pytest.raises(ValueError, match="use attention=sdpa or naive"):
        tiny(attention="linear", position="alibi")
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        tiny(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="needs window"):
        ModelConfig(attention="sliding_window")


@pytest.mark.parametrize("attention,position", COMBOS)
def test_cached_decoding_equals_full_recompute(attention, position):
    torch.manual_seed(0)
    cfg = tiny(attention=attention, position=position, n_kv_head=2)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = ContiguousKVCache(cfg, batch_size=2, max_len=40)
        steps = [model(idx[:, :11], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(11, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kw",
    [dict(qk_norm="head"), dict(qk_norm="full"), dict(qkv_bias=True, bias=False), dict(norm_position="output")],
    ids=["qk_norm_head", "qk_norm_full", "qkv_bias", "output_norm"],
)
def test_qk_norm_and_qkv_bias_options(kw):
    """Qwen3's QK-norm and Qwen2's q/k/v-only biases (HF parity in test_hf_parity.py): parameters counted as built,
    cached decoding = full recompute, and QK-norm makes attention blind to the scale of q and k."""
    torch.manual_seed(0)
    cfg = tiny(position="rope", norm="rmsnorm", ffn="swiglu", n_kv_head=2, init_std=0.2, **kw)
    model = Transformer(cfg).eval()
    assert cfg.param_counts()["total"] == sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = ContiguousKVCache(cfg, batch_size=2, max_len=40)
        steps = [model(idx[:, :11], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(11, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
        for block in model.blocks:  # q and k 3× larger: the same output only where they are normalised
            for w in (block.attn.wq, block.attn.wk):
                w.weight.mul_(3.0)
                if w.bias is not None:
                    w.bias.mul_(3.0)
        scaled = model(idx)
    if cfg.qk_norm:
        torch.testing.assert_close(scaled, full, atol=1e-4, rtol=1e-4)
    else:
        assert (scaled - full).abs().max() > 1e-2


@pytest.mark.parametrize("attention,position", COMBOS)
def test_left_padded_batch_equals_each_row_alone(attention, position):
    torch.manual_seed(1)
    cfg = tiny(attention=attention, position=position)
    model = Transformer(cfg).eval()
    lengths = [25, 17]
    rows = [torch.randint(0, cfg.vocab_size, (n,)) for n in lengths]
    T = max(lengths)
    idx = torch.zeros(2, T, dtype=torch.long)
    valid = torch.zeros(2, T, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, T - len(r) :], valid[i, T - len(r) :] = r, True
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(idx, positions=positions, attn_mask=valid)
        for i, r in enumerate(rows):
            alone = model(r[None])
            torch.testing.assert_close(batched[i, T - len(r) :], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", ["sliding_window", "block_sparse"])
def test_structured_fast_path_equals_masked_path(attention):
    """Training takes the chunked kernel; with explicit positions the model uses one mask: same logits."""
    cfg = tiny(attention=attention, position="rope", max_seq_len=40, sparse_block=5)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 37))
    pos = torch.arange(37).expand(2, 37)
    torch.testing.assert_close(model(idx), model(idx, positions=pos), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(tie_embeddings=False),
        dict(ffn="swiglu", norm="rmsnorm", bias=False, position="rope"),
        dict(ffn="relu", norm_position="post", position="relative"),
        dict(n_kv_head=1, position="sinusoidal", norm="rmsnorm"),
        dict(head_dim=12, n_kv_head=2),
    ],
)
def test_parameter_count_matches_the_module(kw):
    cfg = tiny(**kw)
    model = Transformer(cfg)
    counts = cfg.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # tied head counted once
    emb = model.tok_emb.weight.numel() + (model.add_positions.weight.numel() if cfg.position == "learned" else 0)
    assert counts["non_embedding"] == counts["total"] - emb


def test_swiglu_width_and_flops_formula():
    cfg = ModelConfig(vocab_size=1000, d_model=384, n_layer=6, n_head=6, ffn="swiglu", max_seq_len=256)
    assert cfg.d_ff == 1024  # 8/3·384 = 1024, already a multiple of 64
    assert ModelConfig(d_model=100, n_head=4, ffn="swiglu").d_ff == 320  # 266.7 rounded up to 64
    c = cfg.param_counts()
    n = c["blocks"] + 1000 * 384  # the LM head multiplies even when tied
    assert cfg.flops_per_token(256) == 6 * n + 12 * 6 * 6 * 64 * 256


def test_gpt2_124m_shape_has_the_published_parameter_count():
    cfg = ModelConfig(vocab_size=50257, max_seq_len=1024, n_layer=12, d_model=768, n_head=12, ffn="gelu_tanh")
    assert cfg.param_counts()["total"] == 124_439_808  # HF GPT2LMHeadModel's count


@pytest.mark.parametrize("n_kv_head", [8, 2, 1])
def test_cache_shapes_and_bytes_follow_n_kv_head(n_kv_head):
    cfg = tiny(n_head=8, d_model=64, n_kv_head=n_kv_head)
    cache = ContiguousKVCache(cfg, batch_size=3, max_len=20)
    assert cache.k.shape == (cfg.n_layer, 3, n_kv_head, 20, 8)
    assert cache.nbytes() == 3 * 20 * cfg.kv_bytes_per_token("float32")
    assert cfg.kv_bytes_per_token("bf16") == 2 * cfg.n_layer * n_kv_head * 8 * 2
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model(torch.randint(0, 61, (3, 5)), cache=cache)
    assert cache.length == 5 and cache.k[:, :, :, 5:].abs().sum() == 0 and cache.k[:, :, :, :5].abs().sum() > 0


def test_cache_overflow_is_a_clear_error():
    cfg = tiny()
    cache = ContiguousKVCache(cfg, 1, 8)
    with pytest.raises(ValueError, match="cache full"):
        Transformer(cfg)(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_learned_positions_refuse_too_long_input():
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(tiny())(torch.zeros(1, 49, dtype=torch.long))


def test_return_hidden_feeds_the_head():
    model = Transformer(tiny()).eval()
    idx = torch.randint(0, 61, (2, 9))
    logits, hidden = model(idx, return_hidden=True)
    assert hidden.shape == (2, 9, 32)
    torch.testing.assert_close(model.lm_head(hidden), logits)


def test_logits_at_runs_the_head_only_where_asked_and_gives_the_same_logits_and_gradients():
    torch.manual_seed(0)
    model = Transformer(tiny(position="rope")).train()
    idx = torch.randint(0, 61, (3, 11))
    where = torch.rand(3, 11) < 0.3
    full = model(idx)
    (full[where].square().sum()).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    picked = model(idx, logits_at=where)
    assert picked.shape == (int(where.sum()), 61)
    torch.testing.assert_close(picked, full[where])
    picked.square().sum().backward()
    for got, want in zip([p.grad for p in model.parameters()], expected):
        torch.testing.assert_close(got, want)


def test_gpt2_init_scales_residual_projections():
    cfg = ModelConfig(vocab_size=100, d_model=256, n_layer=8, n_head=4)
    model = Transformer(cfg)
    assert math.isclose(model.blocks[0].attn.wo.weight.std().item(), 0.02 / math.sqrt(16), rel_tol=0.05)
    assert math.isclose(model.blocks[0].ffn.down.weight.std().item(), 0.02 / math.sqrt(16), rel_tol=0.05)
    assert math.isclose(model.blocks[0].attn.wq.weight.std().item(), 0.02, rel_tol=0.05)
    assert model.blocks[0].attn.wq.bias.abs().sum() == 0 and torch.all(model.blocks[0].norm1.weight == 1)
    assert model.lm_head.weight is model.tok_emb.weight


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    cfg = tiny(position="rope", ffn="swiglu")
    a, b = Transformer(cfg), Transformer(cfg)
    b.load_state_dict(a.state_dict())
    for block in b.blocks:  # the flag the trainer sets from TrainConfig.activation_checkpointing
        block.checkpoint = True
    idx = torch.randint(0, 61, (2, 20))
    saved = []
    for m in (a, b):
        m.train()
        count = [0]

        def pack(t, count=count):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(idx).logsumexp(-1).mean()
        saved.append(count[0])
        loss.backward()
    assert saved[1] < saved[0]  # the flag took effect: the blocks kept their inputs, not their activations
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_dropout_is_active_in_training_only():
    model = Transformer(tiny(dropout=0.5))
    idx = torch.randint(0, 61, (1, 10))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


@pytest.mark.parametrize("kw", [dict(position="rope", ffn="swiglu", norm="rmsnorm", n_kv_head=2)])
def test_compile_fullgraph(kw):
    _check_compile(kw)


def _check_compile(kw):
    torch._dynamo.reset()
    cfg = tiny(**kw)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw",
    [dict(attention=a, position=p) for a, p in COMBOS]
    + [dict(rope_scaling=s, position="rope", rope_factor=2.0) for s in ("linear", "dynamic", "llama3")]
    + [dict(ffn=f) for f in ("relu", "gelu", "gelu_tanh")]
    + [dict(norm_position="post", norm="rmsnorm", dropout=0.1)],
)
def test_compile_fullgraph_every_option(kw):
    _check_compile(kw)


def test_saved_config_rederives_head_dim_after_an_override(tmp_path):
    from lmforge.config import load_config, save_config

    save_config(ModelConfig(d_model=256, n_head=4), tmp_path / "m.yaml")
    wider = load_config(ModelConfig, tmp_path / "m.yaml", ["d_model=512"])
    assert (wider.head_dim, wider.d_ff) == (128, 2048)
    assert load_config(ModelConfig, tmp_path / "m.yaml") == ModelConfig(d_model=256, n_head=4)
