"""Reading prepared token files: the only way training and evaluation get their tokens.

    data = TokenData("data/python-stdlib")           # made by `lmforge prepare`
    x, y = sample_batch(data.train, step, batch_size=32, seq_len=256, seed=0,
                        rank=rank, world_size=world, micro=k, n_micro=accum)
    for x, y in eval_batches(data.val, batch_size=32, seq_len=256, max_batches=20):
        ...
    bpb = loss_nats / math.log(2) / data.bytes_per_token("val")

Batches are pure functions of their arguments, with no loader state to checkpoint: resuming at step s
draws exactly the batch the uninterrupted run drew, on any number of processes. The optimizer step owns one
global batch of `batch_size` windows; it is cut into `world_size * n_micro` equal slices, one per
(rank, micro-step), so ranks never share a row and k micro-batches of B/k rows are exactly one batch of B.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lmforge.config import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["TokenData", "eval_batches", "sample_batch", "unigram_bpb", "unigram_bpb_of_counts"]


class TokenData:
    """A prepared data folder: `.train`, `.val` token arrays (read-only np.memmap), `.meta` (meta.json)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            hint = f"run `lmforge prepare --out {self.folder}`"
            raise FileNotFoundError(f"no prepared data in {self.folder} (meta.json missing); {hint}")
        try:
            self.meta: dict = json.loads(meta_path.read_text(encoding="utf-8"))
            self.dtype = np.dtype(self.meta["dtype"])
            for split in ("train", "val"):
                int(self.meta[split]["tokens"])
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
            raise UserError(
                f"{meta_path} is damaged ({type(e).__name__}: {e}); run `lmforge prepare --out {self.folder} "
                "--overwrite` again"
            ) from None
        self.train = self._open("train")
        self.val = self._open("val")

    def _open(self, split: str) -> np.ndarray:
        path = self.folder / f"{split}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; run `lmforge prepare` again for {self.folder}")
        expected = self.meta[split]["tokens"] * self.dtype.itemsize
        if path.stat().st_size != expected:
            size = path.stat().st_size
            raise UserError(
                f"{path} holds {size} bytes, meta.json expects {expected}: the data is damaged or cut short; "
                f"run `lmforge prepare --out {self.folder} --overwrite` again"
            )
        if expected == 0:  # np.memmap refuses empty files
            return np.empty(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / "tokenizer.json"

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes of text per token (<|eos|> counted as a token): bpb = nats/token / ln 2 / this."""
        s = self.meta[split]
        return s["bytes"] / s["tokens"]

    def __repr__(self) -> str:
        return f"TokenData({str(self.folder)!r}, train={len(self.train):,}, val={len(self.val):,} tokens)"


def sample_batch(
    tokens: np.ndarray,
    step: int,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    micro: int = 0,
    n_micro: int = 1,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(x, y), each (batch_size / (world_size * n_micro), seq_len): this rank's micro-slice of the batch.

    The global batch of step `step` is `batch_size` random windows of seq_len + 1 consecutive tokens, their
    starts drawn from np.random.default_rng([seed, step]); y is x shifted by one token.
    """
    parts = world_size * n_micro
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if not (0 <= rank < world_size and 0 <= micro < n_micro):
        got = f"got rank {rank} of {world_size}, micro {micro} of {n_micro}"
        raise ValueError(f"need 0 <= rank < world_size and 0 <= micro < n_micro, {got}")
    if batch_size % parts:
        raise ValueError(f"batch_size {batch_size} does not split into world_size * n_micro = {parts} slices")
    if len(tokens) < seq_len + 1:
        raise UserError(
            f"{len(tokens)} tokens are too few for one window of seq_len + 1 = {seq_len + 1}: use more data or "
            "a smaller model.max_seq_len"
        )
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be >= 0, got {step} and {seed}")
    rng = np.random.default_rng([seed, step])
    # The whole global batch is drawn on every rank (cheap), so a slice does not depend on who draws it.
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    rows = batch_size // parts
    part = rank * n_micro + micro
    return _windows(tokens, starts[part * rows : (part + 1) * rows], seq_len)


def eval_batches(
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.LongTensor, torch.LongTensor]]:
    """Consecutive, non-overlapping windows over `tokens`, in order: every run evaluates the same tokens.

    Window i predicts tokens[i*seq_len + 1 : (i+1)*seq_len + 1]. `batch_size` is global, as in
    sample_batch: each batch of windows is split into `world_size` equal slices and this rank gets one.
    Every rank yields the same number of batches of the same shape (a sharded model needs every rank in
    every forward), so a final short batch is trimmed to a multiple of world_size windows; with one
    process every whole window is used.
    """
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got {rank}/{world_size}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} does not split into world_size = {world_size} slices")
    n_windows = (len(tokens) - 1) // seq_len if len(tokens) > seq_len else 0
    n_batches = math.ceil(n_windows / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        first = b * batch_size
        rows = min(batch_size, n_windows - first) // world_size
        if rows == 0:
            return
        starts = (first + rank * rows + np.arange(rows)) * seq_len
        yield _windows(tokens, starts, seq_len)


def unigram_bpb(data: TokenData) -> float:
    """Bits per UTF-8 byte of val under the train split's token frequencies (add-one smoothed).

    The floor any model should beat: what knowing only how common each token is buys.
    """
    vocab = data.vocab_size
    train_counts = np.bincount(data.train, minlength=vocab)
    val_counts = np.bincount(data.val, minlength=vocab)
    return unigram_bpb_of_counts(train_counts, val_counts, data.meta["val"]["bytes"])


def unigram_bpb_of_counts(train_counts: np.ndarray, val_counts: np.ndarray, val_bytes: int) -> float:
    """`unigram_bpb` from token counts (index = token id, one entry per vocabulary token)."""
    p = np.asarray(train_counts, dtype=np.float64) + 1.0
    log2_p = np.log2(p / p.sum())
    return float(-(np.asarray(val_counts, dtype=np.float64) * log2_p).sum() / val_bytes)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    # torch is imported here, not at the top, so prepare (and the CLI) can read token files without it.
    import torch

    # Fancy indexing reads only the windows' pages of a memmap, and copies them into one int64 array.
    w = np.asarray(tokens)[np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1)]
    w = torch.from_numpy(w.astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()
