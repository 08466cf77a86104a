"""What a finished run is used for: load its model, sample from it, evaluate it, export it to HF.
`load_run_model` is the one loader of every command that takes a model from the user.

lmforge sample runs/demo --prompt "def fibonacci(n):" --max-new-tokens 120
lmforge eval runs/demo                       # val loss and bits per byte on the run's data
lmforge export --to hf runs/demo --out exports/demo
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.config import ConfigError
from lmforge.model import Transformer
from lmforge.runs import RunDir

from .checkpoint import STEP_DIR, checkpoint_dirs, latest_checkpoint, load_weights
from .pretrain import PretrainConfig, evaluate_lm


def load_run_model(
    path: str | Path, step: int | None = None, build=Transformer
) -> tuple[Transformer, Path, PretrainConfig]:
    """The one loader of every command that takes a model from the user (sample, generate, eval, export, a later
    stage's base= or init=, a rater): (model in eval mode, its tokenizer.json, its config).

    `path` is a run folder (its latest checkpoint, or the one of `step`), one checkpoint folder of a run
    (runs/NAME/checkpoints/step_000720), or a Hugging Face folder (config.json + safetensors, e.g. written by
    `lmforge export`). Weights load through safetensors only (`load_weights`, `from_hf`): nothing the user
    points at is unpickled. `build(model_config)` makes the module the checkpoint holds (a reward model wraps
    the Transformer)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a run folder (runs/NAME), one of its checkpoints "
                                "(runs/NAME/checkpoints/step_NNNNNN) or a Hugging Face folder")  # fmt: skip
    if (path / "config.json").is_file():
        return _load_hf_folder(path, build)
    ckpt = None
    if path.parent.name == "checkpoints" and STEP_DIR.match(path.name):  # runs/NAME/checkpoints/step_000720
        ckpt, path = path, path.parent.parent
    run_dir = RunDir.open(path)
    config = pretrain_view(run_dir)
    model = build(config.model)
    verified = ckpt is None and step is None  # latest_checkpoint hashes every file of the one it returns
    if ckpt is None:
        ckpt = run_dir.checkpoints / f"step_{step:06d}" if step is not None else latest_checkpoint(run_dir.checkpoints)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir.checkpoints}: train the run first, or give another run "
                                "or one checkpoint folder (runs/NAME/checkpoints/step_NNNNNN)")  # fmt: skip
    if not ckpt.is_dir():
        have = ", ".join(p.name for p in checkpoint_dirs(run_dir.checkpoints)) or "none"
        raise FileNotFoundError(f"{ckpt} is not a checkpoint of {run_dir.path} (it has: {have})")
    try:
        load_weights(ckpt, model, verified=verified)
    except RuntimeError as e:  # the run holds another kind of model: say which, in one line
        raise ConfigError(_other_model(run_dir.path, model, str(e))) from None
    model.eval()
    return model, run_dir.path / "tokenizer.json", config


def _load_hf_folder(path: Path, build) -> tuple[Transformer, Path, PretrainConfig]:
    from lmforge.model.hf import from_hf

    if build is not Transformer:
        raise ConfigError(f"{path} is a Hugging Face language model folder: give a run of the stage this needs")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json: export it with `lmforge export`")
    model = from_hf(path).eval()
    return model, path / "tokenizer.json", PretrainConfig(model=model.cfg, data="")


def _other_model(run: Path, model: torch.nn.Module, error: str) -> str:
    wants_reward_model = any(name.startswith("backbone.") for name in model.state_dict())
    holds_reward_model = 'Unexpected key(s) in state_dict: "backbone.' in error
    if wants_reward_model and not holds_reward_model and "Missing key(s)" in error:
        return f"{run} holds a language model, not a reward model: give a run of `lmforge reward train`"
    if holds_reward_model and not wants_reward_model:
        return (f"{run} holds a reward model (trunk and scalar head), not a language model: give an SFT or "
                "pretraining run")  # fmt: skip
    return f"{run}: its checkpoint does not fit the model its config.yaml describes ({error.splitlines()[0]})"


def pretrain_view(run_dir: RunDir) -> PretrainConfig:
    """The run's config as a PretrainConfig. Later stages (SFT, reward, DPO, ...) write their own configs with
    the same `model`, `train` and `data` sections plus keys of their own, which are left out here."""
    import dataclasses

    import yaml

    from lmforge.config import from_dict

    raw = yaml.safe_load(run_dir.config_path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    return from_dict(PretrainConfig, {k: v for k, v in raw.items() if k in known and k != "eval"})


def sample(run: str | Path, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 50, seed: int = 0, stream: bool = True) -> str:  # fmt: skip
    """Continue `prompt` with the run's model; prints tokens as they come when `stream`."""
    from lmforge.infer.generate import generate_stream
    from lmforge.infer.replies import fit_to_context
    from lmforge.tokenizer import Tokenizer

    model, tok_path, _ = load_run_model(run)
    tok = Tokenizer.load(tok_path)
    ids = tok.encode(prompt)
    max_new_tokens = fit_to_context(model.cfg, len(ids), max_new_tokens)  # a continuation stops at the context
    decoder = tok.incremental_decoder()
    pieces = []
    for token in generate_stream(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0,
                                 seed=seed, stop_ids=(tok.eos_id,), vocab_size=tok.vocab_size):  # fmt: skip
        if token == tok.eos_id:
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

    model, _, config = load_run_model(run)
    if not (data or config.data):
        raise ConfigError(f"{run} is a Hugging Face folder, which names no data: give --data (a prepared folder)")
    token_data = TokenData(data or config.data)
    with torch.no_grad():
        return evaluate_lm(model, token_data, seq_len=model.cfg.max_seq_len, batch_size=batch_size,
                           max_batches=batches or None, env=environment())  # fmt: skip


def export(run: str | Path, to: str, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the run's model as a Hugging Face folder: safetensors weights, config, tokenizer, generation config.

    A non-empty `out` is refused unless `overwrite`; then only the files written here are replaced (anything
    else in `out` stays), each through a temporary folder beside `out` and a rename (`save_hf`)."""
    if to != "hf":
        raise ConfigError(f"export --to {to!r}: only 'hf' is supported")
    from lmforge.model.hf_export import save_hf
    from lmforge.runs import atomic_write_text, check_output_folder
    from lmforge.tokenizer import Tokenizer

    out = check_output_folder(out, overwrite, option="export --out")

    model, tok_path, _ = load_run_model(run)
    tok = Tokenizer.load(tok_path)
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
                  "do_sample": True, "temperature": 0.8, "top_k": 50, "max_new_tokens": 256}  # fmt: skip

    def tokenizer_and_generation(tmp: Path) -> None:
        tok.save(tmp)  # tokenizer.json, with tokenizer_config.json naming the special tokens
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2))

    return save_hf(model, out, overwrite=True, extra=tokenizer_and_generation)
