"""Run reports: plots of a run's metrics.jsonl (loss.png), readable by a person without TensorBoard.

python -c "from lmforge.report import plot_metrics; plot_metrics('runs/demo')"
"""

from __future__ import annotations

from pathlib import Path

from lmforge.runs import RunDir, atomic_open, read_metrics


def plot_metrics(run: RunDir | str | Path, out: str = "loss.png") -> Path | None:
    """Training loss (and val loss, when logged) against step, with val bits-per-byte on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run.path if isinstance(run, RunDir) else Path(run)
    rows = read_metrics(path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]  # null: a skipped step
    val = [(r["step"], r["val_loss"], r.get("val_bpb")) for r in rows if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(*zip(*train), label="train loss", lw=1, alpha=0.8)
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.set_title(path.name)
    if val and val[-1][2] is not None:
        bpb = ax.twinx()
        bpb.plot([v[0] for v in val], [v[2] for v in val], "s--", color="tab:green", label="val bits/byte", ms=3)
        bpb.set_ylabel("val bits per byte")
        bpb.legend(loc="upper center")
    ax.legend(loc="upper right")
    fig.tight_layout()
    target = path / out
    with atomic_open(target, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return target
