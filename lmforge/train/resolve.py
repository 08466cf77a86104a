"""The one resolver of every MODEL a user gives: a run folder, one checkpoint of it, a Hugging Face folder or a
`.gguf` file, into (model, its tokenizer, a config that names its architecture).

    model, tok, cfg = resolve_model("runs/tiny")                       # the latest checkpoint
    model, tok, cfg = resolve_model("runs/tiny/checkpoints/step_000720")
    model, tok, cfg = resolve_model("hf/SmolLM2-135M-Instruct")        # config.json + safetensors (sharded or not)
    model, tok, cfg = resolve_model("SmolLM2-135M-Instruct.Q4_1.gguf")  # dequantized; tokenizer from its metadata

`generate`, `sample`, `chat`, `eval`, `export`, `quantize`, `serve` and the `base=` of every post-training stage
take their model through it. Weights come from safetensors or GGUF only: nothing a user points at is unpickled.
A run folder keeps lmforge's tokenizer, or the imported model's own when a stage started from one
(`lmforge.tokenizer.load_tokenizer`). Anything else — a missing path, a folder that holds no model, an unknown
architecture — is one line that says what to give instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.config import ConfigError, UserError
from lmforge.model import Transformer
from lmforge.runs import RunDir

from .checkpoint import STEP_DIR, checkpoint_dirs, latest_checkpoint, load_weights
from .pretrain import PretrainConfig

KINDS = "a run folder (runs/NAME), one of its checkpoints (runs/NAME/checkpoints/step_NNNNNN), a Hugging Face folder or a .gguf file"  # noqa: E501


def resolve_model(path: str | Path, step: int | None = None, build=Transformer, dtype: torch.dtype | None = None):
    """(model in eval mode, tokenizer, PretrainConfig naming its model) of whatever `path` is (see the module
    docstring). `step` picks a run's checkpoint; `build(model_config)` makes the module a run's checkpoint holds
    (a reward model wraps the Transformer); `dtype` casts an imported model (None: fp32 for GGUF, the file's
    dtype for safetensors)."""
    from lmforge.tokenizer import load_tokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give {KINDS}")
    if path.is_file():
        return _load_gguf(path, build, dtype)
    if (path / "config.json").is_file():
        return _load_hf_folder(path, build, dtype)
    ckpt = None
    if path.parent.name == "checkpoints" and STEP_DIR.match(path.name):  # runs/NAME/checkpoints/step_000720
        ckpt, path = path, path.parent.parent
    if not (path / "config.yaml").is_file():
        raise UserError(f"{path} holds no model (no config.yaml, config.json or checkpoints): give {KINDS}")
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
    return model, load_tokenizer(run_dir.path), config


def _imported(path: Path, build) -> None:
    if build is not Transformer:
        raise ConfigError(f"{path} is a language model, not the run this needs: give a run of that stage")


def _load_hf_folder(path: Path, build, dtype):
    from lmforge.model.hf import from_hf
    from lmforge.tokenizer import load_tokenizer

    _imported(path, build)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json: lmforge reads fast (tokenizer.json) tokenizers; "
                                "save one with transformers' `tokenizer.save_pretrained`")  # fmt: skip
    model = from_hf(path, dtype=dtype).eval()
    return model, load_tokenizer(path), PretrainConfig(model=model.cfg, data="")


def _load_gguf(path: Path, build, dtype):
    from lmforge.model.gguf import load_gguf
    from lmforge.tokenizer import ImportedTokenizer

    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is a file but not a GGUF model: give {KINDS}")
    _imported(path, build)
    model, metadata = load_gguf(path, dtype=dtype or torch.float32)
    tokenizer = ImportedTokenizer.from_gguf(metadata, str(path))
    return model, tokenizer, PretrainConfig(model=model.cfg, data="")


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
