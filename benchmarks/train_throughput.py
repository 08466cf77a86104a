"""Training throughput of the 10.8M GPT: lmforge `Transformer` against HF `GPT2LMHeadModel` of the same shape.

Shape (Karpathy's char-level Shakespeare GPT): vocab 65, 6 layers, d=384, 6 heads, T=256, B=16, tanh-GELU,
learned positions, tied embeddings, no dropout. One step = forward, cross-entropy, backward, AdamW step
(weight decay only on ≥2-D weights), zero_grad(set_to_none=True), on a fixed random batch. All cases of a
dtype run interleaved in one `Bench` — HF eager (the baseline), ours eager, both under `torch.compile`
(compile time excluded by warming up first, and reported apart), ours with activation checkpointing — and
beside them a 2048² matmul of the same dtype, so MFU is also taken against the peak *in the same run*
(a shared machine's load moves both alike). FLOPs/token for both models: `ModelConfig.flops_per_token(256)`
(6N + 12·L·H·Q·T).

bf16 autocast runs only when this CPU's bf16 matmul reaches 1/4 of its fp32 rate (`cpu_supports_fast_bf16`):
on an AVX2-only CPU bf16 is emulated ~100× slower, and one step would take minutes. `--force-bf16` runs it.

Activation checkpointing memory: live tensors of one forward+backward (MemTracker, the model tracked so
weights and gradients are counted apart from activations), and peak RSS growth of a fresh subprocess that
builds the model and runs one forward+backward (weights and gradients included, both cases alike).

    python -m benchmarks.train_throughput               # full run (~10 min on 2 cores)
    python -m benchmarks.train_throughput --quick       # 2 layers, B=4, 3 repeats: a smoke run
    python -m benchmarks.train_throughput --record      # append the figures to docs/benchmarks.md
    python -m benchmarks.train_throughput --profile     # top ops of ours and HF, side by side (fp32, eager)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.harness import (
    Bench,
    BenchResult,
    Table,
    add_common_args,
    apply_common_args,
    command_line,
    environment,
    fmt_bytes,
    peak_live_memory,
    peak_rss_growth,
    record,
    verdict,
)
from lmforge.model import ModelConfig, Transformer
from lmforge.train.loop import TrainConfig, make_optimizer
from lmforge.train.mfu import mfu
from lmforge.train.peak import cpu_bf16_ratio, matmul_peak

VOCAB, T, LR = 65, 256, 3e-4
PEAK_N = 2048
GOAL_SAVING, GOAL_SLOWDOWN, GOAL_VS_HF, GOAL_MFU = 0.50, 0.40, 1.05, 0.75


@dataclass
class Shape:
    n_layer: int = 6
    batch: int = 16

    def config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=VOCAB, max_seq_len=T, n_layer=self.n_layer, d_model=384, n_head=6,
            ffn="gelu_tanh", position="learned", dropout=0.0,
        )  # fmt: skip

    @property
    def tokens(self) -> int:
        return self.batch * T


def make_lmforge(shape: Shape, checkpointing: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = Transformer(shape.config())
    for block in model.blocks:  # the flag the block reads (the Trainer sets it from TrainConfig)
        block.checkpoint = checkpointing
    return model.train()


def make_hf(shape: Shape) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=384, n_layer=shape.n_layer, n_head=6, n_positions=T, vocab_size=VOCAB,
        attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).train()


def logits_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Both models as idx -> logits; the loss is computed outside, identically."""
    if isinstance(model, Transformer) or isinstance(getattr(model, "_orig_mod", None), Transformer):
        return model
    return lambda idx: model(idx).logits


class Trainer:
    """One full training step of `model` on a fixed batch, optionally under bf16 autocast."""

    def __init__(self, model: nn.Module, batch: torch.Tensor, dtype: torch.dtype) -> None:
        self.model, self.forward = model, logits_fn(model)
        # the training loop's own AdamW: decay on matrices only, the same betas, lr LR
        self.opt = make_optimizer(model, TrainConfig(lr=LR, weight_decay=0.1, beta1=0.9, beta2=0.95))
        self.x, self.y = batch[:, :-1], batch[:, 1:]
        self.dtype = dtype

    def loss(self) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            logits = self.forward(self.x)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), self.y.reshape(-1))

    def forward_backward(self) -> None:
        self.loss().backward()

    def step(self) -> None:
        self.forward_backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def compile_trainer(model: nn.Module, batch, dtype, warm_steps: int = 2) -> tuple[Trainer, float]:
    """`torch.compile` the model and run it until compiled: returns the trainer and the first step's time
    (compilation + one step)."""
    trainer = Trainer(torch.compile(model), batch, dtype)
    t0 = time.perf_counter()
    trainer.step()
    first = time.perf_counter() - t0
    for _ in range(warm_steps):
        trainer.step()
    return trainer, first


