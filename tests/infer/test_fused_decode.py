"""The fused decode step (every layer of a batch-1 one-token step in one C call, lmforge.infer.fastpath.FusedDecode)
against the plain model: a full recompute without a cache is the oracle, for each architecture it accepts, for
bf16 and int8 weights, after a layer is replaced, and where it must step aside."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from lmforge.align.lora import LoRAConfig, apply_lora
from lmforge.infer import kernels
from lmforge.infer.fastpath import FusedBlocks, FusedDecode, optimize_for_decode
from lmforge.infer.kv_cache import ContiguousKVCache
from lmforge.infer.quantize import quantize_model
from lmforge.model import ModelConfig, Transformer

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no AVX2 CPU or no C compiler")

ARCHITECTURES = {
    "gpt2 (learned, layernorm, exact gelu)": {},
    "tanh gelu": {"ffn": "gelu_tanh"},
    "relu, no biases": {"ffn": "relu", "bias": False},
    "llama (rope, rmsnorm, swiglu, gqa)": dict(position="rope", norm="rmsnorm", ffn="swiglu", bias=False, n_kv_head=2),
    "mqa, sinusoidal": {"position": "sinusoidal", "n_kv_head": 1},
    "no positions, head_dim 32": {"position": "none", "n_head": 2},
    "qwen2 (biases on q, k, v only)": dict(position="rope", norm="rmsnorm", ffn="swiglu", bias=False, qkv_bias=True),
}


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    settings = {"vocab_size": 96, "max_seq_len": 64, "n_layer": 2, "d_model": 64, "n_head": 4, "init_std": 0.3}
    cfg = ModelConfig(**{**settings, **overrides})
    model = Transformer(cfg).eval()
    with torch.no_grad():  # nonzero biases and norm gains, so each of them is checked
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def spy(monkeypatch) -> list:
    """Record what every FusedDecode call returned (a tensor, or None when it left the step to the blocks)."""
    results, call = [], FusedDecode.__call__
    monkeypatch.setattr(FusedDecode, "__call__", lambda *a: results.append(call(*a)) or results[-1])
    return results


def ran_fused(results: list) -> int:
    return sum(r is not None for r in results)


def decode_logits(model: Transformer, idx: torch.Tensor, prompt: int = 6, batch: int = 1) -> torch.Tensor:
    """Logits of positions prompt.. of idx [1, T]: a prefill, then one-token steps through a contiguous cache."""
    cache = ContiguousKVCache(model.cfg, batch, idx.shape[1])
    idx = idx.expand(batch, -1)
    with torch.no_grad():
        model(idx[:, :prompt], cache=cache)
        return torch.cat([model(idx[:, t : t + 1], cache=cache) for t in range(prompt, idx.shape[1])], 1)


@pytest.mark.parametrize("overrides", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_fused_steps_equal_a_full_recompute(monkeypatch, overrides):
    model = make_model(**overrides)
    fast = optimize_for_decode(copy.deepcopy(model))
    idx = torch.randint(0, 96, (1, 20))
    results = spy(monkeypatch)
    with torch.no_grad():
        full = model(idx)[:, 6:]
    torch.testing.assert_close(decode_logits(fast, idx), full, rtol=1e-4, atol=1e-4)
    assert ran_fused(results) == 15  # the 6-token prefill and every one-token step


@pytest.mark.parametrize("scheme", ["bf16", "int8"])
def test_fused_steps_with_quantized_weights_equal_the_same_model_layer_by_layer(monkeypatch, scheme):
    quantized = quantize_model(make_model(position="rope", norm="rmsnorm", ffn="swiglu"), scheme)
    fast = optimize_for_decode(copy.deepcopy(quantized))
    idx = torch.randint(0, 96, (1, 16))
    results = spy(monkeypatch)
    got = decode_logits(fast, idx)
    assert ran_fused(results) == 11
    torch.testing.assert_close(got, decode_logits(quantized, idx), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", [{}, ARCHITECTURES["llama (rope, rmsnorm, swiglu, gqa)"]], ids=["gpt2", "llama"])
def test_chunks_of_new_tokens_attend_causally_among_themselves(monkeypatch, overrides):
    """A speculative verification feeds γ + 1 tokens at once: each sees the cache and the new tokens up to itself.
    Chunks of up to kernels.MAX_ROWS tokens run fused; a longer one (a prefill) takes the blocks."""
    model = make_model(**overrides)
    fast = optimize_for_decode(copy.deepcopy(model))
    sizes = [5, 3, kernels.MAX_ROWS, 1, kernels.MAX_ROWS + 1, 2]
    idx = torch.randint(0, 96, (1, sum(sizes)))
    results = spy(monkeypatch)
    cache = ContiguousKVCache(model.cfg, 1, idx.shape[1])
    with torch.no_grad():
        full = model(idx)
        bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
        got = torch.cat([fast(idx[:, a:b], cache=cache) for a, b in zip(bounds, bounds[1:])], 1)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
    assert [r is not None for r in results] == [True, True, True, True, False, True]


def test_a_layer_replaced_between_steps_is_read_anew(monkeypatch):
    model = make_model()
    fast = optimize_for_decode(copy.deepcopy(model))
    idx = torch.randint(0, 96, (1, 12))
    decode_logits(fast, idx)  # the layer descriptions now point at the old weights
    new_down = nn.Linear(256, 64)
    model.blocks[1].ffn.down, fast.blocks[1].ffn.down = new_down, copy.deepcopy(new_down)  # a new module
    new_gain = torch.randn(64)
    for m in (model, fast):
        m.blocks[0].norm1.weight.data = new_gain.clone()  # new storage under the same Parameter
    results = spy(monkeypatch)
    with torch.no_grad():
        full = model(idx)[:, 6:]
    torch.testing.assert_close(decode_logits(fast, idx), full, rtol=1e-4, atol=1e-4)
    assert ran_fused(results) == 7


def lora_wrapped(model: Transformer) -> Transformer:
    apply_lora(model, LoRAConfig(enabled=True, rank=2, targets=("wq",)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a nonzero update: output ≠ base layer's
    return model


STEPS_ASIDE = {
    "a LoRA-wrapped projection": lambda m: lora_wrapped(m),
    "w8a8 weights": lambda m: quantize_model(m, "w8a8"),
    "post-norm": lambda m: make_model(norm_position="post"),
    "a sliding window": lambda m: make_model(window=4),
    "alibi": lambda m: make_model(position="alibi"),
    "qk-norm": lambda m: make_model(position="rope", norm="rmsnorm", ffn="swiglu", bias=False, qk_norm="head"),
}


@pytest.mark.parametrize("change", STEPS_ASIDE.values(), ids=STEPS_ASIDE.keys())
def test_fused_path_steps_aside_where_it_does_not_apply(monkeypatch, change):
    model = change(make_model())
    fast = optimize_for_decode(copy.deepcopy(model))
    assert isinstance(fast.blocks, FusedBlocks)
    idx = torch.randint(0, 96, (1, 12))
    results = spy(monkeypatch)
    torch.testing.assert_close(decode_logits(fast, idx), decode_logits(model, idx), rtol=1e-4, atol=1e-4)
    assert results and all(r is None for r in results)


def test_batches_and_int8_caches_and_autograd_take_the_block_path(monkeypatch):
    model = make_model()
    fast = optimize_for_decode(copy.deepcopy(model))
    idx = torch.randint(0, 96, (1, 10))
    results = spy(monkeypatch)
    torch.testing.assert_close(decode_logits(fast, idx, batch=2), decode_logits(model, idx, batch=2), rtol=1e-4,
                               atol=1e-4)  # fmt: skip
    cache = ContiguousKVCache(model.cfg, 1, 16, kv_dtype="int8")
    with torch.no_grad():
        fast(idx[:, :4], cache=cache)
        fast(idx[:, 4:5], cache=cache)
    fast(idx[:, :1], cache=ContiguousKVCache(model.cfg, 1, 4))  # autograd on
    assert results and all(r is None for r in results)


def test_a_new_cache_at_a_freed_caches_address_is_read_with_its_own_shape():
    """The allocator may hand a new cache a freed one's address with another max_len: each call reads the cache's
    own layout (a layer's keys start n_kv_head·max_len·head_dim floats after the last layer's)."""
    model = make_model()
    fast = optimize_for_decode(copy.deepcopy(model))
    idx = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        full = model(idx)[:, 6:]
    long_cache = ContiguousKVCache(model.cfg, 1, 40)
    with torch.no_grad():
        fast(idx[:, :6], cache=long_cache)
        fast(idx[:, 6:7], cache=long_cache)  # planned with this cache
    short_cache = ContiguousKVCache(model.cfg, 1, 12)
    for name in ("k", "v"):  # the short cache's buffers at the long one's address
        big, small = getattr(long_cache.store, name), getattr(short_cache.store, name)
        setattr(short_cache.store, name, big.view(-1)[: small.numel()].view(small.shape).zero_())
    assert short_cache.store.k.data_ptr() == long_cache.store.k.data_ptr()
    with torch.no_grad():
        fast(idx[:, :6], cache=short_cache)
        got = torch.cat([fast(idx[:, t : t + 1], cache=short_cache) for t in range(6, 12)], 1)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
