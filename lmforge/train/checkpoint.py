"""Checkpoints: model weights in safetensors, everything else (optimizer, scaler, RNG, step) as tensors and
plain values loaded with `torch.load(weights_only=True)`.

A checkpoint is a folder `checkpoints/step_000100/` written as `step_000100.tmp/` and renamed when complete, so
a crash (even SIGKILL) mid-write leaves the previous checkpoint intact and the half-written one ignored. The
last `keep` complete checkpoints are kept. Sharded (FSDP) runs save with torch.distributed.checkpoint (DCP),
which reshards on load, so a run saved on 2 ranks resumes on 1; rank 0 also writes the gathered weights as
model.safetensors. Weights are only ever loaded from model.safetensors: DCP (whose .metadata is a pickle) is
read only to resume a run's own optimizer state.

    save_checkpoint(run.checkpoints, step, model, state={"optimizer": opt.state_dict(), ...})
    path = latest_checkpoint(run.checkpoints)          # None when there is none
    state = load_checkpoint(path, model)               # loads weights into model, returns the rest
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model

from lmforge.config import UserError
from lmforge.runs import count_write, fsync_dir

STEP_DIR = re.compile(r"^step_(\d+)$")
WEIGHTS, STATE, INFO, SHARDED = "model.safetensors", "trainer.pt", "info.json", "dcp"


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout, sampling), as tensors and plain values."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "numpy": None}
    np_state = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    *,
    keep: int = 3,
    info: dict[str, Any] | None = None,
    sharded: bool = False,
    rank: int = 0,
) -> Path:
    """Write `root/step_{step}` atomically. `state` holds tensors and plain values only. In a sharded run
    every rank calls this (DCP writes each rank's shards); otherwise only rank 0 should."""
    root = Path(root)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if sharded:
        _save_sharded(tmp, model, state)
    if rank != 0:
        return final
    if not sharded:
        count_write(tmp / WEIGHTS)
        save_model(_unwrap(model), str(tmp / WEIGHTS))  # handles the tied embedding/head pair
        count_write(tmp / STATE)
        torch.save(state, tmp / STATE)
    count_write(tmp / INFO)
    (tmp / INFO).write_text(json.dumps({"step": step, "sharded": sharded, **(info or {})}, indent=1))
    _fsync_files(tmp)
    if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into `model` and return the trainer state saved beside them."""
    path = Path(path)
    info = json.loads((path / INFO).read_text())
    if info.get("sharded"):
        return _load_sharded(path, model)
    load_model(_unwrap(model), str(path / WEIGHTS), strict=True)
    return torch.load(path / STATE, weights_only=True)


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Weights only (for sampling, eval, export, a later stage's base), from `model.safetensors` only: a path a
    user points at is never unpickled, and DCP's `.metadata` is a pickle, so a sharded checkpoint is read
    through the `model.safetensors` that rank 0 gathers beside its shards (see `_save_sharded`)."""
    path = Path(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise UserError(f"no {WEIGHTS} in {path}: lmforge loads weights from safetensors only (never from a "
                        "pickle such as DCP's .metadata); point at a checkpoint or run that has one")  # fmt: skip
    try:
        load_model(_unwrap(model), str(weights), strict=True)
    except SafetensorError as e:
        raise UserError(f"{weights} is truncated or not a safetensors file ({e}); use an earlier checkpoint "
                        "of the run") from None  # fmt: skip


def _save_sharded(folder: Path, model, state: dict[str, Any]) -> None:
    """Every rank writes its shards of model and optimizer with DCP (for resuming on any number of ranks);
    rank 0 also writes the gathered weights as model.safetensors (for everything that only needs the model,
    which never reads DCP). The gather is collective: all ranks call it, rank 0 alone receives the tensors
    (on CPU, so a model larger than one GPU's memory still fits)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    optimizer = state.pop("optimizer_object")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    count_write(folder / SHARDED)  # DCP writes one file per rank and the metadata: counted as one
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder / SHARDED))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        count_write(folder / WEIGHTS)
        save_file(_without_tied_copies(full, model), str(folder / WEIGHTS))
        count_write(folder / STATE)
        torch.save(state, folder / STATE)
    dist.barrier()


def _without_tied_copies(full: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gathered state dict holds a tied parameter (embedding = head) once per name, as separate tensors;
    keep its first name only, as `save_model` does for an unsharded model, so `load_model` accepts the file."""
    seen: set[int] = set()
    drop = []
    for name, p in _unwrap(model).named_parameters(remove_duplicate=False):
        if id(p) in seen:
            drop.append(name)
        seen.add(id(p))
    return {k: v.contiguous() for k, v in full.items() if k not in drop}


def _load_sharded(path: Path, model) -> dict[str, Any]:
    """Returns the trainer state with `sharded_path`, the DCP folder of model and optimizer, to be applied by
    `apply_sharded` once the optimizer exists (DCP reshards to the current number of ranks)."""
    state = torch.load(path / STATE, weights_only=True)
    state["sharded_path"] = str(path / SHARDED)
    if not _distributed():
        load_weights(path, model)
    return state


def apply_sharded(path: str, model, optimizer) -> None:
    """Load a DCP checkpoint into a (possibly sharded) model and its optimizer, on any number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def _fsync_files(folder: Path) -> None:
    """Flush every file of a checkpoint folder, then the folder entry, before it is renamed into place."""
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)
