"""KV caches implementing `lmforge.model.cache.Cache`: the contiguous, preallocated one, and the storage every
cache here shares — K and V in the model's dtype, in bf16, or in int8 with one scale per token and head.

cache = ContiguousKVCache(model.cfg, batch_size=1, max_len=512)                   # K/V in the model's dtype
cache = ContiguousKVCache(model.cfg, batch_size=1, max_len=512, kv_dtype="int8")  # ≈ 1/4 of fp32's bytes
logits = model(prompt, cache=cache)                  # prefill
logits = model(next_token, cache=cache)              # one step

The others: `sliding.SlidingKVCache` (a window plus attention sinks), `merging.TokenMergingCache` (a fixed
budget of merged entries), `paged` (blocks shared by many sequences).
"""

from __future__ import annotations

import torch

from lmforge.config import UserError
from lmforge.hardware import torch_dtypes
from lmforge.infer import kernels
from lmforge.model import Cache, ModelConfig

KV_DTYPES = torch_dtypes("fp32", "bf16", "fp16", "int8")  # every spelling of what K/V may be stored in


def storage_dtype(kv_dtype: str | torch.dtype | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype K/V are stored in: `kv_dtype` by name ("fp32", "bf16", "fp16", "int8") or torch dtype, None =
    the model's `dtype`."""
    if kv_dtype is None:
        return dtype
    resolved = KV_DTYPES.get(kv_dtype) if isinstance(kv_dtype, str) else kv_dtype
    if resolved not in KV_DTYPES.values():
        raise UserError(f"kv_dtype must be one of {sorted(KV_DTYPES)} (or None: the model's dtype), got {kv_dtype!r}")
    return resolved


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last axis (head_dim): one scale per token and head, scale = amax / 127, so
    x ≈ q · scale with |x − q · scale| ≤ scale / 2. Returns (q int8 like x, scale [..., 1] in x's dtype).

    Per token and head rather than per tensor because K has outlier channels and tokens whose norms differ by
    orders of magnitude; one fp scale per head_dim values costs 4/head_dim bytes per value in fp32."""
    amax = x.detach().abs().amax(-1, keepdim=True).float()
    scale = (amax / 127).to(x.dtype)
    # An all-zero vector (or one whose scale underflows in x's dtype) quantizes to 0 with any scale: use 1.
    scale = scale.masked_fill(scale == 0, 1)
    # Quantize with the scale as stored, so the bound holds for what dequantize_kv reads back.
    q = (x.float() / scale.float()).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q · scale in `dtype` (|q| ≤ 127 is exact in every float dtype, so this rounds once)."""
    return q.to(dtype) * scale.to(dtype)


class KVStore:
    """K and V of every layer in the storage dtype (plus int8's scales, [..., 1] in the model's dtype), read back
    in the model's `dtype`: the one storage of every cache here. Two layouts of a layer's slots:

    - per row (`batch_size` rows): [B, n_kv_head, slots, head_dim] — the contiguous, sliding and merging caches;
    - slot-major (`batch_size=None`): [slots, n_kv_head, head_dim] — the paged pool, whose blocks are runs of
      contiguous slots shared by any row.

    The caches decide which slot holds which token; this only writes and reads slots along the token axis."""

    def __init__(self, cfg: ModelConfig, batch_size: int | None, slots: int, dtype=torch.float32, device="cpu",
                 kv_dtype: str | torch.dtype | None = None):  # fmt: skip
        self.cfg, self.dtype, self.kv_dtype = cfg, dtype, storage_dtype(kv_dtype, dtype)
        self.quantized = self.kv_dtype == torch.int8
        slots = slots if cfg.attention != "linear" else 0  # linear attention keeps a fixed-size state instead
        if batch_size is None:
            layer, self.token_axis = (slots, cfg.n_kv_head, cfg.head_dim), 0
        else:
            layer, self.token_axis = (batch_size, cfg.n_kv_head, slots, cfg.head_dim), 2
        shape = (cfg.n_layer, *layer)
        self.k = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        self.v = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        self.k_scale = self.v_scale = None
        if self.quantized:
            self.k_scale = torch.zeros(shape[:-1] + (1,), dtype=dtype, device=device)
            self.v_scale = torch.zeros(shape[:-1] + (1,), dtype=dtype, device=device)

    @property
    def tensors(self) -> list[torch.Tensor]:
        """K, V and (int8) their scales: what a copy of slots must move."""
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def check_batch(self, positions: torch.Tensor) -> None:
        """One-line error when a forward's batch is not the batch this cache was built for."""
        if positions.shape[0] != self.k.shape[1]:
            raise ValueError(f"cache holds {self.k.shape[1]} sequences, got a batch of {positions.shape[0]}")

    def write(self, layer: int, index, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (n tokens along the layout's token axis: [B, n_kv_head, n, head_dim] per row, [n, n_kv_head,
        head_dim] slot-major) at `index`: a slice, or a LongTensor of n distinct slots."""
        if self.quantized:
            (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)
            self._put(self.k_scale[layer], index, k_scale)
            self._put(self.v_scale[layer], index, v_scale)
        self._put(self.k[layer], index, k)
        self._put(self.v[layer], index, v)

    def _put(self, buffer: torch.Tensor, index, x: torch.Tensor) -> None:
        if isinstance(index, torch.Tensor):
            buffer.index_copy_(self.token_axis, index, x.to(buffer.dtype))
        else:
            buffer[(slice(None),) * self.token_axis + (index,)] = x

    def read(self, layer: int, index) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V at `index` (per-row layout) in the model's dtype (views of the buffer when no conversion is needed)."""
        k, v = self.k[layer][:, :, index], self.v[layer][:, :, index]
        if self.quantized:
            k = dequantize_kv(k, self.k_scale[layer][:, :, index], self.dtype)
            v = dequantize_kv(v, self.v_scale[layer][:, :, index], self.dtype)
        return k.to(self.dtype), v.to(self.dtype)

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """x as it would read back after `write`: what a cache returns for tokens it has not written (yet), so
        attention sees the same values whichever way the tokens were chunked."""
        if self.quantized:
            return dequantize_kv(*quantize_kv(x), self.dtype)
        return x.to(self.kv_dtype).to(self.dtype)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype=torch.float32, kv_dtype: str | torch.dtype | None = None) -> int:
        """Bytes of one token over every layer, K and V, int8's scales (model dtype, one per head) included."""
        stored = storage_dtype(kv_dtype, dtype)
        values = 2 * cfg.n_layer * cfg.kv_dim * stored.itemsize
        scales = 2 * cfg.n_layer * cfg.n_kv_head * dtype.itemsize if stored == torch.int8 else 0
        return values + scales

    def bytes_per_slot(self) -> int:
        """Bytes of one token of one sequence over every layer, K and V, scales included."""
        return self.bytes_per_token(self.cfg, self.dtype, self.kv_dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class ContiguousKVCache(Cache):
    """One preallocated [n_layer, B, n_kv_head, max_len, head_dim] buffer each for K and V: no allocation
    while decoding, memory = max_len × `cfg.kv_bytes_per_token(dtype)` × B. `dtype` is the model's (what
    `update` returns); `kv_dtype` what is stored: None = the same, "bf16", or "int8" (+ per-token scales:
    (1 + 4/head_dim)/4 of fp32's bytes, and `update` returns the dequantized keys and values)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu",
                 kv_dtype: str | torch.dtype | None = None):  # fmt: skip
        self.cfg, self.batch_size, self.max_len = cfg, batch_size, max_len
        self.store = KVStore(cfg, batch_size, max_len, dtype, device, kv_dtype)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.states: list = [None] * cfg.n_layer
        self.length = 0
        self._start = 0
        self.padded = False  # whether any forward passed a validity mask: until then every key is real
        self._row_offsets = None  # where each row's keys start in a layer's buffer, for `attend`
        self._lengths = (-1, None)  # (length, that many keys per row as a tensor), for `attend`

    @property
    def k(self) -> torch.Tensor:  # the stored keys, [n_layer, B, n_kv_head, max_len, head_dim] in kv_dtype
        return self.store.k

    @property
    def v(self) -> torch.Tensor:
        return self.store.v

    @property
    def capacity_tokens(self) -> int:
        return self.max_len

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None):
        self.store.check_batch(positions)
        T = positions.shape[1]
        if self.length + T > self.max_len:
            raise ValueError(
                f"cache full: {self.length} + {T} tokens exceed max_len={self.max_len}; "
                "make the cache longer or the prompt shorter"
            )
        end = self.length + T
        self.positions[:, self.length : end] = positions
        self.valid[:, self.length : end] = True if valid is None else valid
        self._start, self.length = self.length, end
        self.padded = self.padded or valid is not None
        # None = every key is real: the model then needs no mask for a one-token step.
        return self.positions[:, :end], self.valid[:, :end] if self.padded else None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self._start + k.shape[2]
        self.store.write(layer, slice(self._start, end), k, v)
        return self.store.read(layer, slice(0, end))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """Store this step's k, v and attend over the whole row in place (`kernels.decode_attention`), for fp32
        storage without padding; None otherwise (the model then calls `update`)."""
        if self.padded or not kernels.attention_applies(q, self.store.k):
            return None
        self.store.write(layer, slice(self._start, self.length), k, v)
        B, Hk, slots, D = self.store.k.shape[1:]
        if self._row_offsets is None:
            self._row_offsets = torch.arange(B) * (Hk * slots * D)
        if self._lengths[0] != self.length:  # one tensor per step, not per layer
            self._lengths = (self.length, torch.full((B,), self.length))
        return kernels.decode_attention(q, self.store.k[layer], self.store.v[layer], self._lengths[1],
                                        row_offsets=self._row_offsets, token_stride=D, head_stride=slots * D,
                                        n_kv_head=Hk)  # fmt: skip

    def decode_buffers(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """For a fused decode step (`lmforge.infer.fastpath.FusedDecode`), after `begin`: (k, v, slot) = the K and V
        buffers [n_layer, 1, n_kv_head, max_len, head_dim] and the slot of this forward's first token (the others
        follow it), when the cache holds a single unpadded row in fp32; None otherwise."""
        store = self.store
        if self.padded or store.k.dtype != torch.float32 or store.k.shape[1] != 1:
            return None
        return store.k, store.v, self._start

    def get_state(self, layer: int):
        return self.states[layer]

    def set_state(self, layer: int, state) -> None:
        self.states[layer] = state

    def nbytes(self) -> int:
        """K and V (and int8's scales) of every layer: the part that grows with max_len."""
        return self.store.nbytes()

    def reset(self) -> None:
        self.length, self._start, self.states, self.padded = 0, 0, [None] * self.cfg.n_layer, False

    def truncate(self, length: int) -> None:
        """Forget every token after the first `length` (speculative decoding rolls rejected drafts back).
        Recurrent linear-attention state cannot be rolled back."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        if self.cfg.attention == "linear" and length != self.length:
            raise ValueError("linear attention keeps a running state that cannot be truncated")
        self.length = self._start = length
