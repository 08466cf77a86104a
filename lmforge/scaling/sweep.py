"""IsoFLOP sweeps: for each compute budget train several model sizes with the project's trainer, fit, predict
the loss of a bigger held-out run *before* training it, then train it and compare.

    lmforge scaling sweep --config configs/scaling/cpu.yaml [--dry-run]     # ~15 minutes on 2 CPU cores

Writes `runs/<name>/`: one run folder per model trained, `runs.csv` (N, D, C = 6·N·D, losses, seconds),
`fit.json`, `prediction.json` (written before the held-out run starts), plots and `report.md`. An interrupted
sweep continues where it stopped: runs with a final val loss in `runs.csv` are not trained again.

Design (Hoffmann et al. 2022, Approach 2): at budget C, sizes are spaced evenly in log N around a centre,
each trained for D = C / 6N tokens with a cosine schedule that ends at D (their finding: a schedule longer than
the run overstates the loss). The first centre assumes `tokens_per_param` tokens per parameter; each later
centre moves to the previous budget's parabola minimum scaled by √(C/C_prev), so the grid follows the
frontier even when the first guess is off.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lmforge.config import UserError
from lmforge.model.config import ModelConfig
from lmforge.runs import atomic_open, atomic_write_text

CSV_FIELDS = ["name", "role", "budget", "n_layer", "d_model", "n_head", "params", "tokens", "flops", "steps",
              "val_loss", "train_loss", "seconds"]  # fmt: skip


@dataclass
class SweepConfig:
    name: str = "isoflop"
    runs_dir: str = "runs"
    data: str = "data/python-stdlib-char"
    budgets: list[float] = field(default_factory=lambda: [3e11, 1e12, 3e12])  # C = 6·N·D FLOPs
    sizes: int = 5  # model sizes per budget
    spread: float = 8.0  # largest ÷ smallest N at one budget
    tokens_per_param: float = 20.0  # first centre (Hoffmann's rule of thumb)
    holdout_factor: float = 4.0  # held-out run at this multiple of the largest budget; 0 = none
    n_layer: int = 2  # fixed depth, width varies; 0: depth grows with width (d_model / n_layer ≈ layer_width)
    layer_width: int = 32
    head_dim: int = 32
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    eval_batches: int = 40  # val windows of 16 × seq_len, the same ones for every run
    seed: int = 0
    fit_grid_stride: int = 1  # Chinchilla fit from every k-th of Hoffmann's 4,500 starts (1 = all)
    progress: bool = True
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(position="rope", ffn="swiglu", norm="rmsnorm", bias=False)
    )

    def validate(self) -> None:
        if len(self.budgets) < 2 or any(b <= 0 for b in self.budgets):
            raise ValueError(f"budgets must be ≥ 2 positive FLOP counts, got {self.budgets}")
        if self.sizes < 3:
            raise ValueError(f"a parabola needs ≥ 3 sizes per budget, got sizes={self.sizes}")
        if self.spread <= 1:
            raise ValueError(f"spread must be > 1 (largest ÷ smallest model), got {self.spread}")


@dataclass(frozen=True)
class PlannedRun:
    name: str
    role: str  # "sweep" or "holdout"
    budget: float
    model: ModelConfig
    steps: int
    tokens_per_step: int

    @property
    def params(self) -> int:
        return self.model.param_counts()["total"]

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return 6.0 * self.params * self.tokens


def model_for_params(target: float, cfg: SweepConfig, vocab_size: int, above: int = 0) -> ModelConfig:
    """The shape nearest to `target` parameters (embeddings included) in log space, with more than `above`
    parameters: d_model a multiple of 8, and n_layer fixed (`cfg.n_layer`) or with d_model / n_layer within
    1.5× of `layer_width`. A fixed depth keeps the family smooth: from one layer to two the loss jumps (two
    layers can form induction heads, Olsson et al. 2022), which breaks IsoFLOP parabolas at tiny sizes."""
    best, best_gap = None, math.inf
    for d in range(16, 1025, 8):
        deepest = max(1, math.floor(d * 1.5 / cfg.layer_width))  # one layer is allowed however narrow
        depths = [cfg.n_layer] if cfg.n_layer else range(max(1, math.ceil(d / cfg.layer_width / 1.5)), deepest + 1)
        for n_layer in depths:
            m = shape(cfg, vocab_size, d, n_layer)
            params = m.param_counts()["total"]
            if params <= above:
                continue
            # nearest size first; among near-equal sizes the aspect closest to layer_width
            gap = abs(math.log(params / target)) + 1e-3 * abs(math.log(d / n_layer / cfg.layer_width))
            if gap < best_gap:
                best, best_gap = m, gap
    return best


def shape(cfg: SweepConfig, vocab_size: int, d_model: int, n_layer: int) -> ModelConfig:
    # the most heads whose (even, for rope) width is still ≥ head_dim (or the whole model when it is narrower)
    width = min(cfg.head_dim, d_model)
    n_head = max(
        h for h in range(1, d_model // 2 + 1) if d_model % h == 0 and d_model // h % 2 == 0 and d_model // h >= width
    )
    # d_ff in steps of 8, not the default 64: at these widths a step of 64 doubles a block's size at once
    d_ff = 8 * math.ceil(8 * d_model / 3 / 8) if cfg.model.ffn == "swiglu" else 4 * d_model
    return replace(cfg.model, vocab_size=vocab_size, max_seq_len=cfg.seq_len, n_layer=n_layer, d_model=d_model,
                   n_head=n_head, n_kv_head=None, head_dim=None, d_ff=d_ff)  # fmt: skip


def plan_budget(cfg: SweepConfig, budget: float, center: float, vocab_size: int) -> list[PlannedRun]:
    """`cfg.sizes` distinct shapes spaced evenly in log N around `center`, each for D = C / 6N tokens."""
    tokens_per_step = cfg.batch_size * cfg.seq_len
    runs, above = [], 0
    for k in np.linspace(-0.5, 0.5, cfg.sizes):
        m = model_for_params(center * cfg.spread**k, cfg, vocab_size, above)
        above = m.param_counts()["total"]
        steps = max(1, round(budget / (6 * m.param_counts()["total"] * tokens_per_step)))
        runs.append(PlannedRun(f"C{budget:.2g}-{m.n_layer}x{m.d_model}".replace("+", ""), "sweep", budget, m, steps,
                               tokens_per_step))  # fmt: skip
    return runs


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [
            {k: (v if k in ("name", "role") else float(v)) for k, v in row.items() if v != ""}
            for row in csv.DictReader(f)
        ]


def write_rows(path: Path, rows: list[dict]) -> None:
    with atomic_open(path) as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def train(run: PlannedRun, cfg: SweepConfig, root: Path) -> dict:
    """One run through `lmforge pretrain`'s code path; returns its CSV row."""
    from lmforge.train.loop import TrainConfig
    from lmforge.train.pretrain import EvalConfig, PretrainConfig
    from lmforge.train.pretrain import run as pretrain

    tcfg = TrainConfig(
        steps=run.steps, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.lr * cfg.min_lr_ratio,
        warmup_steps=max(1, round(cfg.warmup_fraction * run.steps)), precision="fp32", eval_every=run.steps,
        log_every=max(1, run.steps // 20), checkpoint_every=run.steps, keep_checkpoints=1, seed=cfg.seed,
        progress=cfg.progress,
    )  # fmt: skip
    pcfg = PretrainConfig(data=cfg.data, name=run.name, runs_dir=str(root), model=run.model, train=tcfg,
                          eval=EvalConfig(batches=cfg.eval_batches, batch_size=16))  # fmt: skip
    folder = root / run.name
    if folder.exists():  # a run interrupted before its row was written: start it again
        import shutil

        shutil.rmtree(folder)
    t0 = time.perf_counter()
    run_dir = pretrain(pcfg)
    seconds = time.perf_counter() - t0
    last = [r for r in run_dir.read_metrics() if "val_loss" in r][-1]
    train_losses = [r["loss"] for r in run_dir.read_metrics() if r.get("loss") is not None][-5:]
    return {"name": run.name, "role": run.role, "budget": run.budget, "n_layer": run.model.n_layer,
            "d_model": run.model.d_model, "n_head": run.model.n_head, "params": run.params, "tokens": run.tokens,
            "flops": run.flops, "steps": run.steps, "val_loss": last["val_loss"],
            "train_loss": float(np.mean(train_losses)), "seconds": round(seconds, 1)}  # fmt: skip


def _vocab_size(data: str) -> int:
    meta = Path(data) / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(
            f"no prepared corpus at {data}: run `lmforge prepare --config configs/data/stdlib-char.yaml`"
        )
    from lmforge.train.pretrain import padded_vocab_size

    return padded_vocab_size(json.loads(meta.read_text())["tokenizer"]["vocab_size"])


def describe(runs: list[PlannedRun]) -> str:
    lines = [f"{'run':<18} {'L×d':>7} {'params':>9} {'tokens':>10} {'tok/param':>9} {'steps':>6}"]
    for r in runs:
        lines.append(f"{r.name:<18} {r.model.n_layer:>2}×{r.model.d_model:<4} {r.params:>9,} {r.tokens:>10,} "
                     f"{r.tokens / r.params:>9.1f} {r.steps:>6}")  # fmt: skip
    return "\n".join(lines)


def run_sweep(cfg: SweepConfig, *, dry_run: bool = False) -> Path:
    """Train the IsoFLOP grid, fit it, pre-register the held-out prediction, train the held-out run, report."""
    from .fit import fit_parabola

    cfg.validate()
    vocab = _vocab_size(cfg.data)
    root = Path(cfg.runs_dir) / cfg.name
    csv_path = root / "runs.csv"
    rows = read_rows(csv_path)
    done = {r["name"]: r for r in rows}
    center = math.sqrt(min(cfg.budgets) / (6 * cfg.tokens_per_param))
    previous: tuple[float, float] | None = None  # (budget, its parabola's N_opt)
    if not dry_run:
        root.mkdir(parents=True, exist_ok=True)
    for budget in sorted(cfg.budgets):
        if previous is not None:
            center = previous[1] * math.sqrt(budget / previous[0])
        planned = plan_budget(cfg, budget, center, vocab)
        print(f"\n== budget C = {budget:.2g} FLOPs: {len(planned)} sizes around N ≈ {center:,.0f}")
        print(describe(planned))
        if dry_run:
            previous = (budget, center)
            continue
        for run in planned:
            if run.name not in done:
                row = train(run, cfg, root)
                rows.append(row)
                done[run.name] = row
                write_rows(csv_path, rows)
            r = done[run.name]
            print(f"   {run.name}: val loss {r['val_loss']:.4f} in {r['seconds']:.0f} s")
        at_budget = [r for r in rows if r["role"] == "sweep" and r["budget"] == budget]
        best = min(at_budget, key=lambda r: r["val_loss"])["params"]
        try:
            parabola = fit_parabola(budget, [r["params"] for r in at_budget], [r["val_loss"] for r in at_budget])
        except UserError as e:  # too few sizes, or no minimum: the next grid moves towards the best run
            print(f"   {e}")
            parabola = None
        # an unbracketed minimum is an extrapolation: move the next grid towards the best run trained instead
        n_opt = parabola.n_opt if parabola is not None and parabola.bracketed else best
        if parabola is not None:
            print(f"   parabola minimum N ≈ {parabola.n_opt:,.0f}{'' if parabola.bracketed else ' (not bracketed)'}")
        previous = (budget, n_opt)
    if dry_run:
        return root
    report = analyse(cfg, root, rows, vocab)
    print(report)
    return root


def analyse(cfg: SweepConfig, root: Path, rows: list[dict], vocab: int) -> str:
    """Fit the sweep, pre-register and train the held-out run, write fit.json, plots and report.md."""
    from .fit import fit_chinchilla, fit_isoflop, hoffmann_grid
    from .plots import plot_sweep

    sweep = [r for r in rows if r["role"] == "sweep"]
    c, n, d, loss = (np.array([r[k] for r in sweep]) for k in ("flops", "params", "tokens", "val_loss"))
    iso = fit_isoflop([r["budget"] for r in sweep], n, loss)
    law_fit = fit_chinchilla(n, d, loss, starts=hoffmann_grid()[:: cfg.fit_grid_stride], progress=cfg.progress)
    fits = {**iso.to_dict(), **law_fit.to_dict()}
    atomic_write_text(root / "fit.json", json.dumps(fits, indent=2))
    holdout = None
    if cfg.holdout_factor > 0:
        holdout = _holdout(cfg, root, rows, vocab, iso, law_fit)
    plot_sweep(root, sweep, iso, law_fit.law, holdout)
    return write_report(cfg, root, sweep, iso, law_fit, holdout)


def _holdout(cfg, root, rows, vocab, iso, law_fit) -> dict:
    """Pre-register (prediction.json, never overwritten) the held-out run's shape and predicted loss, then
    train it (unless done) and return its row joined with the prediction."""
    budget = cfg.holdout_factor * max(cfg.budgets)
    pred_path = root / "prediction.json"
    if pred_path.is_file():
        prediction = json.loads(pred_path.read_text())
    else:
        n_target, _ = iso.optimal(budget)
        model = model_for_params(n_target, cfg, vocab)
        tps = cfg.batch_size * cfg.seq_len
        steps = max(1, round(budget / (6 * model.param_counts()["total"] * tps)))
        run = PlannedRun(f"holdout-C{budget:.2g}".replace("+", ""), "holdout", budget, model, steps, tps)
        prediction = {
            "name": run.name, "budget": budget, "d_model": model.d_model, "n_layer": model.n_layer,
            "n_head": model.n_head, "params": run.params, "tokens": run.tokens, "steps": steps,
            "n_target_isoflop": n_target,
            "predicted_loss": law_fit.law.loss(run.params, run.tokens),  # the pre-registered figure
            "predicted_loss_isoflop_curve": iso.loss_curve(budget) if iso.loss_curve else None,
            "method": "Chinchilla L(N, D) fitted to the sweep (Approach 3) at the held-out run's N and D; "
                      "N chosen on the IsoFLOP frontier (Approach 2)",
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }  # fmt: skip
        atomic_write_text(pred_path, json.dumps(prediction, indent=2))
    print(f"\n== held-out run at C = {budget:.2g}: predicted val loss {prediction['predicted_loss']:.4f} "
          f"(written to {pred_path} before training)")  # fmt: skip
    row = next((r for r in rows if r["name"] == prediction["name"]), None)
    if row is None:
        model = shape(cfg, vocab, int(prediction["d_model"]), int(prediction["n_layer"]))
        run = PlannedRun(prediction["name"], "holdout", budget, model, int(prediction["steps"]),
                         cfg.batch_size * cfg.seq_len)  # fmt: skip
        print(describe([run]))
        row = train(run, cfg, root)
        rows.append(row)
        write_rows(root / "runs.csv", rows)
    error = row["val_loss"] / prediction["predicted_loss"] - 1
    return {**row, **{k: v for k, v in prediction.items() if k.startswith("predicted")}, "error": error}


def write_report(cfg, root: Path, sweep, iso, law_fit, holdout) -> str:
    law = law_fit.law
    minutes = sum(r["seconds"] for r in sweep) / 60
    lines = [
        f"# IsoFLOP sweep `{cfg.name}`",
        "",
        f"{len(sweep)} runs on `{cfg.data}` in {minutes:.1f} minutes of training; N counts all parameters "
        "(embeddings included), D = tokens trained, C = 6·N·D.",
        "",
        "| budget C | N_opt (parabola) | bracketed | min val loss |",
        "|---|---|---|---|",
        *[f"| {p.compute:.2g} | {p.n_opt:,.0f} | {'yes' if p.bracketed else 'no'} | {p.loss_min:.4f} |"
          for p in iso.parabolas],
        "",
        f"- IsoFLOP frontier: N_opt ∝ C^{iso.n_exponent:.3f}, D_opt ∝ C^{iso.d_exponent:.3f}"
        + (f"; L_min(C) = {iso.loss_curve}" if iso.loss_curve else ""),
        f"- Chinchilla fit (Huber δ=1e-3, {law_fit.n_starts} starts): {law} (objective {law_fit.objective:.4g})",
    ]  # fmt: skip
    if holdout:
        lines += [
            "",
            f"Held-out run at {holdout['budget']:.2g} FLOPs ({cfg.holdout_factor:g}× the largest budget): "
            f"{holdout['n_layer']:.0f}×{holdout['d_model']:.0f}, N = {holdout['params']:,.0f}, "
            f"D = {holdout['tokens']:,.0f}.",
            f"- predicted before training: {holdout['predicted_loss']:.4f} (Chinchilla fit)"
            + (f", {holdout['predicted_loss_isoflop_curve']:.4f} (IsoFLOP L_min curve)"
               if holdout.get("predicted_loss_isoflop_curve") else ""),
            f"- measured: {holdout['val_loss']:.4f} → error {holdout['error']:+.2%} (goal within 3%)",
        ]  # fmt: skip
    lines += [
        "",
        "![IsoFLOP curves](isoflop.png)",
        "![frontier](frontier.png)",
        "![loss vs compute](loss_vs_compute.png)",
    ]
    text = "\n".join(lines) + "\n"
    atomic_write_text(root / "report.md", text)
    return text
