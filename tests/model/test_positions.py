"""Position schemes against direct formulas and an outside implementation (HF T5's bucket function)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.model import ModelConfig
from lmforge.model.positions import (
    ALiBi,
    RelativeBias,
    RotaryEmbedding,
    alibi_slopes,
    apply_rope,
    sinusoidal_table,
    t5_relative_bucket,
)


def test_sinusoidal_matches_vaswani_formula():
    d = 16
    table = sinusoidal_table(torch.arange(50), d)
    for p in (0, 1, 17, 49):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            assert math.isclose(table[p, 2 * i].item(), math.sin(angle), abs_tol=1e-5)
            assert math.isclose(table[p, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-5)


def test_alibi_slopes_and_bias_match_the_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads (2^-0.5, 2^-1.5, ...)
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 + i) for i in range(4)]
    assert torch.allclose(alibi_slopes(12), torch.tensor(expected))
    cfg = ModelConfig(vocab_size=8, n_layer=1, d_model=48, n_head=12, position="alibi")
    pos = torch.arange(9)[None]
    bias = ALiBi(cfg)(pos, pos)
    for h in (0, 5, 11):
        for i in range(9):
            for j in range(i + 1):
                assert math.isclose(bias[0, h, i, j].item(), -expected[h] * (i - j), rel_tol=1e-6)


def test_t5_buckets_match_hf_t5():
    from transformers.models.t5.modeling_t5 import T5Attention

    q = torch.arange(300)[:, None]
    k = torch.arange(300)[None, :]
    relative = k - q
    for buckets, dist in ((32, 128), (16, 64)):
        ours = t5_relative_bucket(relative, buckets, dist)
        theirs = T5Attention._relative_position_bucket(relative, False, buckets, dist)
        assert torch.equal(ours, theirs)


def test_relative_bias_looks_up_the_bucket_per_head():
    cfg = ModelConfig(vocab_size=8, n_layer=1, d_model=32, n_head=4, position="relative")
    rel = RelativeBias(cfg)
    torch.nn.init.normal_(rel.weight)
    pos = torch.arange(40)[None]
    bias = rel(pos, pos)
    bucket = t5_relative_bucket(pos[0][None, :] - pos[0][:, None], 32, 128)
    assert torch.equal(bias[0, 2], rel.weight[bucket, 2])


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 4000), n=st.integers(0, 4000), shift=st.integers(-2000, 2000))
def test_rope_scores_depend_only_on_position_difference(m, n, shift):
    if min(m, n) + shift < 0:
        shift = -min(m, n)
    cfg = ModelConfig(vocab_size=8, n_layer=1, d_model=64, n_head=2, position="rope")
    rope = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(m * 7 + n)
    q, k = (
        torch.randn(1, 1, 1, 32, generator=g, dtype=torch.float64),
        torch.randn(1, 1, 1, 32, generator=g, dtype=torch.float64),
    )

    def score(a, b):
        ca, sa = rope(torch.tensor([[a]]))
        cb, sb = rope(torch.tensor([[b]]))
        return (apply_rope(q, ca.double(), sa.double()) * apply_rope(k, cb.double(), sb.double())).sum().item()

    # cos/sin come from fp32 angles, off by ~position·2^-24 rad: allow that much rotation error.
    tol = 4 * max(m, n, m + shift, n + shift, 1) * 2**-24 * (q.norm() * k.norm()).item()
    assert math.isclose(score(m, n), score(m + shift, n + shift), abs_tol=tol)


def test_rope_linear_scaling_is_position_interpolation():
    base = ModelConfig(vocab_size=8, n_layer=1, d_model=64, n_head=2, position="rope")
    scaled = ModelConfig(
        vocab_size=8, n_layer=1, d_model=64, n_head=2, position="rope", rope_scaling="linear", rope_factor=4.0
    )
    cos_s, sin_s = RotaryEmbedding(scaled)(torch.tensor([[40]]))
    cos_b, sin_b = RotaryEmbedding(base)(torch.tensor([[10]]))
    torch.testing.assert_close(cos_s, cos_b)
    torch.testing.assert_close(sin_s, sin_b)


def test_rope_dynamic_is_plain_rope_within_trained_length_and_stretches_past_it():
    kw = dict(vocab_size=8, n_layer=1, d_model=64, n_head=2, position="rope", max_seq_len=32)
    base = RotaryEmbedding(ModelConfig(**kw))
    dyn = RotaryEmbedding(ModelConfig(**kw, rope_scaling="dynamic", rope_factor=2.0))
    short = torch.arange(32)[None]
    torch.testing.assert_close(dyn(short)[0], base(short)[0])
    long = torch.arange(64)[None]
    assert (dyn(long)[0] - base(long)[0]).abs().max() > 1e-3
    # base' = base · (f·S/L − (f−1))^(d/(d−2)) with S=64, L=32, f=2
    d = 32
    theta = 10000 * (2 * 64 / 32 - 1) ** (d / (d - 2))
    expected = 1 / theta ** (torch.arange(0, d, 2).float() / d)
    torch.testing.assert_close(dyn.inv_freq_for(long), expected)


def test_rope_llama3_keeps_high_frequencies_and_divides_low_ones():
    kw = dict(vocab_size=8, n_layer=1, d_model=128, n_head=1, position="rope", rope_theta=500000.0)
    base = RotaryEmbedding(ModelConfig(**kw)).inv_freq
    cfg = ModelConfig(**kw, rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=64)
    scaled = RotaryEmbedding(cfg).inv_freq
    wavelen = 2 * math.pi / base
    high = wavelen < 64 / 4
    low = wavelen > 64 / 1
    assert high.any() and low.any()
    torch.testing.assert_close(scaled[high], base[high])
    torch.testing.assert_close(scaled[low], base[low] / 8)
    mid = ~high & ~low
    assert ((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8)).all()
