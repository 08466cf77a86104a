"""What a finished model is used for: sample from it, evaluate it, export it to HF. Every MODEL is taken through
`lmforge.train.resolve.resolve_model` (a run, a checkpoint, an HF folder or a .gguf file).

lmforge sample runs/demo --prompt "def fibonacci(n):" --max-new-tokens 120
lmforge eval runs/demo                       # val loss and bits per byte on the run's data
lmforge export --to hf runs/demo --out exports/demo
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.config import ConfigError

from .pretrain import evaluate_lm
from .resolve import resolve_model


def sample(run: str | Path, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 50, seed: int = 0, stream: bool = True) -> str:  # fmt: skip
    """Continue `prompt` with the run's model; prints tokens as they come when `stream`."""
    from lmforge.infer.generate import generate_stream
    from lmforge.infer.replies import fit_to_context

    model, tok, _ = resolve_model(run)
    ids = tok.encode(prompt)
    max_new_tokens = fit_to_context(model.cfg, len(ids), max_new_tokens)  # a continuation stops at the context
    decoder = tok.incremental_decoder()
    pieces = []
    for token in generate_stream(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0,
                                 seed=seed, stop_ids=tok.stop_ids, vocab_size=tok.vocab_size):  # fmt: skip
        if token in tok.stop_ids:
            break
        text = decoder.feed(token)
        pieces.append(text)
        if stream:
            print(text, end="", flush=True)
    tail = decoder.flush()
    pieces.append(tail)
    if stream:
        print(tail, flush=True)
    return "".join(pieces)


def evaluate(run: str | Path, data: str | None = None, batches: int = 0, batch_size: int = 16) -> dict[str, float]:
    """Val loss (nats/token) and bits per byte of the run's model on `data` (default: the run's own data)."""
    from lmforge.data.loader import TokenData

    from .distributed import environment

    model, _, config = resolve_model(run)
    if not (data or config.data):
        raise ConfigError(f"{run} is a Hugging Face folder, which names no data: give --data (a prepared folder)")
    token_data = TokenData(data or config.data)
    with torch.no_grad():
        return evaluate_lm(model, token_data, seq_len=model.cfg.max_seq_len, batch_size=batch_size,
                           max_batches=batches or None, env=environment())  # fmt: skip


def evaluate_text(model_path: str | Path, text_file: str | Path, *, ctx: int | None = None) -> dict:
    """Perplexity of a model on a text file, tokenized by the model's own tokenizer (BOS first where the tokenizer
    adds one), cut into back-to-back windows of `ctx` tokens (default: the model's context), each scored on its
    own: exp of the mean next-token NLL over every predicted token. The same windows fed to HF give the same
    figure (tests/train/test_resolve.py)."""
    import math

    from lmforge.config import UserError

    path = Path(text_file)
    if not path.is_file():
        raise FileNotFoundError(f"--text {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--text {path} is not UTF-8 text") from None
    model, tok, _ = resolve_model(model_path)
    ctx = ctx or model.cfg.max_seq_len
    if not 2 <= ctx <= model.cfg.max_seq_len:
        raise UserError(f"--ctx must be in [2, {model.cfg.max_seq_len}] (the model's context), got {ctx}")
    ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(text)
    if len(ids) < 2:
        raise UserError(f"--text {path} holds fewer than 2 tokens: nothing to predict")
    total, count, windows = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, ctx):
            window = torch.tensor([ids[start : start + ctx]])
            if window.shape[1] < 2:
                break
            logits = model(window).float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
            total, count, windows = total + float(nll), count + window.shape[1] - 1, windows + 1
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "windows": windows, "ctx": ctx}


def export(run: str | Path, to: str, out: str | Path, *, overwrite: bool = False, quantize: str = "f32") -> Path:
    """Write the run's model as a Hugging Face folder (safetensors weights, config, tokenizer, generation config)
    or, `to="gguf"`, as a llama.cpp file (`lmforge.model.gguf_export`, weights `quantize`d f32 | f16 | q8_0).

    A non-empty `out` folder (an existing `out` file) is refused unless `overwrite`; for a folder only the files
    written here are replaced (anything else in `out` stays), each through a temporary folder beside `out` and a
    rename (`save_hf`); a GGUF file is written beside `out` and renamed over it."""
    if to == "gguf":
        from lmforge.model.gguf_export import save_gguf

        out = Path(out)
        if out.is_dir() or (out.exists() and not overwrite):
            raise ConfigError(f"export --out {out} exists: give a new file name, or --overwrite to replace it")
        model, tok, _ = resolve_model(run)
        return save_gguf(model, tok, out, quantize)
    if to != "hf":
        raise ConfigError(f"export --to {to!r}: choose hf or gguf")
    from lmforge.model.hf_export import save_hf
    from lmforge.runs import atomic_write_text, check_output_folder

    out = check_output_folder(out, overwrite, option="export --out")
    model, tok, _ = resolve_model(run)
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_ids), "pad_token_id": tok.pad_id,
                  "do_sample": True, "temperature": 0.8, "top_k": 50, "max_new_tokens": 256}  # fmt: skip

    def tokenizer_and_generation(tmp: Path) -> None:
        tok.save(tmp)  # tokenizer.json, with tokenizer_config.json naming the special tokens
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2))

    return save_hf(model, out, overwrite=True, extra=tokenizer_and_generation)
