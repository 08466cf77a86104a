"""Load a model and its tokenizer for inference from whatever the user points at: a run folder (its latest
checkpoint), one checkpoint folder of a run, a Hugging Face folder or a .gguf file.

    model, tok = load_for_inference("runs/tiny")

The loading itself is `lmforge.train.resolve.resolve_model`, the one resolver of every command (weights from
safetensors or GGUF only); this is its (model, tokenizer) form.
"""

from __future__ import annotations

from pathlib import Path


def load_for_inference(path: str | Path):
    """(Transformer in eval mode, tokenizer)."""
    from lmforge.train.resolve import resolve_model

    model, tokenizer, _ = resolve_model(path)
    return model, tokenizer
