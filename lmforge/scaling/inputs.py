"""Inputs of `lmforge scaling fit`: a CSV of runs, run folders (their config.yaml and metrics.jsonl), or one
run's loss curve.

    from lmforge.scaling.inputs import load_runs, load_curve
    runs = load_runs(["runs/isoflop-cpu/runs.csv"])          # or ["runs/a", "runs/b", ...]
    steps, loss = load_curve("runs/tiny", x="tokens")

A CSV needs a parameter column, a loss column and a tokens or FLOPs column (the other is derived with
C = 6·N·D); the usual spellings are accepted, e.g. Epoch's `Model Size`, `Training FLOP`, `loss`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.config import UserError

ALIASES = {
    "params": ("params", "parameters", "n", "model size", "model_size", "num_params"),
    "tokens": ("tokens", "d", "training tokens", "train_tokens", "num_tokens"),
    "flops": ("flops", "c", "compute", "training flop", "training flops", "training_flops"),
    "loss": ("val_loss", "loss", "final_loss", "eval_loss"),
    "budget": ("budget",),
}


@dataclass
class Runs:
    """One row per training run: N (all parameters), D (tokens), C = 6·N·D unless given, final loss."""

    params: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    loss: np.ndarray
    budget: np.ndarray  # the IsoFLOP group of each run (its nominal budget, else its C)
    source: str

    def __len__(self) -> int:
        return len(self.loss)

    def drop_highest_loss(self, k: int) -> Runs:
        """Without the k highest-loss runs (Besiroglu et al. 2024 drop 5 of Hoffmann's 245 as outliers)."""
        keep = np.sort(np.argsort(self.loss)[: len(self) - k])
        return Runs(*(getattr(self, f)[keep] for f in ("params", "tokens", "flops", "loss", "budget")), self.source)


def _column(header: list[str], kind: str) -> str | None:
    lowered = {h.strip().lower(): h for h in header}
    return next((lowered[a] for a in ALIASES[kind] if a in lowered), None)


def read_csv(path: Path) -> Runs:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = [(reader.line_num, r) for r in reader if r.get("role", "sweep") != "holdout"]  # held-out: a test
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a CSV of runs ({e})") from None
    cols = {k: _column(header, k) for k in ALIASES}
    missing = [k for k in ("params", "loss") if cols[k] is None]
    if missing or (cols["tokens"] is None and cols["flops"] is None):
        need = ", ".join(missing + ([] if cols["tokens"] or cols["flops"] else ["tokens or flops"]))
        raise UserError(f"{path}: no {need} column (header: {', '.join(header)})")

    def number(line: int, row: dict, column: str) -> float:
        try:
            value = float(row[column])
        except (TypeError, ValueError):  # not a number, or a row too short to have the column (None)
            value = math.nan
        if not math.isfinite(value):
            raise UserError(f"{path}:{line}: {column} is {row[column]!r}, not a finite number: fix or drop the row")
        return value

    def get(kind: str) -> np.ndarray | None:
        return None if cols[kind] is None else np.array([number(line, r, cols[kind]) for line, r in rows])

    n, d, c, loss = get("params"), get("tokens"), get("flops"), get("loss")
    d = c / (6 * n) if d is None else d
    c = 6 * n * d if c is None else c
    budget = get("budget")
    return Runs(n, d, c, loss, c if budget is None else budget, str(path))


def read_run_folder(path: Path) -> tuple[float, float, float]:
    """(N, D, final val loss) of a run folder written by `lmforge pretrain`."""
    from lmforge.runs import RunDir
    from lmforge.train.pretrain import PretrainConfig

    run = RunDir.open(path)
    cfg = run.load_config(PretrainConfig)
    val = [r for r in run.read_metrics() if "val_loss" in r]
    if not val:
        raise UserError(f"{path} has no val_loss in metrics.jsonl: evaluate it (`lmforge eval {path}`) first")
    last = val[-1]
    tokens = last["step"] * cfg.train.batch_size * cfg.model.max_seq_len
    return float(cfg.model.param_counts()["total"]), float(tokens), float(last["val_loss"])


def load_runs(paths: list[str | Path]) -> Runs:
    """Runs from one CSV, or from several run folders (each contributes its final val loss)."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist: give a CSV of runs or run folders (runs/<name>)")
    if len(paths) == 1 and paths[0].is_file():
        return read_csv(paths[0])
    if paths[0].is_dir() and (paths[0] / "runs.csv").is_file() and len(paths) == 1:
        return read_csv(paths[0] / "runs.csv")  # a sweep folder
    rows = np.array([read_run_folder(p) for p in paths])
    n, d, loss = rows.T
    return Runs(n, d, 6 * n * d, loss, 6 * n * d, ", ".join(map(str, paths)))


def load_curve(
    path: str | Path, *, x: str = "tokens", metric: str = "loss", skip: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """One run's loss curve from its metrics.jsonl: x = "steps", "tokens" or "flops" (6·N·tokens). The first
    `skip` fraction of steps (warm-up, where the loss is not yet a power law) is left out."""
    from lmforge.runs import RunDir
    from lmforge.train.pretrain import PretrainConfig

    run = RunDir.open(path)
    cfg = run.load_config(PretrainConfig)
    rows = [r for r in run.read_metrics() if r.get(metric) is not None and np.isfinite(r[metric])]
    if rows:
        rows = [r for r in rows if r["step"] > skip * rows[-1]["step"]]
    if len(rows) < 3:
        raise UserError(f"{path}: fewer than 3 logged values of {metric!r} in metrics.jsonl: train it longer")
    steps = np.array([r["step"] for r in rows], dtype=float)
    scale = {"steps": 1.0, "tokens": cfg.train.batch_size * cfg.model.max_seq_len}
    scale["flops"] = 6.0 * cfg.model.param_counts()["total"] * scale["tokens"]
    if x not in scale:
        raise UserError(f"--x {x} is not an axis of a run's loss curve: use one of {', '.join(scale)}")
    return steps * scale[x], np.array([r[metric] for r in rows])
