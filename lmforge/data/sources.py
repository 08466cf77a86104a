"""Corpus sources: where the text for pretraining comes from, as a stream of `Document`s.

    for doc in iter_documents("python-stdlib"):        # the default corpus, present on every machine
        print(doc.name, doc.group, len(doc.text))

Sources, named by one string (the `source` field of `lmforge prepare`):

    python-stdlib          every .py file of the running interpreter's standard library, without tests,
                           site-packages or test fixtures (~730 files, ~12 MB on Python 3.11); group =
                           top-level package or module (`json`, `encodings`, `os`)
    text:PATH              every UTF-8 file under a folder (recursively, hidden files and __pycache__
                           skipped); group = the first path component under the folder. Or one UTF-8 file,
                           cut at line boundaries into ~100 consecutive chunks, each its own document and
                           group (`book.txt:120` starts at line 120), so val is whole stretches of the file
    jsonl:PATH[:FIELD]     one document per line from FIELD (default `text`); group = the line's `group`
                           field if present, else line number // 100 (so neighbouring lines stay together)

The group is the unit of the train/val split (see prepare.py): files of one package, which often share
code or are near copies (`encodings/cp*.py`), all land on the same side. Documents come in a fixed,
sorted order. Files that are not valid UTF-8 and empty documents are skipped; pass a `SourceStats` to learn
how many.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import ConfigError

__all__ = ["Document", "SourceError", "SourceStats", "iter_documents", "stdlib_root"]

SOURCES_HELP = "python-stdlib, text:PATH or jsonl:PATH[:FIELD]"

# Folders and files of the stdlib that hold tests, test fixtures, build scripts or third-party code, not
# the library itself. (__hello__ and __phello__ are fixtures for the frozen-module tests.)
_STDLIB_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "__phello__",
}
_STDLIB_SKIP_FILES = {"__hello__.py"}
_JSONL_GROUP_LINES = 100
_TEXT_FILE_CHUNKS = 100


class SourceError(ConfigError):
    """A source that cannot be read as asked (bad spec, empty input, malformed line): one line to the user."""


@dataclass(frozen=True)
class Document:
    name: str  # where it came from: a relative path, or "file.jsonl:12"
    text: str
    group: str  # split unit: documents of one group go to the same split


@dataclass
class SourceStats:
    """Filled in while iterating: what was skipped, so the caller can report it."""

    undecodable: list[str] = field(default_factory=list)
    empty: int = 0


def iter_documents(source: str = "python-stdlib", stats: SourceStats | None = None) -> Iterator[Document]:
    """Yield the documents of `source` (see the module docstring) in a deterministic order.

    Raises FileNotFoundError for a missing path and SourceError for an unknown source or no documents.
    """
    stats = stats if stats is not None else SourceStats()
    scheme, _, rest = source.partition(":")
    if source == "python-stdlib":
        docs = _stdlib(stats)
    elif scheme == "text" and rest:
        docs = _text(Path(rest), stats)
    elif scheme == "jsonl" and rest:
        docs = _jsonl(rest, stats)
    else:
        raise SourceError(f"unknown source {source!r}; use {SOURCES_HELP}")
    count = 0
    for doc in docs:
        if not doc.text:
            stats.empty += 1
            continue
        count += 1
        yield doc
    if count == 0:
        raise SourceError(f"source {source!r} holds no non-empty UTF-8 documents; point it at some text")


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib(stats: SourceStats) -> Iterator[Document]:
    root = stdlib_root()
    for path in _walk(root, _STDLIB_SKIP_DIRS):
        rel = path.relative_to(root)
        if path.suffix != ".py" or path.name.startswith("test_") or path.name in _STDLIB_SKIP_FILES:
            continue
        if rel.parts[0].startswith("config-"):  # config-3.11-<platform>/: the build's Makefile and scripts
            continue
        # pydoc_data/topics.py is one big dict of documentation prose; it stays in on purpose.
        text = _read_utf8(path, rel.as_posix(), stats)
        if text is not None:
            yield Document(rel.as_posix(), text, rel.parts[0].removesuffix(".py"))


def _text(path: Path, stats: SourceStats) -> Iterator[Document]:
    if not path.exists():
        raise FileNotFoundError(f"text source not found: {path} (give a UTF-8 file or a folder of them)")
    if path.is_file():
        text = _read_utf8(path, path.name, stats)
        if text is not None:
            yield from _chunks(path.name, text)
        return
    for file in _walk(path, {"__pycache__"}):
        rel = file.relative_to(path)
        text = _read_utf8(file, rel.as_posix(), stats)
        if text is not None:
            yield Document(rel.as_posix(), text, rel.parts[0])


def _jsonl(spec: str, stats: SourceStats) -> Iterator[Document]:
    # PATH may itself contain ':'; only a last part that leaves an existing file behind is a field name.
    path, key = Path(spec), "text"
    head, sep, tail = spec.rpartition(":")
    if sep and not path.is_file() and Path(head).is_file():
        path, key = Path(head), tail
    if not path.is_file():
        raise FileNotFoundError(f"jsonl source not found: {path} (one JSON object per line, text in '{key}')")
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().split("\n")
        except UnicodeDecodeError as e:
            raise SourceError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    index = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}:{number}: not a JSON line ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise SourceError(f"{path}:{number}: expected an object with a string field '{key}'")
        group = record.get("group")
        group = str(group) if group is not None else str(index // _JSONL_GROUP_LINES)
        yield Document(f"{path.name}:{number}", record[key], group)
        index += 1


def _chunks(name: str, text: str) -> Iterator[Document]:
    """One file as ~_TEXT_FILE_CHUNKS documents of consecutive whole lines, each its own group.

    A single file is one group otherwise, which a split by group cannot divide. Chunks do not overlap, so no
    line is on both sides of the split; a file of one line stays one document."""
    parts = text.split("\n")  # "\n" only, so that chunk names count lines as an editor does
    lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    if len(lines) < 2:
        yield Document(name, text, name)
        return
    target = len(text) / _TEXT_FILE_CHUNKS
    start, size = 0, 0
    for i, line in enumerate(lines):
        size += len(line)
        if size >= target or i == len(lines) - 1:
            where = f"{name}:{start + 1}"
            yield Document(where, "".join(lines[start : i + 1]), where)
            start, size = i + 1, 0


def _walk(root: Path, skip_dirs: set[str]) -> Iterator[Path]:
    """Files under `root` in sorted order, skipping hidden entries and `skip_dirs`.

    Symlinked folders are not entered: a link loop would otherwise recurse forever."""
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.name not in skip_dirs and not entry.is_symlink():
                yield from _walk(entry, skip_dirs)
        elif entry.is_file():
            yield entry


def _read_utf8(path: Path, name: str, stats: SourceStats) -> str | None:
    data = path.read_bytes()
    # NUL bytes mark binary files (images, .pyc) that happen to decode.
    if b"\0" in data:
        stats.undecodable.append(name)
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.undecodable.append(name)
        return None
