"""A fixed-size KV cache: the first `sinks` tokens ever seen plus the most recent `window − sinks`, in a ring
buffer, so memory stays `window` tokens however long the sequence grows.

cache = SlidingKVCache(model.cfg, batch_size=1, window=model.cfg.window)   # exact for a sliding-window model
cache = SlidingKVCache(model.cfg, batch_size=1, window=1024, sinks=4)      # StreamingLLM for a full-attention one
logits = model(prompt, cache=cache)                  # a prompt longer than the window is fine
logits = model(next_token, cache=cache)

Attention sinks (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks"): a model trained
with full attention puts much of its attention mass on the first tokens, and evicting them breaks it; keeping
a few of them next to a recent window keeps perplexity flat far past the training length.

One difference from StreamingLLM: keys keep their original positions. StreamingLLM re-indexes positions
inside the cache (the sinks at 0..S−1 and the window right after them) so that relative distances never
exceed what was trained; it can because it stores keys before RoPE and rotates every cached key on every
step. Here keys are stored already rotated (`lmforge.model` applies RoPE before `update`, as gpt-fast and HF
do), so re-indexing would mean re-rotating the whole cache each step. Original positions are also what makes
the cache exact for a model trained with a sliding window (Mistral), whose mask is built from positions. The
cost: a full-attention model decoding past its trained length sees query–sink distances it never saw.

What a query sees: decoding one token at a time, exactly the kept tokens, itself included — `window` keys,
the same span as `ModelConfig.window` and HF Mistral's `sliding_window`. A forward of several tokens (a
prompt) sees what the cache held before it plus the whole chunk, causally, and only then keeps the last
tokens. That is a superset of what each query would see one at a time, so a model whose own window is at most
`window − sinks` gets exactly its answer (it masks the rest by position); a full-attention model reads a
chunk in full, as StreamingLLM does with a prompt longer than its cache.
"""

from __future__ import annotations

import torch

from lmforge.config import UserError
from lmforge.model import Cache, ModelConfig

from .kv_cache import KVStore


class SlidingKVCache(Cache):
    """Slots 0..sinks−1 hold the first tokens for good; slots sinks..window−1 are a ring of the most recent
    ones. Slots fill in arrival order, so the first min(length, window) are the ones in use. Storage order is
    not time order once the ring wraps: the model masks by the positions `begin` returns, not by order.

    With a left-padded batch the rows share one slot layout, so the sinks are each row's first `sinks` tokens
    counting its padding (padding slots are simply invalid)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, window: int, sinks: int = 0, dtype=torch.float32,
                 device="cpu", kv_dtype: str | torch.dtype | None = None):  # fmt: skip
        if cfg.attention == "linear":
            raise UserError("linear attention keeps a fixed-size state already, so a sliding cache has nothing to "
                            "drop: use the contiguous cache (--kv contiguous)")  # fmt: skip
        if not 0 <= sinks < window:
            raise UserError(f"need 0 <= sinks < window, got sinks={sinks}, window={window}: keep fewer sinks "
                            "than the window's keys")  # fmt: skip
        self.cfg, self.batch_size, self.window, self.sinks = cfg, batch_size, window, sinks
        self.store = KVStore(cfg, batch_size, window, dtype, device, kv_dtype)
        self.positions = torch.zeros(batch_size, window, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, window, dtype=torch.bool, device=device)
        self.length = 0  # tokens seen; new tokens default to positions length, length + 1, ...
        self._read = slice(0, 0)  # slots of kept tokens the current forward returns
        self._src = self._dst = slice(0, 0)  # which new tokens go to which slots
        self._in_place = False

    @property
    def capacity_tokens(self) -> int:
        return self.window

    @property
    def filled(self) -> int:
        """Slots in use."""
        return min(self.length, self.window)

    def _slot(self, arrival: int) -> int:
        recent = self.window - self.sinks
        return arrival if arrival < self.sinks else self.sinks + (arrival - self.sinks) % recent

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None):
        self.store.check_batch(positions)
        T = positions.shape[1]
        valid = torch.ones_like(positions, dtype=torch.bool) if valid is None else valid
        start, self.length = self.length, self.length + T
        # One token: write it first (evicting the oldest recent one) and return the buffer itself — no copy
        # while decoding, and the query sees exactly `window` keys.
        self._in_place = T == 1
        if self._in_place:
            slot = self._slot(start)
            self._src, self._dst = slice(0, 1), slice(slot, slot + 1)
            self.positions[:, slot], self.valid[:, slot] = positions[:, 0], valid[:, 0]
            self._read = slice(0, self.filled)
            return self.positions[:, : self.filled], self.valid[:, : self.filled]
        # Several tokens: return the kept ones plus all new ones, then keep of the new ones those that still
        # fit: the ones that become sinks and the last `window − sinks` (an earlier one would be overwritten).
        kept = min(start, self.window)
        out = torch.cat([self.positions[:, :kept], positions], 1), torch.cat([self.valid[:, :kept], valid], 1)
        first_recent = max(self.sinks, self.length - (self.window - self.sinks))
        src = [j for j in range(T) if start + j < self.sinks or start + j >= first_recent]
        dst = [self._slot(start + j) for j in src]
        self._src = torch.tensor(src, dtype=torch.long, device=positions.device)
        self._dst = torch.tensor(dst, dtype=torch.long, device=positions.device)
        self.positions[:, self._dst], self.valid[:, self._dst] = positions[:, self._src], valid[:, self._src]
        self._read = slice(0, kept)
        return out

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self._in_place:
            self.store.write(layer, self._dst, k, v)
            return self.store.read(layer, self._read)
        old_k, old_v = self.store.read(layer, self._read)
        out = torch.cat([old_k, self.store.as_stored(k)], 2), torch.cat([old_v, self.store.as_stored(v)], 2)
        self.store.write(layer, self._dst, k[:, :, self._src], v[:, :, self._src])
        return out

    def kept_positions(self) -> torch.Tensor:
        """Positions [B, filled] of the tokens held, in slot order."""
        return self.positions[:, : self.filled]

    def get_state(self, layer: int):
        return None  # only linear attention has a state, and it is refused above

    def set_state(self, layer: int, state) -> None:
        raise ValueError("SlidingKVCache stores keys and values, not a linear-attention state")

    def nbytes(self) -> int:
        """K and V (and int8's scales) of every layer: `window` tokens, whatever the sequence length."""
        return self.store.nbytes()

    def reset(self) -> None:
        self.length = 0
        self.valid.zero_()
