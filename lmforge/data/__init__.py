"""Data: corpus sources -> token files -> batches.

    lmforge prepare --source python-stdlib     # writes data/python-stdlib/{train,val}.bin, meta.json, ...

    from lmforge.data import TokenData, sample_batch, eval_batches
    data = TokenData("data/python-stdlib")

Modules: `sources` (iter_documents: python-stdlib, text:PATH, jsonl:PATH[:FIELD]), `prepare` (split by group,
tokenize, write), `loader` (TokenData, sample_batch, eval_batches, unigram_bpb), `commands` (the CLI).
Names are imported lazily, so `import lmforge.data` (done by the CLI to build its help) stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Document": "sources",
    "iter_documents": "sources",
    "PrepareConfig": "prepare",
    "TokenData": "loader",
    "eval_batches": "loader",
    "sample_batch": "loader",
    "unigram_bpb": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lmforge.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lmforge.data' has no attribute {name!r}")