def build_trainers(shape: Shape, dtype: torch.dtype, compile_: bool) -> tuple[dict[str, Trainer], dict]:
    """The cases of one dtype, named as the tables show them, plus each compiled case's first-step time."""
    batch = make_batch(shape)
    trainers = {
        "hf eager": Trainer(make_hf(shape), batch, dtype),
        "lmforge eager": Trainer(make_lmforge(shape), batch, dtype),
        "lmforge ckpt": Trainer(make_lmforge(shape, checkpointing=True), batch, dtype),
    }
    first_steps: dict[str, float] = {}
    if compile_:
        for name, make in (("lmforge compiled", make_lmforge), ("hf compiled", make_hf)):
            print(f"compiling {name} ({dtype_label(dtype)}) ...", flush=True)
            try:
                trainers[name], first_steps[name] = compile_trainer(make(shape), batch, dtype)
            except Exception as e:  # HF models do not always compile; say so and go on
                print(f"  {name}: torch.compile failed, case skipped: {type(e).__name__}: {e}".rstrip())
    return trainers, first_steps


def dtype_label(dtype: torch.dtype) -> str:
    return "bf16 autocast" if dtype == torch.bfloat16 else "fp32"


class MatmulCase:
    """The peak-FLOP/s reference timed inside the same Bench: one PEAK_N² matmul (or more: ≥ ~50 ms)."""

    def __init__(self, dtype: torch.dtype, n: int) -> None:
        self.a, self.b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        self.out = self.a @ self.b
        t0 = time.perf_counter()
        torch.mm(self.a, self.b, out=self.out)
        self.inner = max(1, round(0.05 / max(time.perf_counter() - t0, 1e-6)))
        self.flops = 2 * n**3 * self.inner

    def __call__(self) -> None:
        for _ in range(self.inner):
            torch.mm(self.a, self.b, out=self.out)


@dataclass
class DtypeRun:
    dtype: torch.dtype
    result: BenchResult
    first_steps: dict[str, float]
    cached_peak: float
    cached_source: str
    inrun_peak: float
    peak_n: int


def run_dtype(shape: Shape, dtype: torch.dtype, args, peak_n: int) -> DtypeRun:
    trainers, first_steps = build_trainers(shape, dtype, not args.no_compile)
    bench = Bench(
        repeats=args.repeats,
        warmup=args.warmup,
        title=f"training step, {dtype_label(dtype)}, B={shape.batch}",
    )
    for name, trainer in trainers.items():
        bench.add(name, trainer.step, baseline=name == "hf eager", work=shape.tokens, unit="tok")
    mm = MatmulCase(dtype, peak_n)
    bench.add(f"matmul {peak_n}²", mm, work=mm.flops, unit="FLOP")
    result = bench.run()
    result.print()
    cached = matmul_peak(dtype, "cpu", PEAK_N)  # measured (or refreshed) by main before this
    inrun = result[f"matmul {peak_n}²"].throughput
    return DtypeRun(dtype, result, first_steps, cached.flops, cached.describe(), inrun, peak_n)


def report_dtype(run: DtypeRun, shape: Shape, fpt: float) -> Table:
    label = dtype_label(run.dtype)
    table = Table(
        ["case", "tok/s", "× HF eager", "paired ×", "MFU in-run", "MFU cached", "compile s"],
        title=f"{label}: tokens/s, speed vs HF eager (ratio of medians; median of per-round ratios), MFU vs "
        f"the in-run {run.peak_n}² matmul ({run.inrun_peak / 1e9:.1f} GFLOP/s) and the cached peak "
        f"({run.cached_peak / 1e9:.1f} GFLOP/s)",
    )
    for case in run.result.cases:
        if case.unit != "tok":
            continue
        tps = case.throughput
        first = run.first_steps.get(case.name)
        compile_s = f"{first - case.median:.1f}" if first is not None else ""
        table.add(
            case.name, f"{tps:,.0f}", f"{case.speedup:.3f}", f"{1 / case.paired_ratio:.3f}",
            f"{mfu(tps, fpt, run.inrun_peak):.1%}", f"{mfu(tps, fpt, run.cached_peak):.1%}", compile_s,
        )  # fmt: skip
    return table


# ---- memory ---------------------------------------------------------------------------------------------


