"""Load a model and its tokenizer for inference from whatever the user points at: a run folder (its latest
checkpoint), one checkpoint folder of a run, or a Hugging Face folder written by `lmforge export`.

    model, tok = load_for_inference("runs/tiny")

The loading itself is `lmforge.train.artifacts.load_run_model`, the one loader of every command (weights from
safetensors only); this is its (model, Tokenizer) form.
"""

from __future__ import annotations

from pathlib import Path


def load_for_inference(path: str | Path):
    """(Transformer in eval mode, Tokenizer)."""
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.artifacts import load_run_model

    model, tok_path, _ = load_run_model(path)
    return model, Tokenizer.load(tok_path)
