"""Fitting scaling laws to runs: Hoffmann's parametric fit of L(N, D) (their Approach 3), IsoFLOP parabolas
(Approach 2) and the saturating power law L = a·x^b + c for single curves.

    from lmforge.scaling.fit import fit_chinchilla, fit_isoflop, fit_power_law
    fit = fit_chinchilla(n, d, loss)           # a grid of 4,500 L-BFGS starts, ~1 minute
    fit.law.optimal(1e21), fit.objective

`lmforge scaling fit` is the command line of this module (inputs: a CSV or run folders, see `runs_table.py`).

Why tight tolerances: the summed Huber objective is ~1e-3, so scipy's default stopping rules (an absolute
ftol of 2.2e-9 on f, a gtol of 1e-5 on the gradient) stop L-BFGS while the parameters are still far from
the optimum — started at Hoffmann's published values on Epoch's data it stops at A ≈ 406, objective
1.163e-3, instead of the optimum A ≈ 478, 1.0183e-3 (Besiroglu et al. 2024). Every start is therefore
followed by a polish with tolerances near machine precision.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lmforge.config import UserError

from .laws import ChinchillaLaw, PowerLaw

__all__ = [
    "ChinchillaFit",
    "IsoFLOPFit",
    "Parabola",
    "bootstrap_chinchilla",
    "fit_chinchilla",
    "fit_isoflop",
    "fit_parabola",
    "fit_power_law",
    "hoffmann_grid",
    "huber_objective",
]

TIGHT = {"ftol": 1e-15, "gtol": 1e-15, "maxiter": 20_000, "maxfun": 40_000}


# ---- Approach 3: L(N, D) by Huber loss on log L -------------------------------------------------------------


def hoffmann_grid() -> np.ndarray:
    """Hoffmann et al.'s initialisations, as (a, b, e, α, β) with A, B, E = exp(a, b, e): α, β ∈ {0, 0.5, …, 2},
    e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25} — 4,500 starts."""
    a = b = np.arange(0, 30, 5.0)
    e = np.arange(-1, 1.5, 0.5)
    alpha = beta = np.arange(0, 2.5, 0.5)
    return np.array(list(itertools.product(a, b, e, alpha, beta)))


def huber_objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray, delta: float = 1e-3
) -> tuple[float, np.ndarray]:
    """Σ Huber_δ(LSE(a − α log N, b − β log D, e) − log L) and its gradient in θ = (a, b, e, α, β).

    LSE(…) = log(A/N^α + B/D^β + E) written in log space, so it never overflows (Hoffmann eq. 8)."""
    a, b, e, alpha, beta = theta
    z = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = z.max(axis=0)
    w = np.exp(z - top)
    total = w.sum(axis=0)
    r = top + np.log(total) - log_loss
    w /= total  # softmax weights: ∂LSE/∂z
    ar = np.abs(r)
    value = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum()
    g = np.clip(r, -delta, delta)  # Huber'(r)
    grad = np.array(
        [
            (g * w[0]).sum(),
            (g * w[1]).sum(),
            (g * w[2]).sum(),
            -(g * w[0] * log_n).sum(),
            -(g * w[1] * log_d).sum(),
        ]
    )
    return float(value), grad


def _theta(law: ChinchillaLaw) -> np.ndarray:
    return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])


def _law(theta: np.ndarray) -> ChinchillaLaw:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return ChinchillaLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha, beta=beta)


@dataclass
class ChinchillaFit:
    law: ChinchillaLaw
    objective: float  # summed Huber loss at the optimum
    n_points: int
    n_starts: int
    delta: float
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # bootstrap 95% intervals

    def to_dict(self) -> dict:
        out = {"chinchilla": self.law.to_dict(), "objective": self.objective, "n_points": self.n_points,
               "n_starts": self.n_starts, "delta": self.delta}  # fmt: skip
        if self.intervals:
            out["intervals_95"] = {k: list(v) for k, v in self.intervals.items()}
        return out


def _logs(n, d, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d, loss = (np.asarray(v, dtype=float).ravel() for v in (n, d, loss))
    if not (len(n) == len(d) == len(loss)):
        raise ValueError(f"N, D and loss need one value per run, got {len(n)}, {len(d)} and {len(loss)}")
    if len(n) < 5:
        raise UserError(f"a 5-parameter law needs at least 5 runs, got {len(n)}: give more runs")
    if not ((n > 0).all() and (d > 0).all() and (loss > 0).all()):  # NaN fails too
        raise UserError("parameters, tokens and losses must all be positive numbers: fix the runs given")
    return np.log(n), np.log(d), np.log(loss)


def _minimize(theta0, args, options=None):
    from scipy.optimize import minimize

    return minimize(huber_objective, theta0, args=args, jac=True, method="L-BFGS-B", options=options)


def fit_chinchilla(
    n: Sequence[float],
    d: Sequence[float],
    loss: Sequence[float],
    *,
    delta: float = 1e-3,
    starts: np.ndarray | Sequence[ChinchillaLaw] | None = None,
    polish: int = 5,
    progress: bool = False,
) -> ChinchillaFit:
    """Fit L(N, D) by Hoffmann et al.'s method: minimise Σ Huber_δ(log L̂ − log L) with L-BFGS from every start
    (default: `hoffmann_grid()`), then polish the `polish` best with tight tolerances (see module docstring).

    `starts` may be an array of θ = (a, b, e, α, β) rows or a list of `ChinchillaLaw`s."""
    args = (*_logs(n, d, loss), delta)
    if starts is None:
        starts = hoffmann_grid()
    elif len(starts) and isinstance(starts[0], ChinchillaLaw):
        starts = np.array([_theta(s) for s in starts])
    starts = np.atleast_2d(np.asarray(starts, dtype=float))
    iterator = starts
    if progress:
        from tqdm import tqdm

        iterator = tqdm(starts, desc="L-BFGS starts", unit="start", leave=False)
    with np.errstate(over="ignore", invalid="ignore"):
        coarse = [_minimize(s, args) for s in iterator]
    ranked = sorted((r for r in coarse if np.isfinite(r.fun)), key=lambda r: r.fun)[: max(polish, 1)]
    best = min((_minimize(r.x, args, TIGHT) for r in ranked), key=lambda r: r.fun)
    return ChinchillaFit(_law(best.x), float(best.fun), len(args[0]), len(starts), delta)


def bootstrap_chinchilla(
    n, d, loss, fit: ChinchillaFit, *, samples: int = 200, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of E, A, B, α, β: refit on `samples` resamples (runs drawn with
    replacement), each started at the full fit's optimum with tight tolerances. Stores them on `fit`."""
    log_n, log_d, log_loss = _logs(n, d, loss)
    rng = np.random.default_rng(seed)
    theta0 = _theta(fit.law)
    draws = []
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(samples):
            idx = rng.integers(0, len(log_n), len(log_n))
            r = _minimize(theta0, (log_n[idx], log_d[idx], log_loss[idx], fit.delta), TIGHT)
            law = _law(r.x)
            draws.append([law.E, law.A, law.B, law.alpha, law.beta])
    lo, hi = np.percentile(np.array(draws), [50 * (1 - level), 50 * (1 + level)], axis=0)
    fit.intervals = {k: (float(a), float(b)) for k, a, b in zip(("E", "A", "B", "alpha", "beta"), lo, hi)}
    return fit.intervals


