"""Epoch AI's extraction of Chinchilla's Figure 4 runs (Besiroglu et al. 2024), read from ../shared/data.
The project does not ship the file: tests that need it skip with a reason when it is absent."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(os.environ.get("LMFORGE_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
EPOCH_CSV = SHARED_DATA / "chinchilla_svg_extracted_data.csv"


def epoch_runs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, loss) of the 240 lowest-loss runs, D = FLOP / 6N — Epoch's selection."""
    if not EPOCH_CSV.is_file():
        pytest.skip(f"reference data not found at {EPOCH_CSV} (set LMFORGE_SHARED_DATA to its folder)")
    with EPOCH_CSV.open() as f:
        rows = list(csv.DictReader(f))
    n = np.array([float(r["Model Size"]) for r in rows])
    c = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    keep = np.argsort(loss)[:-5]
    return n[keep], c[keep] / (6 * n[keep]), loss[keep]