def fwd_bwd_live(shape: Shape, checkpointing: bool) -> dict[str, int]:
    """Peak live tensor bytes of one forward+backward (zero grads before), by MemTracker category."""
    trainer = Trainer(make_lmforge(shape, checkpointing), make_batch(shape), torch.float32)
    trainer.forward_backward()  # first call allocates lazily-created state outside the measurement
    trainer.opt.zero_grad(set_to_none=True)
    res = peak_live_memory(trainer.forward_backward, track=(trainer.model,))
    cpu = res.detail["cpu"]
    return {
        "activation": cpu["Activation"],
        "temp": cpu["Temp"],
        "gradient": cpu["Gradient"],
        "total": res.bytes,
        "above_start": res.bytes - res.detail["at_start"],
    }


def make_batch(shape: Shape) -> torch.Tensor:
    return torch.randint(VOCAB, (shape.batch, T + 1), generator=torch.Generator().manual_seed(0))


def rss_step(n_layer: int, batch: int, checkpointing: bool, threads: int | None) -> None:
    """Run in a fresh subprocess by `peak_rss_growth`: build the model, one forward+backward."""
    if threads:
        torch.set_num_threads(threads)
    shape = Shape(n_layer, batch)
    Trainer(make_lmforge(shape, checkpointing), make_batch(shape), torch.float32).forward_backward()


# glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which freed
# activations stay in the heap and fragment it: peak RSS then hardly follows live memory. A fixed threshold
# (set in the environment, read when the child process starts) turns that off (mallopt(3), M_MMAP_THRESHOLD).
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
FIXED_MMAP_TEXT = "MALLOC_MMAP_THRESHOLD_=131072"


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """Set environment variables for the block (a spawned child inherits them), then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure_memory(shape: Shape, args) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, ckpt in (("no ckpt", False), ("ckpt", True)):
        out[name] = fwd_bwd_live(shape, ckpt)
        for key, env in (("rss", {}), ("rss_fixed_mmap", FIXED_MMAP)):
            with environ(env):
                rss = peak_rss_growth(
                    "benchmarks.train_throughput:rss_step",
                    args=(shape.n_layer, shape.batch, ckpt, args.threads),
                    preimport=("torch", "lmforge.model"),
                )
            out[name][key] = rss.bytes
    return out


# ---- profiling --------------------------------------------------------------------------------------------


def profile(shape: Shape, steps: int = 4, top: int = 18) -> None:
    """Self CPU time per op, ours and HF side by side: where the difference is. One step per profiler
    session, the two models alternating, so a shared machine's load hits both alike."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    batch = make_batch(shape)
    trainers = {"lmforge": Trainer(make_lmforge(shape), batch, torch.float32)}
    trainers["hf"] = Trainer(make_hf(shape), batch, torch.float32)
    ms: dict[str, dict[str, float]] = {name: {} for name in trainers}
    calls: dict[str, dict[str, int]] = {name: {} for name in trainers}
    for t in trainers.values():
        t.step()
    for _ in range(steps):
        for name, trainer in trainers.items():
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                trainer.step()
            for e in prof.key_averages():
                ms[name][e.key] = ms[name].get(e.key, 0.0) + e.self_cpu_time_total / steps / 1e3
                calls[name][e.key] = e.count
    ops = sorted(set(ms["lmforge"]) | set(ms["hf"]), key=lambda k: -max(ms["lmforge"].get(k, 0), ms["hf"].get(k, 0)))
    table = Table(
        ["op", "lmforge ms/step", "calls", "hf ms/step", "calls", "lmforge - hf ms"],
        title=f"self CPU time per step by op (torch.profiler, mean of {steps} alternating fp32 steps)",
    )
    for k in ops[:top] + ["(all ops)"]:
        if k == "(all ops)":
            a, b = sum(ms["lmforge"].values()), sum(ms["hf"].values())
        else:
            a, b = ms["lmforge"].get(k, 0.0), ms["hf"].get(k, 0.0)
        ca, cb = calls["lmforge"].get(k, ""), calls["hf"].get(k, "")
        table.add(k, f"{a:.1f}", ca, f"{b:.1f}", cb, f"{a - b:+.1f}")
    table.print()


