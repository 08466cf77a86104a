"""Run folders: where every stage writes everything it produces.

One run is one folder, `runs/<name>/`:

    config.yaml      the exact config the stage ran with (`load_config` reads it back)
    metrics.jsonl    one JSON object per logged step: {"step": 10, "time": 1764412345.1, "loss": 2.31, ...}
    checkpoints/     weights and training state
    report.md        plus the plots it links to

Typical use inside a stage:

    run = RunDir.create("runs", name="tiny", config=cfg)      # refuses a non-empty folder unless resume=True
    run.log_metrics(step, loss=loss, lr=lr)
    atomic_write_bytes(run.checkpoints / "model.safetensors", data)

and in a later stage that takes an earlier run as input:

    prev = RunDir.open("runs/tiny")
    cfg = prev.load_config(PretrainConfig)
    history = prev.read_metrics()

Files are written atomically (`atomic_open`, `atomic_write_bytes`, `atomic_write_text`): the data goes to a
temporary file in the same folder, is fsynced, then renamed over the target, so a crash or a full disk
leaves the previous version intact rather than a truncated file.

Every file a command writes is counted by `count_write` (the atomic writers call it; code that writes
through a library, like safetensors' save_file, calls it after each file). It is the fault-injection hook of
tests/test_faults.py: with LMFORGE_FAULT_AT_WRITE=k in the environment the process kills itself (SIGKILL, no
cleanup, as a power cut would) right before its k-th counted write, so a test can check that whatever was
interrupted left the previous state intact.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from lmforge.config import ConfigError, UserError, load_config, save_config, to_dict

__all__ = [
    "RunDir",
    "Stopped",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_folder",
    "count_write",
    "fsync_dir",
    "read_metrics",
    "resume_config",
]

T = TypeVar("T")
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


FAULT_ENV = "LMFORGE_FAULT_AT_WRITE"
_writes_counted = 0


def count_write(path: str | Path) -> None:
    """Count one file about to be written at `path`; under LMFORGE_FAULT_AT_WRITE=k, die before the k-th."""
    global _writes_counted
    _writes_counted += 1
    fault_at = os.environ.get(FAULT_ENV)
    if fault_at and _writes_counted == int(fault_at):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """Open `path` for writing so that it is replaced only if the `with` block completes.

        with atomic_open(run.checkpoints / "state.pt", "wb") as f:
            torch.save(state, f)

    The parent folder is created if needed. On any exception the target is left untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count_write(path)
    # Same folder as the target, so os.replace is a rename on one filesystem (atomic on POSIX and Windows).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 lets the umask decide permissions, as for a plain open(); mkstemp would force 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def check_output_folder(path: str | Path, overwrite: bool, *, option: str = "--out", flag: str = "--overwrite") -> Path:
    """Never destroy what a user has: refuse a target that is a file, or a folder that holds anything, unless
    `overwrite` (after which the writer replaces only its own files). `option`/`flag` name them in the message."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{option} {path} is a file, not a folder: choose another {option}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{option} {path} is not empty: pass {flag} to replace the files written there "
                              f"(other files are kept), or choose another {option}")  # fmt: skip
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; return the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; return the path."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def fsync_dir(folder: Path) -> None:
    # The rename itself is only durable once the folder entry is flushed (POSIX); Windows cannot open
    # folders this way, where the call is a harmless no-op.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (or of the one inside a run folder), in order.

    A last line cut short by a crash mid-write is skipped; a broken line anywhere else is an error.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: the write never finished
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
    return records


class RunDir:
    """One run folder. Make one with `RunDir.create` (a stage writing) or `RunDir.open` (a stage reading)."""

    def __init__(self, path: str | Path, resumed: bool = False):
        self.path = Path(path)
        self.resumed = resumed  # True when create(resume=True) found earlier output to continue from

    @classmethod
    def create(
        cls,
        root: str | Path = "runs",
        name: str | None = None,
        config: Any = None,
        *,
        exist_ok: bool = False,
        resume: bool = False,
    ) -> RunDir:
        """Make `root/name` (name defaults to the time, e.g. 2026-11-29_1139) and save `config` in it.

        A folder that already holds files is refused unless `resume` (continue that run) or `exist_ok`
        (add to it); `resume` on a folder that does not exist yet just starts the run (and says so).

        The folder is locked (`fcntl.flock`) for as long as this process lives, so a second process writing
        into the same run is refused in one line. On resume, `config` is written only by `save_config()`,
        once the stage has rebuilt the model and loaded the checkpoint: a resume that fails never rewrites
        the config.yaml of the run it was meant to continue.
        """
        root = Path(root)
        if name is None:
            path = _claim_timestamped(root)
            existing = False
        else:
            if not name or Path(name).is_absolute() or ".." in Path(name).parts:
                raise ConfigError(f"run name {name!r} must be a folder name inside {root}")
            path = root / name
            if path.exists() and not path.is_dir():
                raise FileExistsError(f"{path} exists and is not a folder; pick another run name")
            existing = path.is_dir() and any(path.iterdir())
            if existing and not (resume or exist_ok):
                raise FileExistsError(
                    f"run folder {path} already exists and is not empty; "
                    "pass --resume to continue it, or choose another name"
                )
            if resume and not existing:
                print(f"{path} holds no run yet: starting it (nothing to resume)", file=sys.stderr)
            path.mkdir(parents=True, exist_ok=True)
        run = cls(path, resumed=existing and resume)
        _lock(run)
        run._pending_config = config
        if config is not None and not run.resumed:
            run.save_config()
        return run

    def save_config(self) -> None:
        """Write the config given to `create` (on resume: the config now in force, e.g. a raised steps)."""
        if getattr(self, "_pending_config", None) is not None:
            save_config(self._pending_config, self.config_path)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run folder, for a stage that takes an earlier run as its input."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"run folder not found: {path}")
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} has no {CONFIG_FILE}; is it a run folder?")
        return cls(path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        """The checkpoint folder (created by whoever writes the first checkpoint)."""
        return self.path / CHECKPOINT_DIR

    def load_config(self, cls: type[T], overrides: Sequence[str] = ()) -> T:
        """This run's config.yaml as `cls` (see lmforge.config.load_config)."""
        return load_config(cls, self.config_path, overrides)

    def log_metrics(self, step: int, **values: Any) -> dict[str, Any]:
        """Append one line {"step", "time", **values} to metrics.jsonl; return the record.

        Scalars with `.item()` (torch or numpy) are unwrapped. The file is opened, written and closed per
        call, so every logged line is on disk (in the OS cache) even if the process dies right after.
        """
        if "time" in values:
            raise ValueError("'time' is added by log_metrics (wall-clock seconds); log yours under another name")
        record = {"step": int(step), "time": round(time.time(), 3), **values}
        # JSON has no NaN or inf: a non-finite value is written as null (the trainer adds "skipped": true to
        # the record of a step it skipped), so every line stays readable by any JSON parser.
        line = json.dumps({k: _finite_or_none(v) for k, v in record.items()}, default=_jsonable, allow_nan=False)
        count_write(self.metrics_path)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
        return record

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record logged so far ([] before the first)."""
        return read_metrics(self.metrics_path) if self.metrics_path.exists() else []

    def drop_metrics_after(self, step: int) -> int:
        """Remove the records of steps after `step` (a resumed run replays them); return how many."""
        records = self.read_metrics()
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) < len(records):
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        return len(records) - len(kept)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"


def _claim_timestamped(root: Path) -> Path:
    """Create and return root/<date_time>, adding _2, _3, ... if other runs started in the same minute."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d_%H%M")
    for n in itertools.count(1):
        path = root / (stamp if n == 1 else f"{stamp}_{n}")
        try:
            path.mkdir()  # mkdir is atomic: two processes starting together get different folders
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


