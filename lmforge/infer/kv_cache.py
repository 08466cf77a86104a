"""KV caches implementing `lmforge.model.cache.Cache`. First: the contiguous, preallocated one.

cache = ContiguousKVCache(model.cfg, batch_size=1, max_len=512)
logits = model(prompt, cache=cache)                  # prefill
logits = model(next_token, cache=cache)              # one step
"""

from __future__ import annotations

import torch

from lmforge.model import ModelConfig


class ContiguousKVCache:
    """One preallocated [n_layer, B, n_kv_head, max_len, head_dim] buffer each for K and V: no allocation
    while decoding, memory = max_len × `cfg.kv_bytes_per_token(dtype)` × B."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        self.cfg, self.batch_size, self.max_len = cfg, batch_size, max_len
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        stores_kv = cfg.attention != "linear"  # linear attention keeps a fixed-size state instead
        self.k = torch.zeros(shape if stores_kv else (0,), dtype=dtype, device=device)
        self.v = torch.zeros(shape if stores_kv else (0,), dtype=dtype, device=device)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.states: list = [None] * cfg.n_layer
        self.length = 0
        self._start = 0

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None):
        B, T = positions.shape
        if B != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} sequences, got a batch of {B}")
        if self.length + T > self.max_len:
            raise ValueError(
                f"cache full: {self.length} + {T} tokens exceed max_len={self.max_len}; "
                "make the cache longer or the prompt shorter"
            )
        end = self.length + T
        self.positions[:, self.length : end] = positions
        self.valid[:, self.length : end] = True if valid is None else valid
        self._start, self.length = self.length, end
        return self.positions[:, :end], self.valid[:, :end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self._start + k.shape[2]
        self.k[layer, :, :, self._start : end] = k
        self.v[layer, :, :, self._start : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def get_state(self, layer: int):
        return self.states[layer]

    def set_state(self, layer: int, state) -> None:
        self.states[layer] = state

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def reset(self) -> None:
        self.length, self._start, self.states = 0, 0, [None] * self.cfg.n_layer

    def truncate(self, length: int) -> None:
        """Forget every token after the first `length` (speculative decoding rolls rejected drafts back).
        Recurrent linear-attention state cannot be rolled back."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        if self.cfg.attention == "linear" and length != self.length:
            raise ValueError("linear attention keeps a running state that cannot be truncated")
        self.length = self._start = length
