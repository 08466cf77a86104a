"""Every attention kernel against the naive reference under its own mask; linear attention's three forms."""

import math

import pytest
import torch

from lmforge.model import ModelConfig
from lmforge.model.attention import (
    _sdpa,
    attention_mask,
    block_sparse_attention,
    feature_map,
    linear_attention,
    linear_attention_recurrent,
    naive_attention,
    sliding_window_attention,
)


def qkv(T, H=4, H_kv=2, D=16, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, T, D, generator=g),
        torch.randn(B, H_kv, T, D, generator=g),
        torch.randn(B, H_kv, T, D, generator=g),
    )


def pattern(attention, T, **kw):
    cfg = ModelConfig(vocab_size=8, n_layer=1, d_model=64, n_head=4, max_seq_len=T, attention=attention, **kw)
    pos = torch.arange(T)[None]
    return cfg, attention_mask(cfg, pos, pos)


@pytest.mark.parametrize("T,W", [(50, 7), (64, 16), (33, 1), (20, 40), (97, 32)])
@pytest.mark.parametrize("H_kv", [4, 2, 1])
def test_sliding_window_matches_naive_with_banded_mask(T, W, H_kv):
    q, k, v = qkv(T, H_kv=H_kv)
    _, mask = pattern("sliding_window", T, window=W)
    band = torch.ones(T, T, dtype=torch.bool).tril() & ~torch.ones(T, T, dtype=torch.bool).tril(-W)
    assert torch.equal(mask[0, 0], band)  # the mask is exactly the band: key t-W+1 .. t
    ref = naive_attention(q, k, v, mask)
    torch.testing.assert_close(sliding_window_attention(q, k, v, W), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("T,b", [(64, 8), (100, 9), (37, 6), (16, 16), (256, 16)])
@pytest.mark.parametrize("H_kv", [4, 1])
def test_block_sparse_matches_naive_with_its_mask(T, b, H_kv):
    q, k, v = qkv(T, H_kv=H_kv)
    _, mask = pattern("block_sparse", T, sparse_block=b)
    ref = naive_attention(q, k, v, mask)
    torch.testing.assert_close(block_sparse_attention(q, k, v, b), ref, atol=1e-5, rtol=0)


def test_block_sparse_pattern_is_local_plus_summary_and_about_three_root_t_keys():
    T = 1024
    cfg, mask = pattern("block_sparse", T)
    b = cfg.block_sparse_size
    assert b == 32
    m = mask[0, 0]
    for t in (0, 31, 32, 100, 1023):
        seen = set(m[t].nonzero().flatten().tolist())
        local = {s for s in range(t + 1) if t // b - s // b <= 1}
        summary = {s for s in range(t + 1) if s % b == b - 1}
        assert seen == local | summary
    assert m.sum(-1).max() <= 3 * b  # O(√T) keys per query, not O(T)


def test_sdpa_matches_naive_causal_masked_and_biased():
    q, k, v = qkv(40)
    torch.testing.assert_close(_sdpa(q, k, v, None, None, 0.0, True), naive_attention(q, k, v), atol=1e-5, rtol=0)
    mask = torch.rand(2, 1, 40, 40) > 0.3
    mask[..., 0] = True
    bias = torch.randn(2, 4, 40, 40)
    torch.testing.assert_close(
        _sdpa(q, k, v, mask, bias, 0.0, False), naive_attention(q, k, v, mask, bias), atol=1e-5, rtol=0
    )


def linear_reference(q, k, v):
    """The quadratic form: out_t = Σ_{s≤t} (φq_t·φk_s) v_s / Σ_{s≤t} φq_t·φk_s."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    a = (q @ k.transpose(-1, -2)).tril()
    return (a @ v) / a.sum(-1, keepdim=True)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_linear_parallel_recurrent_and_quadratic_agree(chunk):
    q, k, v = qkv(45)
    q, k = feature_map(q), feature_map(k)
    par, (S, z) = linear_attention(q, k, v, chunk=chunk)
    rec, (S2, z2) = linear_attention_recurrent(q, k, v)
    torch.testing.assert_close(par, rec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(par, linear_reference(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S, S2, atol=1e-4, rtol=1e-5)


def test_linear_continues_from_state():
    q, k, v = qkv(30)
    q, k = feature_map(q), feature_map(k)
    full, _ = linear_attention(q, k, v, chunk=8)
    first, state = linear_attention(q[:, :, :13], k[:, :, :13], v[:, :, :13], chunk=8)
    second, _ = linear_attention(q[:, :, 13:], k[:, :, 13:], v[:, :, 13:], state, chunk=8)
    torch.testing.assert_close(torch.cat([first, second], 2), full, atol=1e-5, rtol=1e-5)


def test_linear_memory_is_not_t_times_d_squared():
    """The chunked form holds T/C per-chunk d×d states, never one per position."""
    T, D, chunk = 512, 32, 64
    q, k, v = (torch.rand(1, 1, T, D) for _ in range(3))
    peak = {}

    def track(t):
        peak["max"] = max(peak.get("max", 0), t.numel())

    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor):
                    track(t)
            return out

    with Largest():
        linear_attention(q, k, v, chunk=chunk)
    assert peak["max"] < T * D * D / 4  # a cumsum over positions would need T·d² elements
    assert peak["max"] <= max(T * chunk, (T // chunk) * D * D, T * D)


def test_window_mask_respects_positions_not_indices():
    cfg = ModelConfig(vocab_size=8, n_layer=1, d_model=32, n_head=2, window=3)
    q_pos = torch.tensor([[10, 11]])
    k_pos = torch.tensor([[7, 8, 9, 10, 11]])
    m = attention_mask(cfg, q_pos, k_pos)[0, 0]
    assert m.tolist() == [[False, True, True, True, False], [False, False, True, True, True]]
    assert math.isclose(cfg.head_dim, 16)