class Stopped(Exception):
    """A run stopped by a signal (SIGTERM, Ctrl-C) after saving a checkpoint it can be resumed from.

    It propagates out of every stage, so nothing runs after it as if training had finished (a demo does not
    sample a half-trained model); the CLI exits 128 + the signal number (143 for SIGTERM), as a shell does.
    """

    def __init__(self, signum: int, step: int, path: Path):
        import signal

        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: checkpoint saved; continue with --resume (name={path.name})")


# What a resumed run cannot change: the checkpoint holds weights of that shape (the model, LoRA adapters) trained
# from that starting point against that reference (the base run).
FROZEN_ON_RESUME = ("model", "lora", "base", "init")


def resume_config(cls: type[T], fresh: T, overrides: Sequence[str], frozen: Sequence[str] = FROZEN_ON_RESUME) -> T:
    """The config a resumed run continues with: the run's own config.yaml plus only the overrides given now.

    `fresh` is the config built from --config and the overrides; it names the run (runs_dir/name). A run
    that does not exist yet starts from `fresh`. The sections in `frozen` (the architecture) cannot change
    on resume: the checkpoint holds weights of that shape.
    """
    name = getattr(fresh, "name", None)
    if not name:
        raise ConfigError("--resume needs the run's name: add name=<run> (the folder under runs_dir)")
    path = Path(fresh.runs_dir) / name / CONFIG_FILE
    if not path.is_file():
        fresh.resume = True  # RunDir.create says that there was nothing to resume
        return fresh
    saved = load_config(cls, path)
    resumed = load_config(cls, path, overrides)
    for section in (s for s in frozen if hasattr(saved, s)):
        before, after = _flat({section: to_dict(saved)[section]}), _flat({section: to_dict(resumed)[section]})
        changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        if changed:
            key = changed[0]
            raise ConfigError(
                f"--resume cannot change what the checkpoint was trained as: {key} is {before.get(key)!r} in "
                f"{path}, the override asks for {after.get(key)!r}; start a new run (another name=) instead"
            )
    resumed.resume = True
    return resumed


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_LOCKS: dict[Path, list[int]] = {}  # run folder -> [fd holding its flock, RunDir objects using it]


def _lock(run: RunDir) -> None:
    """Hold an exclusive flock on the run folder while a RunDir made by `create` for it is alive (the kernel
    drops it with the process, however it dies: no stale PID file to clean up). Re-entrant within a process:
    every RunDir of one folder shares one lock, released when the last is garbage collected."""
    import weakref

    key = run.path.resolve()
    if key not in _LOCKS:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; a second writer is not detected there
            return
        fd = os.open(key, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"run folder {run.path} is in use by another lmforge process; wait for it to finish (or stop it) first"
            ) from None
        _LOCKS[key] = [fd, 0]
    _LOCKS[key][1] += 1
    weakref.finalize(run, _unlock, key)


def _unlock(key: Path) -> None:
    entry = _LOCKS.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _LOCKS[key]
        os.close(entry[0])  # closing the last descriptor releases the flock


def _finite_or_none(value: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, (list, dict)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"log_metrics cannot store a value of type {type(value).__name__!r} as JSON")