# ---- main -------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 cases even on a CPU without fast bf16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    parser.add_argument("--no-memory", action="store_true", help="skip the checkpointing memory measurements")
    parser.add_argument("--profile", action="store_true", help="only profile ours vs HF (fp32, eager)")
    parser.add_argument(
        "--refresh-peak", action="store_true", help="re-measure the cached matmul peaks (~/.cache/lmforge)"
    )
    args = apply_common_args(add_common_args(parser, repeats=10, warmup=2).parse_args())
    warnings.filterwarnings("ignore", message=".*_token_id.*")
    shape = Shape(2, 4) if args.quick else Shape()
    peak_n = 1024 if args.quick else PEAK_N
    fpt = shape.config().flops_per_token(T)
    env = environment()
    params = shape.config().param_counts()["total"]
    print(
        f"{env['machine']} | torch {env['torch']} | transformers {env.get('transformers')} | threads {env['threads']}"
    )
    print(
        f"shape: {shape.n_layer} layers × 384, 6 heads, T={T}, B={shape.batch}, vocab {VOCAB}; "
        f"{params / 1e6:.2f}M params; {fpt / 1e6:.1f} MFLOP/token"
    )
    if args.profile:
        profile(shape)
        return

    fp32_peak = matmul_peak(torch.float32, "cpu", PEAK_N, refresh=args.refresh_peak)
    bf16_peak = matmul_peak(torch.bfloat16, "cpu", PEAK_N, refresh=args.refresh_peak)
    ratio = cpu_bf16_ratio(refresh=args.refresh_peak)
    print(f"peaks: {fp32_peak.describe()}\n       {bf16_peak.describe()}")
    print(f"       bf16/fp32 matmul rate at 512²: {ratio:.3f}")
    run_bf16 = ratio >= 0.25 or args.force_bf16
    bf16_reason = ""
    if not run_bf16:
        step_s = fpt * shape.tokens / bf16_peak.flops
        bf16_reason = (
            f"bf16 skipped: this CPU ({env.get('isa') or 'unknown ISA'}) runs bf16 matmuls at "
            f"{ratio:.1%} of its fp32 rate (no native bf16: emulated); a bf16 step would take "
            f"~{step_s:,.0f} s. --force-bf16 runs it anyway."
        )
        print(bf16_reason)
    elif ratio < 0.25:
        print(
            f"--force-bf16: bf16 runs at {ratio:.1%} of fp32 here; expect ~"
            f"{fpt * shape.tokens / bf16_peak.flops:,.0f} s per step"
        )

    runs = {"fp32": run_dtype(shape, torch.float32, args, peak_n)}
    if run_bf16:
        runs["bf16"] = run_dtype(shape, torch.bfloat16, args, peak_n)
    for run in runs.values():
        report_dtype(run, shape, fpt).print()
        if abs(run.cached_peak / run.inrun_peak - 1) > 0.2:
            print(
                f"note: the cached peak ({run.cached_peak / 1e9:.1f} GFLOP/s) and the in-run one "
                f"({run.inrun_peak / 1e9:.1f}) differ by >20%: one was measured under other load. The in-run "
                "peak saw the same load as the steps; --refresh-peak re-measures the cached one."
            )
        if run.first_steps:
            print(
                "compile s = first step - median step. Inductor keeps compiled kernels in an on-disk cache "
                "(TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER): a rerun compiles in seconds; "
                "the first run on a machine takes far longer."
            )

    mem = None if args.no_memory else measure_memory(shape, args)
    fp = runs["fp32"].result
    ckpt_time = fp["lmforge ckpt"].median / fp["lmforge eager"].median
    ckpt_paired = _paired(fp, "lmforge ckpt", "lmforge eager")
    if mem:
        table = Table(
            [
                "lmforge, fp32",
                "activations",
                "temp (bwd)",
                "live above weights",
                "peak RSS growth",
                "RSS, fixed mmap threshold",
            ],  # fmt: skip
            title="activation checkpointing: one forward+backward (live = MemTracker; RSS = fresh "
            "subprocess, weights + grads included)",
        )
        for name in ("no ckpt", "ckpt"):
            m = mem[name]
            table.add(
                name,
                fmt_bytes(m["activation"]),
                fmt_bytes(m["temp"]),
                fmt_bytes(m["above_start"]),
                fmt_bytes(m["rss"]),
                fmt_bytes(m["rss_fixed_mmap"]),
            )
        table.print()

    print("\ngoals")
    if mem:
        saving = 1 - mem["ckpt"]["activation"] / mem["no ckpt"]["activation"]
        saving_total = 1 - mem["ckpt"]["above_start"] / mem["no ckpt"]["above_start"]
        saving_rss = 1 - mem["ckpt"]["rss"] / mem["no ckpt"]["rss"]
        saving_fixed = 1 - mem["ckpt"]["rss_fixed_mmap"] / mem["no ckpt"]["rss_fixed_mmap"]
        print(
            f"  checkpointing saves >= {GOAL_SAVING:.0%} of live activation memory: {saving:.1%} "
            f"{verdict(saving >= GOAL_SAVING)} (live total above weights {saving_total:.1%}; peak RSS "
            f"{saving_rss:.1%}, with {FIXED_MMAP_TEXT} {saving_fixed:.1%})"
        )
    print(
        f"  checkpointing costs <= {GOAL_SLOWDOWN:.0%} more time: {ckpt_time - 1:+.1%} (ratio of medians; "
        f"paired {ckpt_paired - 1:+.1%}) {verdict(ckpt_time - 1 <= GOAL_SLOWDOWN)}"
    )
    if "bf16" in runs:
        b = runs["bf16"].result
        vs_hf = b["lmforge eager"].speedup
        bf16_mfu = mfu(b["lmforge eager"].throughput, fpt, runs["bf16"].inrun_peak)
        print(f"  lmforge >= {GOAL_VS_HF}× HF, bf16: {vs_hf:.3f}× {verdict(vs_hf >= GOAL_VS_HF)}")
        ok = verdict(bf16_mfu >= GOAL_MFU)
        print(f"  lmforge >= {GOAL_MFU:.0%} of the bf16 matmul peak: {bf16_mfu:.1%} {ok}")
    else:
        print(f"  lmforge vs HF and MFU in bf16: NOT MEASURABLE on this CPU — {bf16_reason}")
    f_ours = fp["lmforge eager"]
    f_mfu = mfu(f_ours.throughput, fpt, runs["fp32"].inrun_peak)
    print(
        f"  fp32 instead: lmforge {f_ours.speedup:.3f}× HF (goal {GOAL_VS_HF}×: "
        f"{verdict(f_ours.speedup >= GOAL_VS_HF)}), MFU {f_mfu:.1%} of the in-run fp32 matmul peak "
        f"(goal {GOAL_MFU:.0%}: {verdict(f_mfu >= GOAL_MFU)})"
    )
    if f_ours.speedup < 1:
        print("  lmforge is slower than HF in fp32: see `--profile` for where the time goes")

    if args.record:
        record_rows(runs, mem, shape, fpt, ratio, bf16_reason)


