"""Tokenizers: lmforge's own (`own.py`: byte-level BPE and characters it trains, with its chat format) and an imported
model's own (`imported.py`: its tokenizer.json or GGUF metadata, with its chat template, `chat.py`). Both have one
interface — encode / decode / render_chat / stop_ids / incremental_decoder / save — which the engine and every
stage use.

    tok = load_tokenizer("runs/tiny")          # whichever kind the folder (or tokenizer.json) holds
"""

from __future__ import annotations

from pathlib import Path

from .imported import ImportedTokenizer
from .own import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    CONFIG_FILE,
    END,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    SYSTEM,
    TOKENIZER_FILE,
    USER,
    IncrementalDecoder,
    Tokenizer,
)

__all__ = [
    "ASSISTANT",
    "BOS",
    "CHAT_TEMPLATE",
    "CONFIG_FILE",
    "END",
    "EOS",
    "PAD",
    "SPECIAL_TOKENS",
    "SYSTEM",
    "TOKENIZER_FILE",
    "USER",
    "ImportedTokenizer",
    "IncrementalDecoder",
    "Tokenizer",
    "load_tokenizer",
]


def load_tokenizer(path: str | Path) -> Tokenizer | ImportedTokenizer:
    """The tokenizer in folder `path` (or the tokenizer.json `path`): lmforge's own when it has lmforge's special
    tokens, else the imported model's, with its tokenizer_config.json beside it."""
    import json

    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        return Tokenizer.load(file)  # its one-line FileNotFoundError
    try:
        added = {t.get("content") for t in json.loads(file.read_text(encoding="utf-8")).get("added_tokens") or []}
    except (ValueError, UnicodeDecodeError, AttributeError):
        added = set()
    if set(SPECIAL_TOKENS) <= added or not added:
        return Tokenizer.load(file)
    return ImportedTokenizer.from_folder(file.parent)
