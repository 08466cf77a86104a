"""Checkpoints: model weights in safetensors, everything else (optimizer, scaler, RNG, step) as tensors and
plain values loaded with `torch.load(weights_only=True)`.

A checkpoint is a folder `checkpoints/step_000100/` written as `step_000100.tmp/` and renamed when complete, so
a crash (even SIGKILL) mid-write leaves the previous checkpoint intact and the half-written one ignored. The
last `keep` complete checkpoints are kept. Sharded (FSDP) runs save with torch.distributed.checkpoint (DCP),
which reshards on load, so a run saved on 2 ranks resumes on 1; rank 0 also writes the gathered weights as
model.safetensors. Weights are only ever loaded from model.safetensors: DCP (whose .metadata is a pickle) is
read only to resume a run's own optimizer state.

info.json records the size and sha256 of every file of its checkpoint, and loading verifies them.
`latest_checkpoint` returns the newest checkpoint that verifies: a damaged newer one (a bad disk, a copy cut
short) is skipped with one line on stderr, so inference and --resume go on from the one before. Checkpoints
saved before checksums were recorded still load, with one line on stderr saying they are unverified, except
for a sharded one's DCP state, which is never read unverified.

    save_checkpoint(run.checkpoints, step, model, state={"optimizer": opt.state_dict(), ...})
    path = latest_checkpoint(run.checkpoints)          # None when there is none
    state = load_checkpoint(path, model)               # loads weights into model, returns the rest
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
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
    """The newest intact checkpoint under root (None when there is none at all). A newer one that fails
    `verify_checkpoint` is skipped with one line on stderr saying why and which is used instead; when none is
    intact, a UserError lists why each was refused."""
    dirs = checkpoint_dirs(root)
    skipped = []
    for path in reversed(dirs):
        problem = verify_checkpoint(path)
        if problem is None:
            if skipped:
                _say(f"lmforge: skipped checkpoint {'; '.join(skipped)}; using {path}")
            return path
        skipped.append(f"{path.name} ({problem})")
    if skipped:
        raise UserError(f"no intact checkpoint in {root}: {'; '.join(skipped)}; start the run again, or restore a "
                        "checkpoint from a copy")  # fmt: skip
    return None


def verify_checkpoint(path: str | Path) -> str | None:
    """None if the checkpoint folder is intact, else what is wrong with it, in a few words. Intact: info.json
    reads, and every file it records is there with its recorded size and sha256. A checkpoint saved before
    lmforge recorded checksums (no "files" in info.json) only needs its weights and trainer state present."""
    path = Path(path)
    try:
        info = json.loads((path / INFO).read_text())
        int(info["step"])
    except FileNotFoundError:
        return f"no {INFO}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{INFO} is damaged"
    files = info.get("files")
    if files is None:  # saved before checksums were recorded
        missing = [name for name in (WEIGHTS, STATE) if not (path / name).is_file()]
        return f"no {missing[0]} in it" if missing else None
    if not isinstance(files, dict):
        return f"{INFO} is damaged"
    for name, record in files.items():
        if not (path / name).is_file():
            return f"no {name} in it"
        problem = _check_file(path / name, record)
        if problem:
            return f"{name} {problem}"
    return None


def _check_file(file: Path, record: Any) -> str | None:
    if not isinstance(record, dict) or not isinstance(record.get("size"), int):
        return f"has a damaged record in {INFO}"
    size = file.stat().st_size
    if size != record["size"]:
        return f"is damaged ({size} bytes, {record['size']} recorded)"
    if _sha256(file) != record.get("sha256"):
        return "is damaged (its sha256 differs from the one recorded)"
    return None


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under folder (DCP's shards and metadata included), by relative path."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != INFO)
    return {f.relative_to(folder).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)} for f in files}


def _require_intact(path: Path, verified: bool) -> dict[str, Any]:
    """info.json of a checkpoint, after verifying it unless `verified` (latest_checkpoint just did: hashing a
    large checkpoint twice doubles the time to load it); one line on stderr if it has no checksums."""
    problem = None if verified else verify_checkpoint(path)
    if problem is not None:
        raise UserError(f"checkpoint {path} is damaged: {problem}; use an earlier checkpoint of the run")
    info = json.loads((path / INFO).read_text())
    if "files" not in info:
        _note_unverified(path)
    return info


_UNVERIFIED: set[str] = set()


def _note_unverified(path: Path) -> None:
    """One line, once per checkpoint and process: an older lmforge saved it without checksums."""
    if str(path) not in _UNVERIFIED:
        _UNVERIFIED.add(str(path))
        _say(f"lmforge: checkpoint {path} has no checksums (saved by an older lmforge): loading it unverified")


def _say(line: str) -> None:
    if not _distributed() or torch.distributed.get_rank() == 0:
        print(line, file=sys.stderr, flush=True)


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
    record = {"step": step, "sharded": sharded, **(info or {}), "files": _file_records(tmp)}
    count_write(tmp / INFO)
    (tmp / INFO).write_text(json.dumps(record, indent=1))
    _fsync_files(tmp)
    if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, *, verified: bool = False) -> dict[str, Any]:
    """Load weights into `model` and return the trainer state saved beside them: for resuming a run from its
    own checkpoint, verified against the checksums its info.json records. The trainer state is read with
    `torch.load(weights_only=True)`; a sharded checkpoint's DCP state (whose .metadata is a pickle) is read
    only when its checksums were recorded. `verified`: `path` comes from `latest_checkpoint`, which verified it."""
    path = Path(path)
    info = _require_intact(path, verified)
    if info.get("sharded"):
        if "files" not in info:
            raise UserError(f"{path} is a sharded checkpoint saved before lmforge recorded checksums: its DCP "
                            "state is a pickle and is not read unverified; start the run again")  # fmt: skip
        return _load_sharded(path, model)
    _load_weights_file(path, model)  # verified above
    state = torch.load(path / STATE, weights_only=True)
    state.pop("sharded_path", None)  # set by _load_sharded only: never a DCP path that a file names
    return state


def load_weights(path: str | Path, model: torch.nn.Module, *, verified: bool = False) -> None:
    """Weights only (for sampling, eval, export, a later stage's base), from `model.safetensors` only: a path a
    user points at is never unpickled, and DCP's `.metadata` is a pickle, so a sharded checkpoint is read
    through the `model.safetensors` that rank 0 gathers beside its shards (see `_save_sharded`)."""
    path = Path(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise UserError(f"no {WEIGHTS} in {path}: lmforge loads weights from safetensors only (never from a "
                        "pickle such as DCP's .metadata); point at a checkpoint or run that has one")  # fmt: skip
    records = _recorded(path)  # `verified`: latest_checkpoint checked every file a moment ago
    if not verified and WEIGHTS in records and (problem := _check_file(weights, records[WEIGHTS])):
        raise UserError(f"{weights} {problem}; use an earlier checkpoint of the run")
    if not records:
        _note_unverified(path)
    _load_weights_file(path, model)


def _load_weights_file(path: Path, model: torch.nn.Module) -> None:
    weights = path / WEIGHTS
    try:
        load_model(_unwrap(model), str(weights), strict=True)
    except SafetensorError as e:
        raise UserError(f"{weights} is truncated or not a safetensors file ({e}); use an earlier checkpoint "
                        "of the run") from None  # fmt: skip


def _recorded(path: Path) -> dict[str, Any]:
    try:
        files = json.loads((path / INFO).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


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
    _VERIFIED_DCP.add(state["sharded_path"])
    if not _distributed():
        _load_weights_file(path, model)  # verified by load_checkpoint
    return state


_VERIFIED_DCP: set[str] = set()  # DCP folders of checkpoints load_checkpoint verified in this process


def apply_sharded(path: str, model, optimizer) -> None:
    """Load a DCP checkpoint into a (possibly sharded) model and its optimizer, on any number of ranks. `path`
    must be the `sharded_path` that `load_checkpoint` returned: DCP's .metadata is a pickle, so only the DCP
    folder of a checkpoint whose checksums were verified is read."""
    if str(path) not in _VERIFIED_DCP:
        raise UserError(f"{path} is not the DCP folder of a verified checkpoint: load it with load_checkpoint")
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
