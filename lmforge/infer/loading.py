"""Load a model and its tokenizer for inference from whatever the user points at: a run folder (its latest
checkpoint), one checkpoint folder of a run, or a Hugging Face folder written by `lmforge export`.

    model, tok = load_for_inference("runs/tiny")
"""

from __future__ import annotations

from pathlib import Path

from lmforge.tokenizer import Tokenizer


def load_for_inference(path: str | Path):
    """(Transformer in eval mode, Tokenizer)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a run folder (runs/NAME), a checkpoint or an HF folder")
    if (path / "config.json").is_file():  # an HF folder
        from lmforge.model.hf import from_hf

        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json: export it with `lmforge export`")
        return from_hf(path).eval(), Tokenizer.load(path / "tokenizer.json")
    from lmforge.train.artifacts import load_run_model

    step = None
    if path.parent.name == "checkpoints" and path.name.startswith("step_"):  # runs/NAME/checkpoints/step_000720
        step, path = int(path.name.removeprefix("step_")), path.parent.parent
    model, tok_path, _ = load_run_model(path, step)
    return model, Tokenizer.load(tok_path)
