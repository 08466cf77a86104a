"""int8 K/V, the sliding-window cache with attention sinks and the token-merging cache, each against a
brute-force oracle: a full recompute without cache (the model applies its own window), a full recompute under
an explicit mask, HF Mistral's sliding window, and naive attention over duplicated keys. Tiny fp32 models.

    .venv/bin/pytest tests/infer/test_kv_caches.py -q
"""

from __future__ import annotations

import pytest
import torch

import lmforge.model.transformer as transformer_module
from lmforge.config import UserError
from lmforge.infer.kv_cache import ContiguousKVCache, dequantize_kv, quantize_kv
from lmforge.infer.merging import TokenMergingCache
from lmforge.infer.sliding import SlidingKVCache
from lmforge.model import ModelConfig, Transformer
from lmforge.model.attention import naive_attention

W = 6  # the window of the sliding-window models


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=61, max_seq_len=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, init_std=0.2)
    return ModelConfig(**(base | dict(position="rope") | kw))


def model_of(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def tokens(t: int, batch: int = 2, seed: int = 0, vocab: int = 61) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@torch.no_grad()
def cached_logits(model, idx: torch.Tensor, cache, chunks: list[int]) -> torch.Tensor:
    """Feed idx through the cache in chunks of the given sizes, then one token at a time; all logits."""
    out, t = [], 0
    for n in chunks:
        out.append(model(idx[:, t : t + n], cache=cache))
        t += n
    out += [model(idx[:, s : s + 1], cache=cache) for s in range(t, idx.shape[1])]
    return torch.cat(out, 1)


# ---- int8 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype", ["bf16", "int8"])
def test_paged_pool_stores_each_kv_dtype_as_the_contiguous_cache_does(kv_dtype):
    """One storage (KVStore) under both: the paged pool's logits equal the contiguous cache's in the same dtype,
    chunked prefill and one-token steps alike, and its bytes are what it says."""
    from lmforge.infer.paged import PagedKVPool, PagedSequence

    cfg = tiny()
    model, prompt = model_of(cfg), tokens(23, batch=1)[0].tolist()
    contiguous = ContiguousKVCache(cfg, 1, 40, kv_dtype=kv_dtype)
    pool = PagedKVPool(cfg, num_blocks=8, block_size=4, kv_dtype=kv_dtype)
    seq = PagedSequence(prompt + [5, 7])
    with torch.no_grad():
        for chunk in (prompt[:9], prompt[9:], [5], [7]):
            reference = model(torch.tensor([chunk]), cache=contiguous)
            positions = torch.arange(seq.num_cached, seq.num_cached + len(chunk))[None]
            pool.reserve(seq, len(chunk))
            batch = pool.batch([seq], [len(chunk)])
            torch.testing.assert_close(model(torch.tensor([chunk]), positions=positions, cache=batch), reference,
                                       rtol=1e-5, atol=1e-5)  # fmt: skip
            batch.commit()
    fp32 = PagedKVPool(cfg, num_blocks=8, block_size=4)
    assert pool.k.dtype == {"bf16": torch.bfloat16, "int8": torch.int8}[kv_dtype]
    assert pool.nbytes() == 8 * PagedKVPool.bytes_per_block(cfg, 4, kv_dtype=kv_dtype) < fp32.nbytes()
    assert pool.nbytes() / fp32.nbytes() == {"bf16": 1 / 2, "int8": (1 + 4 / cfg.head_dim) / 4}[kv_dtype]
    with pytest.raises(UserError, match="kv_dtype must be one of"):
        PagedKVPool(cfg, num_blocks=8, kv_dtype="fp4")
    from lmforge.infer.engine import Engine

    stored = {"bf16": "bfloat16", "int8": "int8"}[kv_dtype]
    assert f"MiB, {stored})" in Engine(model, num_blocks=8, kv_dtype=kv_dtype).capacity_line()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_kv_is_within_half_a_scale_of_brute_force(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 16) * torch.logspace(-3, 2, 7)[:, None]  # token norms over five decades
    x[0, 1, 2] = 0.0  # an all-zero vector must not divide by zero
    x = x.to(dtype)
    q, scale = quantize_kv(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 3, 7, 1) and scale.dtype == dtype
    for b, h, t in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(7)).tolist():
        vec = x[b, h, t].float()
        s = scale[b, h, t, 0].float().item()
        amax = max(abs(value) for value in vec.tolist())
        assert s == (1.0 if amax == 0 else pytest.approx(amax / 127, rel=1e-2 if dtype == torch.bfloat16 else 1e-6))
        for value, code in zip(vec.tolist(), q[b, h, t].tolist(), strict=True):
            assert abs(value - code * s) <= s / 2 * (1 + 1e-5)
    back = dequantize_kv(q, scale, torch.float32)
    assert back.dtype == torch.float32 and back[0, 1, 2].abs().sum() == 0
    assert ((back - x.float()).abs() <= scale.float() / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("make", ["contiguous", "sliding"])
def test_int8_cache_logits_close_to_fp32_cache(make):
    cfg = tiny(window=W) if make == "sliding" else tiny()
    model = model_of(cfg)

    def new(kv_dtype):
        if make == "sliding":
            return SlidingKVCache(cfg, batch_size=1, window=W, kv_dtype=kv_dtype)
        return ContiguousKVCache(cfg, batch_size=1, max_len=40, kv_dtype=kv_dtype)

    # greedy with the fp32 cache, then the int8 cache teacher-forced on the same tokens
    idx, cache = tokens(5, batch=1), new(None)
    with torch.no_grad():
        logits = [model(idx, cache=cache)[:, -1:]]
        for _ in range(30):
            idx = torch.cat([idx, logits[-1].argmax(-1)], 1)
            logits.append(model(idx[:, -1:], cache=cache))
    fp32, int8 = torch.cat(logits[:-1], 1), cached_logits(model, idx[:, :-1], new("int8"), [5])[:, 4:]
    err = rel_err(int8, fp32)
    assert 0 < err < 0.02, err
    assert (int8.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.9


def test_int8_and_bf16_storage_bytes():
    cfg = tiny(n_head=4, n_kv_head=2, d_model=64)  # head_dim 16
    fp32 = ContiguousKVCache(cfg, batch_size=3, max_len=20)
    int8 = ContiguousKVCache(cfg, batch_size=3, max_len=20, kv_dtype="int8")
    bf16 = ContiguousKVCache(cfg, batch_size=3, max_len=20, kv_dtype="bf16")
    assert fp32.nbytes() == 3 * 20 * cfg.kv_bytes_per_token("fp32")
    assert int8.k.dtype == torch.int8 and int8.nbytes() / fp32.nbytes() == (1 + 4 / cfg.head_dim) / 4
    assert bf16.k.dtype == torch.bfloat16 and bf16.nbytes() * 2 == fp32.nbytes()
    assert int8.store.bytes_per_slot() == (2 * cfg.n_layer * cfg.kv_dim) * (1 + 4 / cfg.head_dim)
    assert int8.store.bytes_per_slot() * 3 * 20 == int8.nbytes()
    with pytest.raises(UserError, match="kv_dtype must be one of"):
        ContiguousKVCache(cfg, 1, 8, kv_dtype="int4")


def test_int8_contiguous_cache_still_truncates():
    cfg = tiny()
    model, idx = model_of(cfg), tokens(12, batch=1)
    cache = ContiguousKVCache(cfg, batch_size=1, max_len=20, kv_dtype="int8")
    with torch.no_grad():
        model(idx[:, :8], cache=cache)
        cache.truncate(5)
        again = model(idx[:, 5:12], cache=cache)
        fresh = ContiguousKVCache(cfg, batch_size=1, max_len=20, kv_dtype="int8")
        reference = model(idx, cache=fresh)[:, 5:]
    torch.testing.assert_close(again, reference, rtol=1e-5, atol=1e-5)


# ---- sliding window ------------------------------------------------------------------------------------
SLIDING_MODELS = {
    "sdpa_rope": dict(attention="sdpa"),
    "naive_rope": dict(attention="naive"),
    "sliding_window_rope": dict(attention="sliding_window"),
    "sdpa_alibi": dict(attention="sdpa", position="alibi"),
}


@pytest.mark.parametrize("chunks", [[3], [2 * W - 1, 4]], ids=["decode", "long_prefill"])
@pytest.mark.parametrize("case", list(SLIDING_MODELS))
def test_sliding_cache_is_exact_for_a_sliding_window_model(case, chunks):
    """3W+ tokens; the model without a cache applies cfg.window itself (the full recompute oracle). The second
    chunk of `long_prefill` arrives after the ring has wrapped."""
    cfg = tiny(window=W, **SLIDING_MODELS[case])
    model, idx = model_of(cfg), tokens(3 * W + 2)
    cache = SlidingKVCache(cfg, batch_size=2, window=W)
    with torch.no_grad():
        full = model(idx)
    assert rel_err(cached_logits(model, idx, cache, chunks), full) < 1e-5
    assert cache.length == idx.shape[1] and cache.store.k.shape[3] == W


def test_sliding_cache_left_padded_batch_equals_each_row_alone():
    cfg = tiny(window=W)
    model = model_of(cfg)
    lengths, steps = [2 * W - 1, 4], 2 * W
    rows = [tokens(n + steps, batch=1, seed=i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    prompt, valid = torch.zeros(2, T, dtype=torch.long), torch.zeros(2, T, dtype=torch.bool)
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        prompt[i, T - n :], valid[i, T - n :] = row[:n], True
    pos = (valid.cumsum(1) - 1).clamp(min=0)
    cache = SlidingKVCache(cfg, batch_size=2, window=W)
    with torch.no_grad():
        out = [model(prompt, positions=pos, attn_mask=valid, cache=cache)[:, -1]]
        for s in range(steps):
            pos = pos[:, -1:] + 1
            nxt = torch.stack([row[n + s] for row, n in zip(rows, lengths, strict=True)])[:, None]
            out.append(model(nxt, positions=pos, cache=cache)[:, 0])
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            alone = model(row[None])[0, n - 1 :]
            assert rel_err(torch.stack([o[i] for o in out]), alone) < 1e-5


def test_sliding_cache_matches_hf_mistral():
    """Our Mistral-shaped model (rmsnorm, swiglu, rope, GQA, window W) exported with to_hf: greedy tokens of HF's
    own generate (its sliding-window cache) equal ours with SlidingKVCache, and HF's full-forward logits match
    our cached step logits."""
    pytest.importorskip("transformers")
    from lmforge.model.hf_export import to_hf

    cfg = tiny(window=W, norm="rmsnorm", ffn="swiglu", bias=False, tie_embeddings=False, vocab_size=128)
    ours = model_of(cfg)
    hf = to_hf(ours).eval()
    assert hf.config.sliding_window == W
    prompt, new = tokens(5, batch=1, vocab=128), 3 * W
    cache = SlidingKVCache(cfg, batch_size=1, window=W)
    with torch.no_grad():
        steps = [ours(prompt, cache=cache)]
        idx = prompt
        for _ in range(new):
            idx = torch.cat([idx, steps[-1][:, -1].argmax(-1, keepdim=True)], 1)
            steps.append(ours(idx[:, -1:], cache=cache))
        hf_idx = hf.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)
        hf_logits = hf(idx).logits
    assert torch.equal(hf_idx, idx)
    assert rel_err(torch.cat(steps, 1), hf_logits) < 1e-4
    assert cache.store.k.shape[3] == W


def test_sliding_cache_memory_is_the_window():
    cfg = tiny(window=W)
    model = model_of(cfg)
    cache = SlidingKVCache(cfg, batch_size=1, window=W, kv_dtype="int8")
    nbytes, pointer = cache.nbytes(), cache.store.k.data_ptr()
    idx = tokens(4 * W, batch=1)
    with torch.no_grad():
        model(idx[:, :3], cache=cache)
        for t in range(3, idx.shape[1]):
            model(idx[:, t : t + 1], cache=cache)
            assert cache.store.k.shape[3] == W and cache.nbytes() == nbytes
            assert set(cache.kept_positions()[0].tolist()) == set(range(max(0, t + 1 - W), t + 1))
    assert cache.store.k.data_ptr() == pointer  # a ring: written in place, never reallocated
    assert nbytes == W * cache.store.bytes_per_slot()
    cache.reset()
    assert cache.length == 0 and cache.filled == 0


@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("attention", ["sdpa", "naive"])
def test_sinks_keep_the_first_tokens_and_the_last(attention, sinks, monkeypatch):
    """A full-attention model decoding with SlidingKVCache(window=W, sinks=S) equals a full recompute where
    query p may see exactly keys {0..S−1} ∪ {p−(W−S)+1..p}: the oracle replaces the model's mask."""
    cfg = tiny(attention=attention)
    model, idx = model_of(cfg), tokens(3 * W + 2)
    T, recent = idx.shape[1], W - sinks
    cache = SlidingKVCache(cfg, batch_size=2, window=W, sinks=sinks)
    with torch.no_grad():
        logits = [model(idx[:, :3], cache=cache)]
        for t in range(3, T):
            logits.append(model(idx[:, t : t + 1], cache=cache))
            expected = set(range(min(sinks, t + 1))) | set(range(max(0, t + 1 - recent), t + 1))
            assert set(cache.kept_positions()[1].tolist()) == expected
        cached, full = torch.cat(logits, 1), model(idx)

        def streaming_mask(cfg, q_pos, k_pos, k_valid=None):
            q, k = q_pos[:, :, None], k_pos[:, None, :]
            return ((k <= q) & ((k < sinks) | (q - k < recent)))[:, None]

        monkeypatch.setattr(transformer_module, "attention_mask", streaming_mask)
        oracle = model(idx, positions=torch.arange(T).expand(2, T))
    assert rel_err(cached, oracle) < 1e-5
    assert rel_err(cached, full) > 1e-2  # full attention differs: the eviction acted


def test_sliding_cache_rejects_bad_arguments():
    with pytest.raises(UserError, match="sinks < window"):
        SlidingKVCache(tiny(), batch_size=1, window=4, sinks=4)
    with pytest.raises(UserError, match="linear.*use the contiguous cache"):
        SlidingKVCache(tiny(attention="linear"), batch_size=1, window=4)
    cache = SlidingKVCache(tiny(), batch_size=1, window=4)
    with pytest.raises(ValueError) as bug:  # only our own code could hand it a state: a bug, not a user error
        cache.set_state(0, object())
    assert not isinstance(bug.value, UserError)


# ---- token merging -------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "naive"])
def test_merging_with_room_for_everything_is_the_contiguous_cache(attention):
    cfg = tiny(attention=attention)
    model, idx = model_of(cfg), tokens(20)
    merged = cached_logits(model, idx, TokenMergingCache(cfg, batch_size=2, budget=20), [7])
    contiguous = cached_logits(model, idx, ContiguousKVCache(cfg, batch_size=2, max_len=20), [7])
    # Not bit-equal: the contiguous cache's one-token steps attend in lmforge's decode kernel, merging in SDPA.
    torch.testing.assert_close(merged, contiguous, rtol=1e-5, atol=1e-5)


def test_merging_left_padded_batch_equals_contiguous_cache():
    """Padding enters with count 0: a large negative bias instead of the mask, and it is merged first."""
    cfg = tiny()
    model = model_of(cfg)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, :3] = False
    prompt, pos = tokens(8), (valid.cumsum(1) - 1).clamp(min=0)
    nxt = tokens(6, seed=1)
    results = []
    for cache in (TokenMergingCache(cfg, 2, budget=14), ContiguousKVCache(cfg, 2, max_len=14)):
        with torch.no_grad():
            out = [model(prompt, positions=pos, attn_mask=valid, cache=cache)]
            p = pos[:, -1:]
            for t in range(6):
                p = p + 1
                out.append(model(nxt[:, t : t + 1], positions=p, cache=cache))
        results.append(torch.cat(out, 1))
    merged, contiguous = results
    assert rel_err(merged[0], contiguous[0]) < 1e-6 and rel_err(merged[1, 3:], contiguous[1, 3:]) < 1e-6


def test_merged_duplicate_pair_equals_attention_over_both():
    """Proportional attention's defining property: one entry of count 2 weighs what two identical keys did."""
    cfg = tiny(n_layer=1, d_model=32, n_head=4, n_kv_head=2)  # head_dim 8
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    k[:, :, 3], v[:, :, 3] = k[:, :, 2], v[:, :, 2]  # entries 2 and 3 identical: cosine 1, merged first
    cache = TokenMergingCache(cfg, batch_size=1, budget=4)
    cache.begin(torch.arange(5)[None], None)
    cache.update(0, k, v)
    assert cache.entry_counts()[0, 0].tolist() == [1, 1, 2, 1]
    q, k_new, v_new = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    cache.begin(torch.tensor([[5]]), None)
    keys, values = cache.update(0, k_new, v_new)
    bias = cache.logit_bias(0)
    assert keys.shape[2] == 5 and bias.shape == (1, 1, 1, 5)
    merged = naive_attention(q, keys, values, bias=bias)
    duplicated = naive_attention(q, torch.cat([k, k_new], 2), torch.cat([v, v_new], 2))
    torch.testing.assert_close(merged, duplicated, rtol=1e-6, atol=1e-6)
    assert rel_err(naive_attention(q, keys, values), duplicated) > 1e-3  # without log(count) it differs


@pytest.mark.parametrize("attention", ["sdpa", "naive"])
def test_merging_a_repeated_token_is_exact_through_the_model(attention):
    """One layer, no positions: a token repeated back to back has identical K and V, so merging that pair
    changes nothing — the model's next logits equal a full recompute (attention.py adds log(count))."""
    cfg = tiny(n_layer=1, position="none", attention=attention)
    model = model_of(cfg)
    idx = torch.tensor([[5, 17, 17, 30, 41, 8]])
    cache = TokenMergingCache(cfg, batch_size=1, budget=4)
    with torch.no_grad():
        model(idx[:, :5], cache=cache)
        assert cache.entry_counts()[0, 0].tolist() == [1, 2, 1, 1]
        step = model(idx[:, 5:], cache=cache)
        full = model(idx)[:, 5:]
    assert rel_err(step, full) < 1e-6


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_merging_counts_and_memory(kv_dtype):
    cfg = tiny()
    model = model_of(cfg)
    budget, sinks, recent = 8, 2, 2
    cache = TokenMergingCache(cfg, batch_size=2, budget=budget, sinks=sinks, recent=recent, kv_dtype=kv_dtype)
    nbytes, idx = cache.nbytes(), tokens(30)
    with torch.no_grad():
        logits = [model(idx[:, :13], cache=cache)]  # a prompt longer than the budget: five merges at once
        for t in range(13, idx.shape[1]):
            counts = cache.entry_counts()
            assert counts.shape == (cfg.n_layer, 2, budget) and (counts.sum(-1) == cache.length).all()
            assert (counts[..., :sinks] == 1).all() and (counts[..., -recent:] == 1).all()  # protected
            logits.append(model(idx[:, t : t + 1], cache=cache))
            assert cache.nbytes() == nbytes and cache.store.k.shape[3] == budget
    assert torch.cat(logits, 1).isfinite().all()
    assert nbytes == 2 * budget * cache.store.bytes_per_slot() + cfg.n_layer * 2 * budget * 4
    cache.reset()
    assert cache.length == cache.size == 0


def test_merging_refuses_configs_that_read_key_positions():
    for kw in (dict(window=W), dict(position="alibi"), dict(attention="block_sparse"), dict(attention="linear")):
        with pytest.raises(ValueError, match="token merging needs"):
            TokenMergingCache(tiny(**kw), batch_size=1, budget=8)
    with pytest.raises(ValueError, match="must exceed sinks"):
        TokenMergingCache(tiny(), batch_size=1, budget=4, sinks=2, recent=2)


def test_caches_follow_the_protocol():
    from lmforge.model.cache import Cache

    cfg = tiny()
    for cache in (
        ContiguousKVCache(cfg, 1, 8, kv_dtype="int8"),
        SlidingKVCache(cfg, 1, window=4),
        TokenMergingCache(cfg, 1, budget=4),
    ):
        assert isinstance(cache, Cache) and cache.capacity_tokens in (4, 8)
