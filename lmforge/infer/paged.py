"""Paged KV cache (PagedAttention, Kwon et al. 2023): keys and values live in fixed-size blocks of a shared
pool; each sequence owns a block table. Memory is allocated a block at a time, so a sequence wastes at most
block_size − 1 slots, and blocks can be shared:

- the `n` samples of one request share the prompt's blocks (reference counts; a shared block that is written
  to is copied first — copy-on-write);
- automatic prefix caching: every full block is keyed by a hash of its tokens and of everything before it, so
  a later request with the same prefix reuses the blocks instead of recomputing them. Freed blocks keep their
  key until the allocator hands them out again (least recently freed first).

    pool = PagedKVPool(cfg, num_blocks=256)
    seq = PagedSequence(tokens=prompt)
    pool.reserve(seq, len(prompt))                    # block table covers the prompt
    logits = model(ids, cache=pool.batch([seq], [len(prompt)]))
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from lmforge.config import UserError
from lmforge.model import Cache, ModelConfig

from . import kernels
from .kv_cache import KVStore, dequantize_kv


class OutOfBlocks(RuntimeError):
    """The pool has no free block left: the scheduler preempts a sequence and tries again."""


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """Key of a full block: its tokens and (through the parent's key) every token before it."""
    return hash((parent, tokens))


class BlockAllocator:
    """Free list, reference counts and the prefix-cache table of a pool of `num_blocks` blocks."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # least recently freed first
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.hash_of: dict[int, int] = {}  # block id -> its hash, while registered
        self.hits = 0  # blocks served from the prefix cache

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise OutOfBlocks("no free KV block")
        block, _ = self.free.popitem(last=False)
        self._forget(block)  # its old contents are about to be overwritten
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free[block] = None  # still findable by its hash until reallocated
        elif self.refs[block] < 0:
            raise AssertionError(f"block {block} released more often than it was taken")

    def register(self, block: int, key: int) -> None:
        """Make a full block findable by its prefix hash (the first block with a given key wins)."""
        if key not in self.cached and block not in self.hash_of:
            self.cached[key], self.hash_of[block] = block, key

    def lookup(self, key: int) -> int | None:
        """Take a reference to the cached block with this key, reviving it from the free list if needed."""
        block = self.cached.get(key)
        if block is None:
            return None
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1
        self.hits += 1
        return block

    def _forget(self, block: int) -> None:
        key = self.hash_of.pop(block, None)
        if key is not None:
            del self.cached[key]


@dataclass
class PagedSequence:
    """One sequence's view of the pool: its token ids, how many of them have KV stored, its block table."""

    tokens: list[int]
    blocks: list[int] = field(default_factory=list)  # block ids; -1 = freed (outside a sliding window)
    num_cached: int = 0  # tokens whose K/V are in the pool
    hashes: list[int] = field(default_factory=list)  # prefix hash of each full block, in order


class PagedKVPool:
    """The block pool of every layer: K and V as [n_layer, num_blocks·block_size, n_kv_head, head_dim]
    (a flat slot index = block · block_size + offset), in the model's dtype, bf16, or int8 with per-token,
    per-head scales: a slot-major `KVStore`, the storage every cache shares."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, *, block_size: int = 16, dtype=torch.float32,
                 device="cpu", kv_dtype: str | None = None, prefix_caching: bool = True):  # fmt: skip
        if cfg.attention == "linear":
            raise UserError("linear attention keeps a recurrent state, not keys and values, so it cannot use a paged "
                            "cache: use the contiguous cache (--kv contiguous, one sequence)")  # fmt: skip
        self.cfg, self.block_size, self.dtype, self.device = cfg, block_size, dtype, device
        self.store = KVStore(cfg, None, num_blocks * block_size, dtype, device, kv_dtype)
        self.prefix_caching = prefix_caching
        self.allocator = BlockAllocator(num_blocks)
        self._scratch: dict = {}

    @property
    def k(self) -> torch.Tensor:  # [n_layer, slots, n_kv_head, head_dim] in the storage dtype
        return self.store.k

    @property
    def v(self) -> torch.Tensor:
        return self.store.v

    def scratch(self, key, shape: tuple[int, ...], dtype) -> torch.Tensor:
        """A reused buffer for gathered keys or values. Fresh 100 MB tensors every layer of every step cost
        more in page faults than the copy itself (index_select into a new tensor: 28 ms for 61 MB here;
        into a reused one: 5 ms). The previous layer is done with it when the next one gathers."""
        numel = math.prod(shape)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._scratch[key] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel].view(shape)

    @classmethod
    def bytes_per_block(cls, cfg: ModelConfig, block_size: int = 16, dtype=torch.float32, kv_dtype=None) -> int:
        return block_size * KVStore.bytes_per_token(cfg, dtype, kv_dtype)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def nbytes(self) -> int:
        return self.store.nbytes()

    # ---- block tables -------------------------------------------------------------------------------
    def _shared_partial(self, seq: PagedSequence) -> bool:
        """Whether the last block is part-filled and shared (forked samples): writing to it copies it first."""
        return seq.num_cached % self.block_size != 0 and self.allocator.refs[seq.blocks[-1]] > 1

    def blocks_needed(self, seq: PagedSequence, new_tokens: int) -> int:
        """Fresh blocks that appending `new_tokens` would take (a shared last block counts: it is copied)."""
        bs, n = self.block_size, seq.num_cached
        need = -(-(n + new_tokens) // bs) - len(seq.blocks)
        return max(need, 0) + int(new_tokens > 0 and self._shared_partial(seq))

    def fits(self, seq: PagedSequence) -> int:
        """How many more tokens `seq` can take with the blocks free now."""
        bs, n = self.block_size, seq.num_cached
        free = self.allocator.num_free - int(self._shared_partial(seq))  # a shared last block is copied first
        slack = 0 if n % bs == 0 else bs - n % bs
        return free * bs + slack if free >= 0 else 0

    def reserve(self, seq: PagedSequence, new_tokens: int) -> None:
        """Give `seq` room for `new_tokens` more tokens: copy a shared partial last block (copy-on-write),
        then append fresh blocks. Raises OutOfBlocks (leaving `seq` usable) when the pool is exhausted."""
        needed = self.blocks_needed(seq, new_tokens)
        if needed > self.allocator.num_free:
            raise OutOfBlocks(f"{needed} blocks needed, {self.allocator.num_free} free")
        bs = self.block_size
        if new_tokens and self._shared_partial(seq):
            old = seq.blocks[-1]
            new = self.allocator.allocate()
            self._copy_block(old, new)
            self.allocator.release(old)
            seq.blocks[-1] = new
        while len(seq.blocks) * bs < seq.num_cached + new_tokens:
            seq.blocks.append(self.allocator.allocate())

    def attach_prefix(self, seq: PagedSequence) -> int:
        """Reuse cached blocks for the longest cached prefix of `seq.tokens` (a fresh sequence). At least one
        token is left to compute, since the next token's logits are needed. Returns tokens reused."""
        if not self.prefix_caching or seq.blocks:
            return 0
        bs = self.block_size
        parent = None
        for i in range((len(seq.tokens) - 1) // bs):
            key = block_hash(parent, tuple(seq.tokens[i * bs : (i + 1) * bs]))
            block = self.allocator.lookup(key)
            if block is None:
                break
            seq.blocks.append(block)
            seq.hashes.append(key)
            parent = key
        seq.num_cached = len(seq.blocks) * bs
        return seq.num_cached

    def fork(self, seq: PagedSequence) -> PagedSequence:
        """A copy of `seq` sharing all its blocks (the n samples of one prompt)."""
        for b in seq.blocks:
            if b >= 0:
                self.allocator.share(b)
        return PagedSequence(list(seq.tokens), list(seq.blocks), seq.num_cached, list(seq.hashes))

    def free(self, seq: PagedSequence) -> None:
        for b in seq.blocks:
            if b >= 0:
                self.allocator.release(b)
        seq.blocks, seq.num_cached, seq.hashes = [], 0, []

    def free_outside_window(self, seq: PagedSequence, window: int) -> None:
        """Release blocks no future query can see: every token in them is ≥ window positions behind the next
        token (sliding-window models, e.g. Mistral)."""
        next_pos = seq.num_cached
        for i, b in enumerate(seq.blocks):
            if b >= 0 and (i + 1) * self.block_size <= next_pos - window + 1:
                self.allocator.release(b)
                seq.blocks[i] = -1

    def _copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        s, d = slice(src * bs, (src + 1) * bs), slice(dst * bs, (dst + 1) * bs)
        for t in self.store.tensors:
            t[:, d] = t[:, s]

    def _register_full_blocks(self, seq: PagedSequence) -> None:
        bs = self.block_size
        while len(seq.hashes) < seq.num_cached // bs:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else None
            key = block_hash(parent, tuple(seq.tokens[i * bs : (i + 1) * bs]))
            seq.hashes.append(key)
            if self.prefix_caching and seq.blocks[i] >= 0:
                self.allocator.register(seq.blocks[i], key)

    # ---- the cache object the model sees ------------------------------------------------------------
    def batch(self, seqs: list[PagedSequence], new_tokens: list[int]) -> PagedBatch:
        return PagedBatch(self, seqs, new_tokens)


class PagedBatch(Cache):
    """The `lmforge.model.cache.Cache` for one forward over several paged sequences. Row i feeds
    `new_tokens[i]` tokens (right-padded to the longest); their K/V are written into the rows' blocks and
    each row attends to its own stored keys, gathered from the pool (padded keys are marked invalid)."""

    def __init__(self, pool: PagedKVPool, seqs: list[PagedSequence], new_tokens: list[int]):
        self.pool, self.seqs, self.new_tokens = pool, seqs, new_tokens
        self.length = 0  # positions are always passed explicitly by the engine
        bs, dev = pool.block_size, pool.device
        T = max(new_tokens)
        write, tables, k_pos, k_valid = [], [], [], []
        self._write_mask = torch.zeros(len(seqs), T, dtype=torch.bool)
        for row, (seq, n) in enumerate(zip(seqs, new_tokens, strict=True)):
            end = seq.num_cached + n
            first = next((i for i, b in enumerate(seq.blocks) if b >= 0), 0)  # sliding windows free old blocks
            live = seq.blocks[first : -(-end // bs)]
            table = torch.tensor(seq.blocks[: -(-end // bs)], dtype=torch.long)
            pos = torch.arange(seq.num_cached, end)
            write.append(table[pos // bs] * bs + pos % bs)
            self._write_mask[row, :n] = True
            tables.append(live)
            kept = torch.arange(first * bs, (first + len(live)) * bs)
            k_pos.append(kept)
            k_valid.append(kept < end)
        # Gather whole blocks (block_size contiguous tokens per index), not single slots: ~16× fewer, larger
        # copies — per-slot index_select ran at ~2 GB/s here and dominated a decode step of a large batch.
        nb = max(len(t) for t in tables)
        self._blocks = torch.tensor([t + [0] * (nb - len(t)) for t in tables], dtype=torch.long, device=dev)
        self._write_slots = torch.cat(write).to(dev)
        pad = nb * bs
        self.k_pos = torch.stack([torch.nn.functional.pad(p, (0, pad - len(p))) for p in k_pos]).to(dev)
        self.k_valid = torch.stack([torch.nn.functional.pad(v, (0, pad - len(v))) for v in k_valid]).to(dev)
        self._write_mask = self._write_mask.to(dev)
        self._lengths = self._row_offsets = None  # for `attend`, built on its first call

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None):
        return self.k_pos, self.k_valid

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """A decode step (one new token per row, fp32 pool): store k, v and attend through the block tables in
        place (`kernels.decode_attention`, PagedAttention's idea) — no gather of every row's keys into a
        contiguous copy. None otherwise (the model then calls `update`)."""
        if max(self.new_tokens) != 1 or not kernels.attention_applies(q, self.pool.k):
            return None
        self._store(layer, k, v)
        _, _, Hk, D = self.pool.k.shape
        if self._lengths is None:
            self._lengths = torch.tensor([seq.num_cached + 1 for seq in self.seqs])
            self._row_offsets = torch.zeros(len(self.seqs), dtype=torch.long)
        return kernels.decode_attention(q, self.pool.k[layer], self.pool.v[layer], self._lengths,
                                        row_offsets=self._row_offsets, token_stride=Hk * D, head_stride=D,
                                        n_kv_head=Hk, tables=self._blocks, block_size=self.pool.block_size)  # fmt: skip

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        store = self.pool.store
        self._store(layer, k, v)
        return self._gathered(store.k, store.k_scale, layer, k.dtype), self._gathered(store.v, store.v_scale, layer,
                                                                                    v.dtype)  # fmt: skip

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # New tokens to their slots: [B, T, Hk, D] rows selected by the write mask, in row order.
        k_new = k.transpose(1, 2)[self._write_mask]
        v_new = v.transpose(1, 2)[self._write_mask]
        self.pool.store.write(layer, self._write_slots, k_new, v_new)

    def _gathered(self, store, scale, layer, dtype):
        B, nb = self._blocks.shape
        bs = self.pool.block_size
        idx = self._blocks.flatten()
        src = store[layer].view(-1, bs, *store.shape[2:])
        x = self.pool.scratch(id(store), (len(idx), *src.shape[1:]), src.dtype)
        torch.index_select(src, 0, idx, out=x)
        if scale is not None:
            x = dequantize_kv(x, scale[layer].view(-1, bs, *scale.shape[2:]).index_select(0, idx), dtype)
        x = x.to(dtype)  # bf16 storage: attention runs in the model's dtype
        return x.view(B, nb * bs, *x.shape[2:]).transpose(1, 2)  # [B, Hk, Tk, D]

    def commit(self) -> None:
        """After the forward: the new tokens' K/V are stored; full blocks become findable by prefix."""
        for seq, n in zip(self.seqs, self.new_tokens, strict=True):
            seq.num_cached += n
            self.pool._register_full_blocks(seq)

    def get_state(self, layer: int):
        return None

    def set_state(self, layer: int, state) -> None:
        raise ValueError("linear attention cannot use a paged cache")
