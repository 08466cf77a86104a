"""The cache protocol: what `Transformer.forward(..., cache=...)` asks of a KV cache.

The model never decides how keys and values are stored: an object implementing `Cache` is passed in
(`lmforge.infer` ships the implementations: contiguous, paged, int8, sliding, token merging). Per forward
the model calls `begin` once with the new tokens' positions, then, per layer, `attend` (one new token per row)
or `update` (then `logit_bias`). Implementations subclass `Cache` to inherit the defaults of the two optional
methods (`attend`: None, `logit_bias`: None), or define every method themselves.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Cache(Protocol):
    length: int  # tokens stored so far; new tokens default to positions length, length + 1, ...

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Record the new tokens' positions [B, T] (long) and validity [B, T] (bool, None = all real).

        Returns positions and validity [B, Tk] of every key the new tokens may attend to (past and new,
        in storage order; the model masks by position, so order only matters for `linear`). Validity may be
        None when every key is real: a one-token step then runs without a mask."""
        ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys and values [B, n_kv_head, T, head_dim] for `layer` and return all of
        them, [B, n_kv_head, Tk, head_dim], aligned with what `begin` returned."""
        ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """For one new token per row ([B, H, 1, head_dim] queries) under the dense causal pattern (sdpa, no window,
        no bias): store k, v as `update` would and return the attention output [B, H, 1, head_dim] over every
        stored key of each row — or return None, storing nothing, and the model calls `update` and attends
        itself. `lmforge.infer`'s contiguous and paged caches read the keys in place with a kernel."""
        return None

    def logit_bias(self, layer: int) -> torch.Tensor | None:
        """An additive bias on the attention logits of the keys the last `update(layer, ...)` returned,
        broadcastable to [B, n_head, T, Tk] (e.g. [B, 1, 1, Tk]), added to any position bias; None = no bias.
        `lmforge.infer.merging` returns log(count) of merged entries (proportional attention)."""
        return None

    def get_state(self, layer: int) -> Any | None:
        """Recurrent state of a `linear` attention layer (None before the first token)."""
        ...

    def set_state(self, layer: int, state: Any) -> None: ...
