"""Plots of a scaling sweep: IsoFLOP curves with their parabolas, the compute-optimal frontier, and loss
against compute with the fitted laws and the held-out run. PNGs written next to the sweep's runs.csv.

    from lmforge.scaling.plots import plot_sweep   # called by `lmforge scaling sweep` and `scaling fit --plot`
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .fit import IsoFLOPFit
from .laws import ChinchillaLaw

LOSS = "val loss (nats/token)"
COMPUTE = "compute C = 6·N·D (FLOPs)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(
    out_dir: str | Path, runs: list[dict], iso: IsoFLOPFit | None, law: ChinchillaLaw | None, holdout: dict | None
) -> list[Path]:
    """isoflop.png, frontier.png and loss_vs_compute.png in `out_dir`; `runs` rows carry budget (or flops),
    params, tokens and val_loss; `holdout` (optional) adds the held-out run with its predicted loss."""
    out_dir = Path(out_dir)
    plt = _pyplot()
    paths = []
    colors = plt.get_cmap("viridis")
    budgets = sorted({r.get("budget", r["flops"]) for r in runs})

    if iso is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for i, p in enumerate(iso.parabolas):
            col = colors(i / max(len(iso.parabolas) - 1, 1))
            pts = [r for r in runs if abs(r.get("budget", r["flops"]) / p.compute - 1) < 0.05]
            ax.scatter([r["params"] for r in pts], [r["val_loss"] for r in pts], color=col, zorder=3)
            grid = np.geomspace(p.n_range[0] / 1.3, p.n_range[1] * 1.3, 100)
            ax.plot(grid, p(grid), color=col, label=f"C = {p.compute:.2g}")
            ax.plot(p.n_opt, p.loss_min, "*", color=col, ms=12, mec="k")
        if holdout:
            ax.plot(holdout["params"], holdout["val_loss"], "D", color="tab:red",
                    label=f"held-out run, C = {holdout['budget']:.2g} (measured)")  # fmt: skip
            ax.plot(holdout["params"], holdout["predicted_loss"], "x", color="k", ms=9, mew=2, label="its prediction")
        title = "IsoFLOP curves: loss vs size at fixed compute (★ = parabola minimum)"
        paths.append(_finish(fig, ax, out_dir / "isoflop.png", "parameters N (embeddings included)", LOSS, title))

        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        cs = np.array([p.compute for p in iso.parabolas])
        span = np.geomspace(cs.min() / 2, cs.max() * (holdout["budget"] / cs.max() * 1.5 if holdout else 4), 50)
        ax.plot(cs, [p.n_opt for p in iso.parabolas], "o", label="N_opt (IsoFLOP minima)")
        ax.plot(span, [iso.optimal(c)[0] for c in span], "-", label=f"fit N_opt ∝ C^{iso.n_exponent:.2f}")
        if law is not None:
            ax.plot(span, [law.optimal(c)[0] for c in span], "--", label="Chinchilla fit, eq. 4")
        ax.plot(span, np.sqrt(span / 120), ":", color="gray", label="20 tokens/parameter")
        if holdout:
            ax.plot(holdout["budget"], holdout["params"], "D", color="tab:red", label="held-out run")
        ax.set_yscale("log")
        paths.append(
            _finish(fig, ax, out_dir / "frontier.png", COMPUTE, "compute-optimal N", "Compute-optimal frontier")
        )

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    flops = np.array([r["flops"] for r in runs])
    for i, b in enumerate(budgets):
        pts = [r for r in runs if r.get("budget", r["flops"]) == b]
        ax.scatter([r["flops"] for r in pts], [r["val_loss"] for r in pts], s=18,
                   color=colors(i / max(len(budgets) - 1, 1)))  # fmt: skip
    top = holdout["budget"] * 1.5 if holdout else flops.max() * 4
    span = np.geomspace(flops.min() / 1.5, top, 60)
    if law is not None:
        ax.plot(span, [law.loss_at_compute(c) for c in span], "-", label="Chinchilla fit: L at the frontier")
    if iso is not None and iso.loss_curve is not None:
        ax.plot(span, iso.loss_curve(span), "--", label="IsoFLOP minima: a·C^b + c")
    if holdout:
        ax.plot(holdout["flops"], holdout["val_loss"], "D", color="tab:red", ms=8, label="held-out, measured")
        ax.plot(holdout["flops"], holdout["predicted_loss"], "x", color="k", ms=10, mew=2,
                label=f"held-out, predicted ({holdout['error']:+.1%})")  # fmt: skip
    paths.append(_finish(fig, ax, out_dir / "loss_vs_compute.png", COMPUTE, LOSS, "Loss vs compute"))
    return paths


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Log x axis, labels, grid and legend; then write the PNG atomically."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    tmp.replace(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