# ---- Approach 2: IsoFLOP parabolas ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Parabola:
    """loss ≈ p2·x² + p1·x + p0 in x = ln N along one compute budget."""

    compute: float
    p2: float
    p1: float
    p0: float
    n_range: tuple[float, float]  # smallest and largest N trained at this budget

    @property
    def n_opt(self) -> float:
        return float(np.exp(-self.p1 / (2 * self.p2)))

    @property
    def loss_min(self) -> float:
        return float(self.p0 - self.p1**2 / (4 * self.p2))

    @property
    def bracketed(self) -> bool:
        """True when the minimum lies inside the sizes trained (else it is an extrapolation)."""
        return self.n_range[0] <= self.n_opt <= self.n_range[1]

    def __call__(self, n):
        x = np.log(np.asarray(n, dtype=float))
        return self.p2 * x * x + self.p1 * x + self.p0


@dataclass
class IsoFLOPFit:
    """Per-budget parabola minima and the power laws through them: N_opt = kN·C^a, D_opt = kD·C^b, and
    L_min(C) = a·C^b + c when there are at least three budgets."""

    parabolas: list[Parabola]
    n_exponent: float
    n_coef: float
    loss_curve: PowerLaw | None

    def optimal(self, compute: float) -> tuple[float, float]:
        n = self.n_coef * compute**self.n_exponent
        return n, compute / (6 * n)

    @property
    def d_exponent(self) -> float:
        return 1 - self.n_exponent  # D = C / 6N

    def to_dict(self) -> dict:
        return {
            "isoflop": {
                "n_exponent": self.n_exponent, "n_coef": self.n_coef, "d_exponent": self.d_exponent,
                "minima": [{"compute": p.compute, "n_opt": p.n_opt, "loss_min": p.loss_min, "bracketed": p.bracketed}
                           for p in self.parabolas],
                "loss_curve": self.loss_curve.to_dict() if self.loss_curve else None,
            }
        }  # fmt: skip