def _paired(result: BenchResult, case: str, base: str) -> float:
    """Median over rounds of case time / base time in the same round."""
    a, b = result[case].times, result[base].times
    return statistics.median(x / y for x, y in zip(a, b))


def record_rows(runs, mem, shape: Shape, fpt: float, ratio: float, bf16_reason: str) -> None:
    cmd = command_line()
    what = f"{shape.config().param_counts()['total'] / 1e6:.1f}M GPT train step (B={shape.batch}, T={T})"
    for key, run in runs.items():
        r, label = run.result, dtype_label(run.dtype)
        ours, hf = r["lmforge eager"], r["hf eager"]
        record(
            f"{what} {label}: lmforge vs HF GPT2LMHeadModel (sdpa), eager",
            f"{ours.speedup:.2f}× ({ours.throughput:,.0f} vs {hf.throughput:,.0f} tok/s, n={ours.n}); MFU "
            f"{mfu(ours.throughput, fpt, run.inrun_peak):.0%} of the in-run {run.peak_n}² {key} matmul "
            f"({run.inrun_peak / 1e9:.0f} GFLOP/s)",
            cmd,
        )
        parts = []
        for name, eager in (("lmforge compiled", ours), ("hf compiled", hf)):
            if name in run.first_steps:
                c = r[name]
                parts.append(
                    f"{name.split()[0]} {eager.median / c.median:.2f}× its eager "
                    f"(compile ~{run.first_steps[name] - c.median:.0f} s)"
                )
        if parts:
            record(f"{what} {label}: torch.compile speed-up", "; ".join(parts), cmd)
    if mem:
        fp = runs["fp32"].result
        change = {k: mem["ckpt"][k] / mem["no ckpt"][k] - 1 for k in ("activation", "rss", "rss_fixed_mmap")}
        record(
            f"{what} fp32: activation checkpointing per block",
            f"live activations {change['activation']:+.0%} ({fmt_bytes(mem['ckpt']['activation'])} vs "
            f"{fmt_bytes(mem['no ckpt']['activation'])}), peak RSS growth {change['rss']:+.0%} "
            f"({change['rss_fixed_mmap']:+.0%} with {FIXED_MMAP_TEXT}); time "
            f"{fp['lmforge ckpt'].median / fp['lmforge eager'].median - 1:+.0%}",
            cmd,
        )
    if bf16_reason:
        record("CPU bf16 ÷ fp32 matmul rate (512²)", f"{ratio:.3f}: bf16 training cases skipped", cmd)


if __name__ == "__main__":
    main()
