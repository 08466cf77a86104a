"""Prepare a corpus for pretraining: split by group, train or load a tokenizer, write token files.

    lmforge prepare                                   # Python stdlib -> data/python-stdlib, BPE-4096
    lmforge prepare --source text:notes/ --vocab-size 8192 --out data/notes
    lmforge prepare --config configs/data/stdlib.yaml seed=1

or from Python: `run(PrepareConfig(source="jsonl:chats.jsonl"))`. The output folder holds

    train.bin, val.bin   token ids (np.uint16, or uint32 for vocabularies over 65,536), every document
                         followed by <|eos|>; read them with lmforge.data.loader.TokenData
    tokenizer.json       the tokenizer (+ tokenizer_config.json for transformers)
    val_docs.jsonl       the validation documents ({"name", "group", "text"}), to compare against
                         per-file compressors such as xz and gzip
    meta.json            tokens, UTF-8 bytes and documents per split, the groups in val, the source and a
                         sha256 of its contents, Python version, tokenizer kind and size, dtype

The split is by group (a package of the stdlib, a subfolder, a block of jsonl lines), never by file: near
copies inside one package (encodings/cp1250.py ... cp1258.py) would otherwise sit on both sides and make
the validation loss look better than the model is. Groups are ordered by a seeded hash of their name and
taken into val while that brings val closer to `val_fraction` of the bytes. The tokenizer is trained on
the train split only, so val text is unseen by it too.

Everything is held in memory while it is prepared: fine for corpora up to a few GB.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.config import ConfigError, to_dict
from lmforge.data.sources import Document, SourceError, SourceStats, iter_documents
from lmforge.runs import atomic_open, atomic_write_text, check_output_folder

__all__ = ["PrepareConfig", "default_out", "run", "source_hash", "split_by_group", "train_tokenizer"]


@dataclass
class PrepareConfig:
    source: str = "python-stdlib"  # python-stdlib, text:PATH or jsonl:PATH[:FIELD]
    out: str | None = None  # default: data/<slug of source>
    tokenizer: str | None = None  # an existing tokenizer.json (or its folder); None: train one on train
    vocab_size: int = 4096  # for a trained BPE
    split_digits: bool = False  # for a trained BPE: every digit its own token
    tokenizer_kind: Literal["bpe", "char"] = "bpe"
    val_fraction: float = 0.05  # of the corpus's UTF-8 bytes
    seed: int = 0  # picks the val groups
    overwrite: bool = False  # replace the files of an existing output folder

    def validate(self) -> None:
        if not self.source:
            raise ValueError("source must name a corpus: python-stdlib, text:PATH or jsonl:PATH[:FIELD]")
        if self.tokenizer is None and self.tokenizer_kind == "bpe" and not 263 <= self.vocab_size <= 2**32:
            raise ValueError(f"vocab_size must be in [263, 2**32] (bytes + specials), got {self.vocab_size}")
        if not 0 < self.val_fraction <= 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5], got {self.val_fraction}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else default_out(self.source)


def default_out(source: str) -> Path:
    """data/<slug>: python-stdlib -> data/python-stdlib, text:notes/ -> data/text-notes."""
    scheme, _, rest = source.partition(":")
    if rest:
        path, _, field = rest.partition(":") if scheme == "jsonl" else (rest, "", "")
        name = Path(path).stem or Path(path).resolve().name
        slug = f"{scheme}-{name}" + (f"-{field}" if field and field != "text" else "")
    else:
        slug = source
    return Path("data") / (re.sub(r"[^A-Za-z0-9._-]+", "-", slug).strip("-.") or "corpus")


def split_by_group(docs: Sequence[Document], val_fraction: float, seed: int) -> set[str]:
    """The groups that form the validation split (see the module docstring for the rule)."""
    sizes: dict[str, int] = {}
    for doc in docs:
        sizes[doc.group] = sizes.get(doc.group, 0) + len(doc.text.encode())
    if len(sizes) < 2:
        only = next(iter(sizes), "")
        raise SourceError(
            f"all documents are in one group ({only!r}), so train and val cannot be split by group; "
            "use a text file of several lines, a folder with several files or subfolders, or a jsonl with a "
            "'group' field or over 100 lines"
        )

    def rank(group: str) -> bytes:
        return hashlib.sha256(f"{seed}\0{group}".encode()).digest()

    order = sorted(sizes, key=rank)
    target = val_fraction * sum(sizes.values())
    val: set[str] = set()
    val_bytes = 0
    for group in order:
        # Take it if val ends nearer the target with it than without it.
        if val_bytes + sizes[group] / 2 < target:
            val.add(group)
            val_bytes += sizes[group]
    if not val:  # every group is far bigger than the target: take the smallest rather than none
        val.add(min(order, key=lambda g: sizes[g]))
    return val


def run(cfg: PrepareConfig, *, progress: bool | None = None) -> Path:
    """Prepare `cfg.source` into `cfg.out_dir` (see the module docstring); return the folder.

    `progress`: show a progress bar (None: only on a terminal).
    """
    cfg.validate()
    out = check_output_folder(cfg.out_dir, cfg.overwrite, option="prepare --out", flag="--overwrite (overwrite=true)")
    start = time.perf_counter()
    stats = SourceStats()
    docs = list(iter_documents(cfg.source, stats))
    val_groups = split_by_group(docs, cfg.val_fraction, cfg.seed)
    splits = {
        "train": [d for d in docs if d.group not in val_groups],
        "val": [d for d in docs if d.group in val_groups],
    }

    tok_start = time.perf_counter()
    if cfg.tokenizer is not None:
        from lmforge.tokenizer import Tokenizer

        tok = Tokenizer.load(cfg.tokenizer)
    else:
        tok = _train(cfg.tokenizer_kind, (d.text for d in splits["train"]), cfg.vocab_size, cfg.split_digits)
    tok_seconds = time.perf_counter() - tok_start

    import numpy as np

    from lmforge.data.loader import unigram_bpb_of_counts

    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    # Everything is written into a staging folder beside `out` and moved in only once complete, so a run that
    # dies while tokenizing (nearly all of its time) leaves the previous data in `out` whole.
    final, out = out, _staging_folder(out)
    counts, histograms = {}, {}
    for name, split in splits.items():
        histograms[name] = _write_tokens(out / f"{name}.bin", split, tok, dtype, desc=name, progress=progress)
        counts[name] = {
            "docs": len(split),
            "tokens": int(histograms[name].sum()),
            "bytes": sum(len(d.text.encode()) for d in split),
            "groups": len({d.group for d in split}),
        }
    tok.save(out)
    with atomic_open(out / "val_docs.jsonl", "w") as f:
        for d in splits["val"]:
            f.write(json.dumps({"name": d.name, "group": d.group, "text": d.text}, ensure_ascii=False) + "\n")
    meta = {
        "source": cfg.source,
        "source_sha256": source_hash(docs),
        "python_version": platform.python_version(),
        "tokenizer": {
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "split_digits": tok.split_digits,
            "trained_on": "train split" if cfg.tokenizer is None else str(cfg.tokenizer),
        },
        "dtype": np.dtype(dtype).name,
        "eos_id": tok.eos_id,
        "train": counts["train"],
        "val": counts["val"],
        # The floor a model must beat; the same number loader.unigram_bpb computes from the files.
        "unigram_bpb": unigram_bpb_of_counts(histograms["train"], histograms["val"], counts["val"]["bytes"]),
        "val_groups": sorted(val_groups),
        "skipped": {"undecodable": stats.undecodable, "empty": stats.empty},
        "config": to_dict(cfg),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    _install(out, final)
    _print_summary(final, meta, time.perf_counter() - start, tok_seconds)
    return final


def _staging_folder(out: Path) -> Path:
    """A fresh folder beside `out` (same filesystem, so moving files in is a rename); stale ones of dead
    processes are removed."""
    import os
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.prepare-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.prepare-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _install(staging: Path, out: Path) -> None:
    """Move the staged files into `out`, replacing only those (other files in `out` stay). meta.json marks a
    complete folder: the old one goes first and the new one comes last, so the instant of renames in between
    can only leave a folder that TokenData refuses, never one that mixes old and new files."""
    import os

    from lmforge.runs import fsync_dir

    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "meta.json"):
        os.replace(path, out / path.name)
    fsync_dir(out)
    staging.rmdir()


def train_tokenizer(
    source: str,
    vocab_size: int,
    out: str | Path,
    *,
    kind: Literal["bpe", "char"] = "bpe",
    split_digits: bool = False,
    val_fraction: float = 0.05,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Train a tokenizer on the train split of `source` and save it to `out` (a folder or a .json path).

    The split is the one `prepare` makes with the same val_fraction and seed, so a tokenizer made here and
    passed to `lmforge prepare --tokenizer` has not seen the validation text either. A folder that holds
    anything (or a .json path, or the tokenizer_config.json beside it, that exists) is refused unless
    `overwrite`; even then only the tokenizer's two files are replaced, each atomically.
    """
    cfg = PrepareConfig(
        source=source,
        vocab_size=vocab_size,
        split_digits=split_digits,
        tokenizer_kind=kind,
        val_fraction=val_fraction,
        seed=seed,
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_tokenizer_out(Path(out), overwrite)
    start = time.perf_counter()
    docs = list(iter_documents(source))
    val_groups = split_by_group(docs, val_fraction, seed)
    train_docs = [d for d in docs if d.group not in val_groups]
    tok = _train(kind, (d.text for d in train_docs), vocab_size, split_digits)
    path = tok.save(out)
    mb = sum(len(d.text.encode()) for d in train_docs) / 1e6
    seconds = time.perf_counter() - start
    print(f"{tok!r} trained on {len(train_docs)} documents ({mb:.1f} MB) in {seconds:.1f} s")
    print(f"saved {path}")
    return path


def _check_tokenizer_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace what a user has (see train_tokenizer) before any work is done."""
    from lmforge.tokenizer import CONFIG_FILE

    if out.suffix == ".json":
        taken = [p for p in (out, out.parent / CONFIG_FILE) if p.exists()]
        if taken and not overwrite:
            raise FileExistsError(f"{taken[0]} exists; pass --overwrite to replace it, or choose another --out")
        return
    check_output_folder(out, overwrite, option="tokenizer train --out")


def source_hash(docs: Iterable[Document]) -> str:
    """sha256 over every document's name and text, in order: changes when any file of the corpus does."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()


def _train(kind: str, texts: Iterable[str], vocab_size: int, split_digits: bool):
    from lmforge.tokenizer import Tokenizer

    if kind == "char":
        return Tokenizer.train_char(texts)
    return Tokenizer.train_bpe(texts, vocab_size, split_digits=split_digits)


def _write_tokens(path: Path, docs: list[Document], tok, dtype, *, desc: str, progress: bool | None):
    """Encode `docs` (each followed by <|eos|>) into `path`, a flat array of `dtype`.

    Returns how often each token id occurs (length vocab_size)."""
    import numpy as np
    from tqdm import tqdm

    histogram = np.zeros(tok.vocab_size, dtype=np.int64)
    batch = 64  # documents per encode_batch call: big enough for its threads, small for a smooth bar
    bar = tqdm(
        total=sum(len(d.text) for d in docs),
        unit="char",
        unit_scale=True,
        desc=f"tokenize {desc}",
        disable=None if progress is None else not progress,
        leave=False,
    )
    with bar, atomic_open(path, "wb") as f:
        for i in range(0, len(docs), batch):
            chunk = docs[i : i + batch]
            encoded = tok.encode_batch([d.text for d in chunk])
            array = np.concatenate([np.array([*ids, tok.eos_id], dtype=dtype) for ids in encoded])
            f.write(array.tobytes())
            histogram += np.bincount(array, minlength=tok.vocab_size)
            bar.update(sum(len(d.text) for d in chunk))
    return histogram


def _print_summary(out: Path, meta: dict, seconds: float, tok_seconds: float) -> None:
    t = meta["tokenizer"]
    origin = "trained on the train split" if t["trained_on"] == "train split" else "from " + t["trained_on"]
    train, val = meta["train"], meta["val"]
    mb = (train["bytes"] + val["bytes"]) / 1e6
    print(
        f"prepared {out} from {meta['source']} ({train['docs'] + val['docs']} documents, {mb:.1f} MB) "
        f"in {seconds:.1f} s"
    )
    kind = f"{t['kind']}, {t['vocab_size']} tokens, {meta['dtype']}"
    print(f"  tokenizer  {kind} ({origin}, {tok_seconds:.1f} s)")
    for name, s in (("train", train), ("val", val)):
        print(
            f"  {name:<5}  {s['tokens']:>11,} tokens  {s['bytes'] / 1e6:7.2f} MB  "
            f"{s['bytes'] / s['tokens']:.2f} bytes/token  {s['docs']} docs in {s['groups']} groups"
        )
    print(f"  unigram    {meta['unigram_bpb']:.3f} bits/byte on val (token frequencies of train)")
    shown = ", ".join(meta["val_groups"][:12]) + (" ..." if len(meta["val_groups"]) > 12 else "")
    print(f"  val groups {shown}")
    skipped = meta["skipped"]
    if skipped["undecodable"]:
        print(f"  skipped {len(skipped['undecodable'])} files that are not UTF-8 text")