def fit_parabola(compute: float, n, loss) -> Parabola:
    """Least-squares parabola of loss in ln N for the runs of one budget (≥ 3 sizes)."""
    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    if len(set(n)) < 3:
        raise UserError(f"a parabola needs ≥ 3 model sizes at C = {compute:.3g}, got {len(set(n))}: train more sizes")
    p2, p1, p0 = np.polyfit(np.log(n), loss, 2)
    if p2 <= 0:
        raise UserError(
            f"the runs at C = {compute:.3g} have no minimum in N (the loss curve opens downwards): "
            "train sizes on both sides of the best one"
        )
    return Parabola(compute, float(p2), float(p1), float(p0), (float(n.min()), float(n.max())))


def fit_isoflop(compute, n, loss, *, rel_tol: float = 0.05) -> IsoFLOPFit:
    """Hoffmann et al.'s Approach 2: group runs by budget (budgets within `rel_tol` are one), fit a parabola
    of loss in ln N to each (≥ 3 sizes), take its minimum, then fit ln N_opt linearly in ln C."""
    compute, n, loss = (np.asarray(v, dtype=float).ravel() for v in (compute, n, loss))
    order = np.argsort(compute)
    groups: list[list[int]] = []
    for i in order:
        if groups and compute[i] <= compute[groups[-1][0]] * (1 + rel_tol):
            groups[-1].append(i)
        else:
            groups.append([i])
    parabolas = [
        fit_parabola(float(np.exp(np.mean(np.log(compute[g])))), n[g], loss[g]) for g in groups if len(set(n[g])) >= 3
    ]
    if len(parabolas) < 2:
        raise UserError(f"IsoFLOP fits need ≥ 2 budgets with ≥ 3 model sizes each, got {len(parabolas)}: train "
                        "more budgets or sizes, or fit with --method chinchilla")  # fmt: skip
    cs = np.array([p.compute for p in parabolas])
    slope, intercept = np.polyfit(np.log(cs), np.log([p.n_opt for p in parabolas]), 1)
    curve = fit_power_law(cs, [p.loss_min for p in parabolas]) if len(parabolas) >= 3 else None
    return IsoFLOPFit(parabolas, float(slope), float(np.exp(intercept)), curve)


# ---- L = a·x^b + c --------------------------------------------------------------------------------------------


def fit_power_law(x, y, *, floor: float | None = None) -> PowerLaw:
    """Least-squares fit of y = a·x^b + c (y falling towards c as x grows; c ≥ 0).

    For a fixed c the fit is linear in log space (log(y − c) = log a + b·log x), so c is scanned over
    [0, min y) for a start, then all three are refined together in y space. `floor` fixes c instead."""
    from scipy.optimize import least_squares

    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if len(x) != len(y):
        raise ValueError(f"x and y need one value each per point, got {len(x)} and {len(y)}")
    if len(x) < (2 if floor is not None else 3):
        raise UserError(f"a power law needs ≥ {2 if floor is not None else 3} points (x, y), got {len(x)}: give "
                        "more runs or a longer curve")  # fmt: skip
    if not (x > 0).all():
        raise UserError("x must be positive (steps, parameters or FLOPs): fix the runs given")
    lx = np.log(x)

    def linear(c: float) -> tuple[float, float, float]:
        b, log_a = np.polyfit(lx, np.log(y - c), 1)
        return float(np.exp(log_a)), float(b), float(((np.exp(log_a) * x**b + c - y) ** 2).sum())

    if floor is not None:
        a, b, _ = linear(floor)
        return PowerLaw(a, b, floor)
    cs = np.min(y) * (1 - np.geomspace(1, 1e-4, 200))  # from 0 up to just under min y
    best_c = min(cs, key=lambda c: linear(c)[2])
    a, b, _ = linear(best_c)
    scale = np.mean(y)

    def residual(p):
        return (np.exp(p[0]) * x ** p[1] + p[2] - y) / scale

    r = least_squares(residual, [np.log(a), b, best_c], bounds=([-np.inf, -np.inf, 0], [np.inf, np.inf, np.min(y)]),
                      xtol=1e-15, ftol=1e-15, gtol=1e-15)  # fmt: skip
    return PowerLaw(float(np.exp(r.x[0])), float(r.x[1]), float(r.x[2]))
