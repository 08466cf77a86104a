"""Experimental: a KV cache of at most `budget` entries per layer, kept by merging similar neighbours instead
of evicting tokens.

cache = TokenMergingCache(model.cfg, batch_size=1, budget=256, sinks=4, recent=32)
logits = model(prompt, cache=cache)
logits = model(next_token, cache=cache)

Whenever a layer holds more than `budget` entries, the adjacent pair whose keys are most alike (cosine
similarity of the key over all kv heads) becomes one entry: the count-weighted mean of their keys and of
their values, with the counts added. Attention then adds log(count) to each entry's logit — proportional
attention (Bolya et al. 2023, "Token Merging: Your ViT But Faster") — so an entry standing for n identical
tokens weighs exactly what the n tokens did. The model asks for that term through the cache's optional
`logit_bias(layer)` (see `lmforge.model.cache`).

Layers merge different pairs, but every layer keeps the same number of entries, so the positions and validity
`begin` returns stay shared. A merged entry has no single position: cached entries are reported at position 0,
which only has to pass the causal mask (every cached token is in the past; RoPE was applied before storing).
Hence the configs refused below: a window, ALiBi/relative biases and block-sparse patterns read key positions.

Padding (a left-padded batch) enters with count 0: its logit bias is a large negative (not −inf, so a padding
query whose keys are all padding gets a finite, unused output rather than NaN leaking into later layers), and
it is merged away first, so it costs no budget for long.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.model import Cache, ModelConfig

from .kv_cache import KVStore

PADDING_BIAS = -1e4  # exp(−1e4) = 0 in every float dtype, yet finite in fp16 and bf16


class TokenMergingCache(Cache):
    """`budget` entries per layer; the first `sinks` entries (attention sinks, Xiao et al. 2023) and the last
    `recent` are never merged with a neighbour."""

    def __init__(self, cfg: ModelConfig, batch_size: int, budget: int, *, sinks: int = 0, recent: int = 0,
                 dtype=torch.float32, device="cpu", kv_dtype: str | torch.dtype | None = None):  # fmt: skip
        if cfg.attention not in ("sdpa", "naive") or cfg.window or cfg.position in ("alibi", "relative"):
            raise ValueError(
                "token merging needs full causal softmax attention whose keys need no position (merged entries "
                f"have none): attention sdpa or naive, no window, position not alibi/relative; got "
                f"attention={cfg.attention}, window={cfg.window}, position={cfg.position}"
            )
        if budget < sinks + recent + 1:
            raise ValueError(f"budget ({budget}) must exceed sinks + recent ({sinks} + {recent}): nothing to merge")
        self.cfg, self.batch_size, self.budget = cfg, batch_size, budget
        self.sinks, self.recent, self.dtype = sinks, recent, dtype
        self.store = KVStore(cfg, batch_size, budget, dtype, device, kv_dtype)
        # fp32 counts: exact integers up to 2^24 tokens per entry
        self.counts = torch.zeros(cfg.n_layer, batch_size, budget, dtype=torch.float32, device=device)
        self.length = 0  # tokens seen
        self.size = 0  # entries held per layer (the same in every layer)
        self._old_size = 0
        self._new_counts: torch.Tensor | None = None  # [B, T]: 1 per new token, 0 for padding
        self._bias: list[torch.Tensor | None] = [None] * cfg.n_layer
        self._all_ones = True  # every entry has count 1 so far: no bias, attention as with ContiguousKVCache
        self._uniform = True  # the same, for the forward in progress

    @property
    def capacity_tokens(self) -> int:
        return self.budget

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None):
        self.store.check_batch(positions)
        B, T = positions.shape
        valid = torch.ones_like(positions, dtype=torch.bool) if valid is None else valid
        self._new_counts = valid.float()
        self._uniform = self._all_ones and bool(valid.all())
        self._all_ones = self._uniform and self.size + T <= self.budget  # no merge in this forward
        self._old_size, self.size = self.size, min(self.size + T, self.budget)
        self.length += T
        placeholder = torch.zeros(B, self._old_size, dtype=positions.dtype, device=positions.device)
        cached_valid = torch.ones(B, self._old_size, dtype=torch.bool, device=positions.device)
        return torch.cat([placeholder, positions], 1), torch.cat([cached_valid, valid], 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        old_k, old_v = self.store.read(layer, slice(0, self._old_size))
        keys = torch.cat([old_k, self.store.as_stored(k)], 2)
        values = torch.cat([old_v, self.store.as_stored(v)], 2)
        counts = torch.cat([self.counts[layer, :, : self._old_size], self._new_counts], 1)
        self._bias[layer] = None if self._uniform else count_bias(counts, self.dtype)
        merged_k, merged_v, merged_counts = merge_adjacent(
            keys, values, counts, self.budget, protect_first=self.sinks, protect_last=self.recent
        )
        n = merged_k.shape[2]
        self.store.write(layer, slice(0, n), merged_k, merged_v)
        self.counts[layer, :, :n] = merged_counts
        return keys, values

    def logit_bias(self, layer: int) -> torch.Tensor | None:
        """log(count) [B, 1, 1, Tk] for the keys the last `update(layer, ...)` returned; None while every
        count is 1."""
        return self._bias[layer]

    def entry_counts(self) -> torch.Tensor:
        """Tokens behind each held entry, [n_layer, B, size]."""
        return self.counts[:, :, : self.size]

    def get_state(self, layer: int):
        return None  # only linear attention has a state, and it is refused above

    def set_state(self, layer: int, state) -> None:
        raise ValueError("TokenMergingCache stores keys and values, not a linear-attention state")

    def nbytes(self) -> int:
        """K and V (and int8's scales) plus the counts of every layer: `budget` entries, whatever the length."""
        return self.store.nbytes() + self.counts.numel() * self.counts.element_size()

    def reset(self) -> None:
        self.length = self.size = self._old_size = 0
        self._all_ones = self._uniform = True
        self._bias = [None] * self.cfg.n_layer


def count_bias(counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """log(count) as an additive logit bias [B, 1, 1, n]; count 0 (padding) gets PADDING_BIAS."""
    bias = torch.where(counts > 0, counts.clamp(min=1).log(), torch.full_like(counts, PADDING_BIAS))
    return bias.to(dtype)[:, None, None, :]


def merge_adjacent(k, v, counts, target: int, protect_first: int = 0, protect_last: int = 0):
    """Merge adjacent entries, the most similar pair first, until `target` remain. k, v [B, Hk, n, D],
    counts [B, n]; each row picks its own pairs. Pairs with padding (count 0) merge first and anywhere."""
    B, Hk, n, D = k.shape
    while n > target:
        flat = k.transpose(1, 2).reshape(B, n, Hk * D)  # a token's key over all kv heads
        sim = F.cosine_similarity(flat[:, :-1], flat[:, 1:], dim=-1)  # [B, n-1]: pair (i, i+1)
        i = torch.arange(n - 1, device=k.device)
        eligible = (i >= protect_first) & (i + 1 < n - protect_last)
        sim = sim.masked_fill(~eligible, float("-inf"))
        sim = sim.masked_fill((counts[:, :-1] == 0) | (counts[:, 1:] == 0), 2.0)  # above any cosine
        left = sim.argmax(1)  # [B]
        k, v, counts = _merge_pair(k, v, counts, left)
        n -= 1
    return k, v, counts


def _merge_pair(k, v, counts, left):
    """Replace entries left, left+1 of each row by their count-weighted mean; [.., n] -> [.., n-1]."""
    B, Hk, n, D = k.shape
    c_left, c_right = counts.gather(1, left[:, None]), counts.gather(1, left[:, None] + 1)  # [B, 1]
    total = c_left + c_right
    w = torch.where(total > 0, c_left / total.clamp(min=1), torch.full_like(total, 0.5))  # two paddings: mean
    w = w[:, None, :, None].to(k.dtype)  # [B, 1, 1, 1]
    at = left[:, None, None, None].expand(B, Hk, 1, D)

    def mean(x):
        return w * x.gather(2, at) + (1 - w) * x.gather(2, at + 1)

    # entry j of the result is old entry j for j <= left, j + 1 after it (the merged one lands on `left`)
    j = torch.arange(n - 1, device=k.device)[None, :]
    keep = j + (j > left[:, None])  # [B, n-1]
    gather = keep[:, None, :, None].expand(B, Hk, n - 1, D)
    k = k.scatter(2, at, mean(k)).gather(2, gather)
    v = v.scatter(2, at, mean(v)).gather(2, gather)
    counts = counts.scatter(1, left[:, None], total).gather(1, keep)
    return k, v, counts
