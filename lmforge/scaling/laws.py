"""Scaling laws as objects: Chinchilla's L(N, D) with its compute-optimal frontier, and the saturating power
law L = a·x^b + c for loss-vs-steps/params/compute curves. Fitting them lives in `fit.py`.

    from lmforge.scaling.laws import EPOCH
    n, d = EPOCH.optimal(1e21)               # parameters and tokens for 1e21 FLOPs (C = 6·N·D)
    EPOCH.loss(n, d), EPOCH.compute_for_loss(2.2)

Conventions (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"): N counts all
parameters, embeddings included; D is training tokens; C = 6·N·D; losses in nats per token.
Plain numpy and the standard library: `lmforge plan` loads these without torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmforge.config import UserError

__all__ = ["EPOCH", "HOFFMANN", "ChinchillaLaw", "PowerLaw", "load_law"]


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        out = self.E + self.A / n**self.alpha + self.B / d**self.beta
        return float(out) if out.ndim == 0 else out

    @property
    def _g(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def optimal(self, compute: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L under 6·N·D = C — Hoffmann eq. 4:
        N_opt = G·(C/6)^a, D_opt = G⁻¹·(C/6)^b, G = (αA / βB)^(1/(α+β)), a = β/(α+β), b = α/(α+β)."""
        _check_positive(compute=compute)
        s = self.alpha + self.beta
        n = self._g * (compute / 6) ** (self.beta / s)
        return n, compute / (6 * n)

    @property
    def frontier_exponent(self) -> float:
        """γ in L_opt(C) = E + K·(C/6)^-γ: on the frontier both reducible terms scale as C^-αβ/(α+β)."""
        return self.alpha * self.beta / (self.alpha + self.beta)

    @property
    def _k(self) -> float:
        return self.A * self._g**-self.alpha + self.B * self._g**self.beta

    def loss_at_compute(self, compute: float) -> float:
        """The lowest loss reachable with C FLOPs (the loss at `optimal(C)`)."""
        _check_positive(compute=compute)
        return self.E + self._k * (compute / 6) ** -self.frontier_exponent

    def compute_for_loss(self, target_loss: float) -> float:
        """FLOPs a compute-optimal run needs to reach `target_loss` (the inverse of `loss_at_compute`)."""
        if target_loss <= self.E:
            raise UserError(
                f"loss {target_loss:g} is at or below the irreducible loss E = {self.E:.4g}: no budget reaches it; "
                "ask for a loss above E"
            )
        return 6 * (self._k / (target_loss - self.E)) ** (1 / self.frontier_exponent)

    def tokens_per_parameter(self, compute: float) -> float:
        n, d = self.optimal(compute)
        return d / n

    def to_dict(self) -> dict:
        return {"law": "chinchilla", **asdict(self)}

    def __str__(self) -> str:
        return f"L(N,D) = {self.E:.4g} + {self.A:.4g}/N^{self.alpha:.4g} + {self.B:.4g}/D^{self.beta:.4g}"


# Hoffmann et al. 2022, Approach 3 (their Table A3 / eq. 10).
HOFFMANN = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
# Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt"): Hoffmann's own procedure on the 240
# lowest-loss runs read off Hoffmann's Figure 4, optimised to convergence (`fit.fit_chinchilla` reproduces it).
EPOCH = ChinchillaLaw(E=1.8172, A=477.8, B=2143.9, alpha=0.3473, beta=0.3672)


@dataclass(frozen=True)
class PowerLaw:
    """y = a·x^b + c: a loss curve that saturates at c (b < 0 for losses falling with x)."""

    a: float
    b: float
    c: float

    def __call__(self, x):
        x = np.asarray(x, dtype=float)
        out = self.a * x**self.b + self.c
        return float(out) if out.ndim == 0 else out

    def solve(self, y: float) -> float:
        """The x at which the curve reaches y (e.g. the compute needed to reach a loss)."""
        ratio = (y - self.c) / self.a
        if ratio <= 0:
            raise UserError(f"the curve never reaches {y:g}: it saturates at {self.c:.4g}; ask for a loss above that")
        return ratio ** (1 / self.b)

    def to_dict(self) -> dict:
        return {"law": "power", **asdict(self)}

    def __str__(self) -> str:
        return f"{self.a:.4g}·x^{self.b:.4g} + {self.c:.4g}"


def load_law(path: str | Path) -> ChinchillaLaw:
    """The Chinchilla law in a fit JSON written by `lmforge scaling fit --out` (key "chinchilla" or top level)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no fit file {path}: write one with `lmforge scaling fit ... --out {path}`")
    hint = f"write one with `lmforge scaling fit ... --method chinchilla --out {path}`"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a fit JSON ({e}): {hint}") from None
    data = data.get("chinchilla", data) if isinstance(data, dict) else {}
    missing = [k for k in ("E", "A", "B", "alpha", "beta") if k not in data]
    if missing:
        raise UserError(f"{path} holds no Chinchilla law (missing {', '.join(missing)}): {hint}")
    try:
        return ChinchillaLaw(**{k: float(data[k]) for k in ("E", "A", "B", "alpha", "beta")})
    except (TypeError, ValueError):
        raise UserError(f"{path}: E, A, B, alpha and beta must be numbers: {hint}") from None


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number, got {value}")
