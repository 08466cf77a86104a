"""CLI commands of the scaling stage: `lmforge plan` (budget → model size and tokens, FLOPs, time, cost,
training and serving memory) and `lmforge scaling fit|sweep` (laws fitted to runs; IsoFLOP sweeps). Heavy
imports stay inside the functions, so `lmforge --help` does not load torch.

    lmforge plan --compute 1e20 --gpu h100 --gpus 8 --price 2.5
    lmforge plan --model-config configs/pretrain/small.yaml --vocab-size 4096 --micro-batch 4 --json
    lmforge scaling fit chinchilla.csv --drop-highest 5 --bootstrap 100 --compute 1e21
    lmforge scaling sweep --config configs/scaling/cpu.yaml
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from lmforge.config import ConfigError, UserError
from lmforge.hardware import COMPUTE_DTYPES, DTYPES, QUANT_SCHEMES
from lmforge.registry import command

PRECISIONS = list(COMPUTE_DTYPES)  # fp32, bf16, fp16: what training autocasts to, what weights are served in
KV_DTYPES = list(DTYPES)  # fp32, bf16, fp16, fp8, int8
QUANT_CHOICES = list(QUANT_SCHEMES)  # lmforge.infer.quantize.SCHEMES is keyed by the same tuple


def _plan_args(p: argparse.ArgumentParser) -> None:
    what = p.add_argument_group("what to plan (one of --compute, --params, --model-config; --compute combines)")
    what.add_argument("--compute", type=float, metavar="FLOPS", help="training budget in FLOPs, e.g. 1e20")
    what.add_argument("--model-config", metavar="PATH", help="ModelConfig YAML, or a recipe with a model: section")
    what.add_argument("--vocab-size", type=int, metavar="V", help="set vocab_size (recipes take theirs from data)")
    what.add_argument("--params", type=float, metavar="N", help="parameters, embeddings included (no shapes)")
    what.add_argument("--tokens", type=float, metavar="D", help="training tokens (default: the budget's, or r·N)")
    what.add_argument("--tokens-per-param", type=float, default=20.0, metavar="R",
                      help="compute-optimal tokens per parameter (default 20, Hoffmann et al. 2022)")  # fmt: skip
    what.add_argument("--law", default="hoffmann", help="frontier of eq. 4: hoffmann, epoch, or a fit JSON path")
    what.add_argument("--kv-example", action="store_true", help="print the 128K × 1024 × 40 × 2 KV-cache example")
    hw = p.add_argument_group("hardware and cost")
    hw.add_argument("--gpu", default="h100", help="a100, a100-40gb, h100, h100-pcie, h200, tpu-v4, ... (default h100)")
    hw.add_argument("--gpus", type=int, default=1, metavar="K", help="accelerators training together (default 1)")
    hw.add_argument("--mfu", type=float, default=0.4, metavar="F", help="model FLOPs utilisation (default 0.4)")
    hw.add_argument("--price", type=float, metavar="USD", help="price per accelerator-hour")
    hw.add_argument("--peak-tflops", type=float, metavar="TFLOPS", help="override the datasheet's dense peak")
    hw.add_argument("--memory-gib", type=float, metavar="GIB", help="override the accelerator's memory")
    tr = p.add_argument_group("training memory (per rank)")
    tr.add_argument("--precision", choices=PRECISIONS, default="bf16", help="fp32, or bf16/fp16 autocast")
    tr.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    tr.add_argument("--fsdp-ranks", type=int, metavar="R", help="shard weights, grads, Adam over R ranks (else DDP)")
    tr.add_argument("--micro-batch", type=int, default=1, metavar="B", help="sequences per rank per forward")
    tr.add_argument("--seq-len", type=int, metavar="T", help="training length (default: max_seq_len)")
    tr.add_argument("--grad-accumulation", type=int, default=1, metavar="K", help="micro-batches per step")
    sv = p.add_argument_group("serving memory")
    sv.add_argument("--dtype", choices=PRECISIONS, default="bf16", help="serving dtype of the weights (default bf16)")
    sv.add_argument("--quantize", choices=QUANT_CHOICES, help="lmforge weight quantization scheme")
    sv.add_argument("--group-size", type=int, default=64, metavar="G", help="int4 group size (default 64)")
    sv.add_argument("--kv-dtype", choices=KV_DTYPES, help="KV cache dtype (default: --dtype)")
    sv.add_argument("--context", type=int, metavar="T", help="tokens per sequence (default: the config's max_seq_len)")
    sv.add_argument("--batch", type=int, default=1, metavar="B", help="sequences served at once (default 1)")
    sv.add_argument("--reserve", type=float, default=0.1, metavar="F", help="memory fraction kept back (default 0.1)")
    sv.add_argument("--serve-gpus", type=int, default=1, metavar="K", help="accelerators the model is split over")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


@command("plan", help="plan a run: model size and tokens for a budget, FLOPs, time, cost, memory",
         arguments=_plan_args)  # fmt: skip
def plan(args: argparse.Namespace) -> None:
    from lmforge.scaling.plan import PlanOptions, make_plan, render

    fields = PlanOptions.__dataclass_fields__
    options = PlanOptions(**{k: v for k, v in vars(args).items() if k in fields})
    result = make_plan(options)  # checks the numbers given (ConfigError); a bad --gpu or --law is a UserError
    print(json.dumps(result, indent=1) if args.json else render(result), end="\n" if args.json else "")


# ---- lmforge scaling fit | sweep ---------------------------------------------------------------------------


def _scaling_args(p: argparse.ArgumentParser) -> None:
    from lmforge.registry import add_config_arguments

    sub = p.add_subparsers(dest="scaling_command", metavar="fit|sweep", required=True)
    fit = sub.add_parser("fit", help="fit scaling laws to a CSV of runs, run folders or a run's loss curve",
                         description="Fit L(N, D) (Hoffmann's Approach 3), IsoFLOP parabolas (Approach 2) or "
                                     "L = a·x^b + c to runs. N counts all parameters (embeddings too).")  # fmt: skip
    fit.add_argument("inputs", nargs="+", help="a CSV (params, tokens or flops, loss), a sweep folder, run folders")
    fit.add_argument("--method", choices=["chinchilla", "isoflop", "curve", "all"], default="all",
                     help="curve: L = a·x^b + c over one run's metrics.jsonl or over the CSV's N (default: all "
                          "that the input allows)")  # fmt: skip
    fit.add_argument(
        "--x",
        choices=["params", "tokens", "flops", "steps"],
        default=None,
        help="--method curve: the x axis (a run folder: steps|tokens|flops; a CSV: params|tokens|flops)",
    )
    fit.add_argument(
        "--drop-highest",
        type=int,
        default=0,
        metavar="K",
        help="drop the K highest-loss runs first (Epoch drop 5 of Chinchilla's 245)",
    )
    fit.add_argument(
        "--starts",
        type=int,
        default=4500,
        metavar="K",
        help="L-BFGS starts taken evenly from Hoffmann's 4,500-point grid (default all, ~1 min)",
    )
    fit.add_argument("--bootstrap", type=int, default=0, metavar="B", help="bootstrap resamples for 95%% intervals")
    fit.add_argument("--target-loss", type=float, help="also print the compute needed to reach this loss")
    fit.add_argument(
        "--compute",
        type=float,
        action="append",
        default=[],
        metavar="C",
        help="also print the optimal N, D and loss at this budget (repeatable)",
    )
    fit.add_argument("--out", type=Path, help="write the fit as JSON (`lmforge plan --law PATH` reads it)")
    fit.add_argument("--plot", type=Path, metavar="DIR", help="write isoflop/frontier/loss-vs-compute PNGs here")
    fit.add_argument("--json", action="store_true", help="print the fit as JSON")
    sweep = sub.add_parser("sweep", help="train an IsoFLOP grid, fit it, predict and test a held-out run",
                           description="Train budgets × sizes with the project's trainer, fit, pre-register the "
                                       "held-out run's predicted loss, train it, compare. Resumable.")  # fmt: skip
    add_config_arguments(sweep)
    sweep.add_argument("--dry-run", action="store_true", help="print the grid (shapes, tokens, steps) and stop")


@command("scaling", help="fit scaling laws to runs, or run an IsoFLOP sweep", arguments=_scaling_args)
def scaling(args: argparse.Namespace) -> None:
    if args.scaling_command == "sweep":
        from lmforge.registry import config_from_args
        from lmforge.scaling.sweep import SweepConfig, run_sweep

        root = run_sweep(config_from_args(SweepConfig, args), dry_run=args.dry_run)
        if not args.dry_run:
            print(f"sweep folder: {root} (runs.csv, fit.json, prediction.json, report.md, plots)")
        return
    _check_fit_args(args)
    _fit(args)  # bad input data (missing columns, too few runs, no minimum) is a UserError from where it is read


def _check_fit_args(args: argparse.Namespace) -> None:
    """The numbers `scaling fit` takes, checked before any input is read."""
    for c in args.compute:
        if not (c > 0 and math.isfinite(c)):
            raise ConfigError(f"--compute must be a positive number of FLOPs, got {c}")
    if args.target_loss is not None and not (args.target_loss > 0 and math.isfinite(args.target_loss)):
        raise ConfigError(f"--target-loss must be a positive number, got {args.target_loss}")
    for name in ("drop_highest", "bootstrap"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(args, name)}")
    if args.starts < 1:
        raise ConfigError(f"--starts must be ≥ 1, got {args.starts}")


def _fit(args: argparse.Namespace) -> None:
    from lmforge.runs import atomic_write_text
    from lmforge.scaling import fit as fitting
    from lmforge.scaling.inputs import load_curve, load_runs

    out: dict = {}
    lines: list[str] = []
    single_run = (
        len(args.inputs) == 1 and Path(args.inputs[0]).is_dir() and (Path(args.inputs[0]) / "metrics.jsonl").is_file()
    )
    if args.method == "curve" or (single_run and args.method == "all"):
        if single_run:
            x, y = load_curve(args.inputs[0], x=args.x or "tokens")
            label = args.x or "tokens"
        else:
            runs = load_runs(args.inputs).drop_highest_loss(args.drop_highest)
            label = args.x or "params"
            x, y = getattr(runs, label), runs.loss
        curve = fitting.fit_power_law(x, y)
        out["curve"] = {**curve.to_dict(), "x": label}
        lines.append(f"loss vs {label}: L = {curve}")
        if args.target_loss is not None:
            lines.append(f"  reaches {args.target_loss:g} at {label} = {curve.solve(args.target_loss):.4g}")
    else:
        runs = load_runs(args.inputs).drop_highest_loss(args.drop_highest)
        lines.append(f"{len(runs)} runs from {runs.source}")
        law = None
        if args.method in ("isoflop", "all"):
            try:
                iso = fitting.fit_isoflop(runs.budget, runs.params, runs.loss)
            except UserError as e:  # too few budgets or sizes for Approach 2: the other fits still run
                if args.method == "isoflop":
                    raise
                lines.append(f"IsoFLOP: skipped ({e})")
            else:
                out.update(iso.to_dict())
                lines.append(f"IsoFLOP (Approach 2): N_opt ∝ C^{iso.n_exponent:.3f}, D_opt ∝ C^{iso.d_exponent:.3f}")
                for p in iso.parabolas:
                    mark = "" if p.bracketed else "  (minimum outside the sizes trained)"
                    lines.append(f"  C = {p.compute:.3g}: N_opt {p.n_opt:,.0f}, min loss {p.loss_min:.4f}{mark}")
                for c in args.compute:
                    n, d = iso.optimal(c)
                    lines.append(f"  at C = {c:.3g}: N {n:,.0f}, D {d:,.0f}")
        if args.method in ("chinchilla", "all"):
            stride = max(1, round(4500 / max(args.starts, 1)))
            fit = fitting.fit_chinchilla(runs.params, runs.tokens, runs.loss,
                                         starts=fitting.hoffmann_grid()[::stride], progress=True)  # fmt: skip
            if args.bootstrap:
                fitting.bootstrap_chinchilla(runs.params, runs.tokens, runs.loss, fit, samples=args.bootstrap)
            out.update(fit.to_dict())
            law = fit.law
            lines.append(f"Chinchilla (Approach 3, Huber δ={fit.delta:g}, {fit.n_starts} starts): {law}")
            lines.append(f"  summed Huber {fit.objective:.6g}")
            for name, (lo, hi) in fit.intervals.items():
                lines.append(f"  {name:<5} 95% interval [{lo:.4g}, {hi:.4g}]")
            for c in args.compute:
                n, d = law.optimal(c)
                lines.append(f"  at C = {c:.3g}: N {n:,.0f}, D {d:,.0f}, loss {law.loss_at_compute(c):.4f}")
            if args.target_loss is not None:
                lines.append(
                    f"  reaching loss {args.target_loss:g} needs C = {law.compute_for_loss(args.target_loss):.4g} FLOPs"
                )
        if args.plot:
            from lmforge.scaling.plots import plot_sweep

            rows = [{"budget": b, "flops": c, "params": n, "tokens": d, "val_loss": v}
                    for b, c, n, d, v in zip(runs.budget, runs.flops, runs.params, runs.tokens, runs.loss)]  # fmt: skip
            iso_fit = None
            if "isoflop" in out:
                iso_fit = fitting.fit_isoflop(runs.budget, runs.params, runs.loss)
            paths = plot_sweep(args.plot, rows, iso_fit, law, None)
            lines.append("plots: " + ", ".join(map(str, paths)))
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=2))
        lines.append(f"fit written to {args.out}")
    print(json.dumps(out, indent=2) if args.json else "\n".join(lines))
