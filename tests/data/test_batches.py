"""lmforge.data.loader: batches are pure functions, ranks and micro-steps partition them, eval covers all."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmforge.data.loader import TokenData, eval_batches, sample_batch, unigram_bpb

# Token i of the split is i (mod 2**16): every window shows where it came from.
N = 5_000
TOKENS = np.arange(N, dtype=np.uint16)


def write_data(folder, train, val, vocab_size, val_bytes=None, dtype="uint16"):
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(train, dtype=dtype).tofile(folder / "train.bin")
    np.asarray(val, dtype=dtype).tofile(folder / "val.bin")
    meta = {
        "dtype": dtype,
        "eos_id": 1,
        "tokenizer": {"kind": "bpe", "vocab_size": vocab_size},
        "train": {"tokens": len(train), "bytes": 4 * len(train)},
        "val": {"tokens": len(val), "bytes": val_bytes if val_bytes is not None else 4 * len(val)},
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_windows_are_consecutive_tokens_and_targets_shift_by_one():
    x, y = sample_batch(TOKENS, 3, batch_size=8, seq_len=16, seed=0)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 15, dtype=torch.long))
    assert torch.equal(y, x + 1)
    assert int(x.min()) >= 0 and int(y.max()) <= N - 1


def test_batches_are_pure_functions_of_their_arguments():
    a = sample_batch(TOKENS, 7, batch_size=4, seq_len=8, seed=1)
    b = sample_batch(TOKENS, 7, batch_size=4, seq_len=8, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], sample_batch(TOKENS, 8, batch_size=4, seq_len=8, seed=1)[0])
    assert not torch.equal(a[0], sample_batch(TOKENS, 7, batch_size=4, seq_len=8, seed=2)[0])


def test_ranks_and_micro_steps_partition_the_global_batch():
    def batch(**kwargs):
        return sample_batch(TOKENS, 5, batch_size=24, seq_len=8, seed=3, **kwargs)

    full_x, full_y = batch()
    pieces = [batch(rank=r, world_size=3, micro=m, n_micro=4) for r in range(3) for m in range(4)]
    assert all(x.shape == (2, 8) for x, _ in pieces)
    assert torch.equal(torch.cat([x for x, _ in pieces]), full_x)
    assert torch.equal(torch.cat([y for _, y in pieces]), full_y)
    # k micro-batches of B/k rows on one rank are exactly the rows of one batch of B.
    assert torch.equal(torch.cat([batch(micro=m, n_micro=4)[0] for m in range(4)]), full_x)
    # Ranks see disjoint rows that together make the global batch.
    assert torch.equal(torch.cat([batch(rank=r, world_size=3)[0] for r in range(3)]), full_x)


def test_sample_batch_refuses_bad_arguments():
    with pytest.raises(ValueError, match="does not split"):
        sample_batch(TOKENS, 0, batch_size=10, seq_len=8, seed=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        sample_batch(TOKENS, 0, batch_size=8, seq_len=8, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="too few"):
        sample_batch(TOKENS[:8], 0, batch_size=2, seq_len=8, seed=0)
    x, _ = sample_batch(TOKENS[:9], 0, batch_size=2, seq_len=8, seed=0)  # exactly one window fits
    assert x[0, 0] == 0 and x[1, 0] == 0


def collect(**kwargs):
    return list(eval_batches(TOKENS, **kwargs))


def test_eval_windows_cover_the_split_without_overlap():
    seq_len, batch = 64, 5
    batches = collect(batch_size=batch, seq_len=seq_len)
    n_windows = (N - 1) // seq_len
    assert len(batches) == math.ceil(n_windows / batch)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (n_windows, seq_len)
    assert torch.equal(x.flatten(), torch.arange(n_windows * seq_len))  # in order, each token once
    assert torch.equal(y.flatten(), torch.arange(1, n_windows * seq_len + 1))
    again = collect(batch_size=batch, seq_len=seq_len)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, batches))
    assert len(collect(batch_size=batch, seq_len=seq_len, max_batches=3)) == 3


def test_eval_batches_shard_across_ranks():
    seq_len, batch, world = 32, 8, 4
    whole = collect(batch_size=batch, seq_len=seq_len)
    ranks = [collect(batch_size=batch, seq_len=seq_len, rank=r, world_size=world) for r in range(world)]
    counts = {len(r) for r in ranks}
    assert len(counts) == 1  # every rank runs the same number of forwards
    shapes = {tuple(b[0].shape) for r in ranks for b in r}
    for i in range(len(ranks[0])):
        assert len({tuple(r[i][0].shape) for r in ranks}) == 1
        rows = torch.cat([r[i][0] for r in ranks])
        assert torch.equal(rows, whole[i][0][: len(rows)])  # rank r holds the r-th slice of batch i
    assert (batch // world, seq_len) in shapes
    covered = torch.cat([b[0] for r in ranks for b in r]).flatten().sort().values
    n_windows = (N - 1) // seq_len
    assert len(covered) >= (n_windows - world + 1) * seq_len  # at most world - 1 windows trimmed
    assert len(set(covered.tolist())) == len(covered)  # no overlap between ranks


def test_token_data_reads_what_was_written(tmp_path):
    folder = write_data(tmp_path / "d", train=[1, 2, 3, 2], val=[2, 3], vocab_size=4, val_bytes=10)
    data = TokenData(folder)
    assert isinstance(data.train, np.memmap) and data.train.tolist() == [1, 2, 3, 2]
    assert data.val.tolist() == [2, 3] and data.vocab_size == 4 and data.eos_id == 1
    assert data.tokenizer_path == folder / "tokenizer.json"
    assert data.bytes_per_token("val") == 5.0 and data.bytes_per_token("train") == 4.0


def test_unigram_bpb_is_add_one_smoothed_cross_entropy_per_byte(tmp_path):
    data = TokenData(write_data(tmp_path / "d", train=[1, 2, 3, 2], val=[2, 3, 0], vocab_size=4, val_bytes=6))
    # counts + 1 over a vocabulary of 4: p = [1, 2, 3, 2] / 8
    expected = -(math.log2(3 / 8) + math.log2(2 / 8) + math.log2(1 / 8)) / 6
    assert unigram_bpb(data) == pytest.approx(expected)


def test_token_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="lmforge prepare"):
        TokenData(tmp_path / "none")
    folder = write_data(tmp_path / "d", train=[1, 2, 3], val=[], vocab_size=4)
    assert len(TokenData(folder).val) == 0
    (folder / "train.bin").write_bytes(b"\0" * 4)
    with pytest.raises(ValueError, match="damaged or cut short"):
        TokenData(folder)
