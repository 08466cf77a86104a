"""GPU training throughput and MFU of the GPT-2-124M-shaped model, for an offline CUDA machine.

Needs only a CUDA build of torch and PyYAML (plus this repository: `lmforge.model`, `lmforge.hardware` and
`lmforge.train.peak` import nothing else); installs nothing, downloads nothing. Run from the repository
root, as `benchmarks/gpu.sh` does:

    PYTHONPATH=. python benchmarks/gpu_train.py            # results also in $OUT/gpu_results.json (or ./)

Sections, each on its own (a failure prints its error and the next one runs), results written after each:
  1. the device, and which SDPA kernel torch picks for this model's attention in bf16;
  2. the bf16 matmul peak, measured (8192² matmuls, median of 5) beside the datasheet figure;
  3. training step throughput of `small` (vocab 50304, 12 × 768, 12 heads, T=1024, tanh-GELU), bf16
     autocast, fused SDPA attention, fused AdamW, random tokens, micro-batch 16 (8 if 16 runs out of
     memory): eager, then `torch.compile` (compile time reported apart); up to 30 timed steps after warm-up,
     capped in time so the whole script ends in ~4 minutes on an H100/H200. tokens/s and MFU against both
     peaks, with FLOPs/token = `ModelConfig.flops_per_token(1024)`.

Without CUDA it prints "no CUDA device" and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `lmforge` importable without PYTHONPATH too
    sys.path.insert(0, str(REPO))


def small_config(smoke: bool):
    from lmforge.model import ModelConfig

    if smoke:  # the same code path, tiny: for `--cpu-smoke`
        return ModelConfig(vocab_size=256, max_seq_len=64, n_layer=2, d_model=64, n_head=2, ffn="gelu_tanh")
    return ModelConfig(vocab_size=50304, max_seq_len=1024, n_layer=12, d_model=768, n_head=12, ffn="gelu_tanh")


class WithLoss(nn.Module):
    """model + cross-entropy in one module, so `torch.compile` can fuse the loss with the LM head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


class Run:
    """One training setup: model, fused AdamW (decay on ≥2-D weights), a fixed random batch, bf16 autocast."""

    def __init__(self, cfg, device: torch.device, batch: int, compiled: bool) -> None:
        from lmforge.model import Transformer

        torch.manual_seed(0)
        model = Transformer(cfg).to(device).train()
        params = list(model.parameters())
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=fused)
        self.module = WithLoss(model)
        self.forward = torch.compile(self.module) if compiled else self.module
        data = torch.randint(cfg.vocab_size, (batch, cfg.max_seq_len + 1), device=device)
        self.x, self.y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        self.device, self.batch, self.tokens = device, batch, batch * cfg.max_seq_len

    def step(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.forward(self.x, self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_section(cfg, device, batches, compiled, max_steps, max_seconds, peaks, fpt) -> dict:
    """Warm up (compiling, when asked), then time up to `max_steps` steps or `max_seconds`. The first batch
    size that fits wins (an out-of-memory error falls back to the next)."""
    last_error = None
    for batch in batches:
        run = None
        try:
            free(device)
            run = Run(cfg, device, batch, compiled)
            t0 = time.perf_counter()
            loss_first = float(run.step())  # float() waits for the GPU
            first = time.perf_counter() - t0
            for _ in range(3):
                run.step()
            sync(device)
            times: list[float] = []
            end = time.perf_counter() + max_seconds
            while len(times) < max_steps and (len(times) < 3 or time.perf_counter() < end):
                t0 = time.perf_counter()
                run.step()
                sync(device)
                times.append(time.perf_counter() - t0)
            step_s = statistics.median(times)
            memory_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            tok_s = run.tokens / step_s
            out = {
                "batch": batch,
                "seq_len": cfg.max_seq_len,
                "steps_timed": len(times),
                "step_ms_median": step_s * 1e3,
                "step_ms_min": min(times) * 1e3,
                "step_ms_max": max(times) * 1e3,
                "tokens_per_s": tok_s,
                "achieved_tflops": tok_s * fpt / 1e12,
                "first_step_s": first,
                "compile_s": first - step_s if compiled else None,
                "loss_first": loss_first,
                "peak_memory_gib": memory_gib,
            }
            for name, peak in peaks.items():
                out[f"mfu_{name}"] = tok_s * fpt / peak if peak else None
            return out
        except Exception as e:  # compiled code may wrap the OutOfMemoryError in another exception
            if not is_oom(e):
                raise
            # Keep the message only: the exception's traceback holds the failed attempt's tensors.
            last_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"  micro-batch {batch}: out of memory, trying a smaller one ({last_error})")
        finally:
            del run
            free(device)
    raise RuntimeError(f"no micro-batch of {batches} fits: {last_error}")


def is_oom(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def sdpa_choice(cfg, device, batch: int) -> str:
    from torch.nn.attention import SDPBackend

    shape = (batch, cfg.n_head, cfg.max_seq_len, cfg.head_dim)
    q = torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
    choice = torch._fused_sdp_choice(q, q, q, is_causal=True)
    names = {int(v): k for k, v in SDPBackend.__members__.items()}
    return names.get(int(choice), str(choice))


def section(results: dict, name: str, fn, out_path: Path):
    """Run one section; on failure print the error and record it, never stop the script."""
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:
        traceback.print_exc(limit=4)
        results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"   {name} failed; continuing", flush=True)
    results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    write(results, out_path)
    return results[name]


def write(results: dict, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, default=str))
    except OSError as e:
        print(f"could not write {path}: {e}")


def print_table(results: dict) -> None:
    peak = results.get("peak", {})
    print("\n== summary")
    if "measured_tflops" in peak:
        nominal = peak.get("nominal_tflops")
        line = f"bf16 matmul peak: measured {peak['measured_tflops']:.3g} TFLOP/s ({peak.get('measured_n')}²)"
        if nominal:
            line += f" = {peak['measured_of_nominal']:.0%} of nominal {nominal:.0f} ({peak['nominal_source']})"
        print(line + ("" if nominal else "; no datasheet figure for this device"))
    cols = ["case", "B", "tok/s", "step ms", "TFLOP/s", "MFU nominal", "MFU measured", "compile s", "mem GiB"]
    rows = [cols]
    for name in ("eager", "compiled"):
        r = results.get(name)
        if not r:
            continue
        if "error" in r:
            rows.append([name, "error: " + r["error"][:60]] + [""] * (len(cols) - 2))
            continue

        def pct(x):
            return f"{x:.1%}" if x is not None else "n/a"

        rows.append([
            name, str(r["batch"]), f"{r['tokens_per_s']:,.0f}", f"{r['step_ms_median']:.1f}",
            f"{r['achieved_tflops']:.1f}", pct(r.get("mfu_nominal")), pct(r.get("mfu_measured")),
            f"{r['compile_s']:.0f}" if r.get("compile_s") is not None else "",
            f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "",
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case (default 30)")
    parser.add_argument("--seconds", type=float, default=25.0, help="time cap of the timed steps per case")
    parser.add_argument("--budget", type=float, default=240.0, help="skip compiling past this many seconds")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default $OUT/gpu_results.json)")
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # tiny model on CPU
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    start = time.perf_counter()
    smoke = args.cpu_smoke
    device = torch.device("cpu") if smoke else torch.device("cuda")
    out_path = args.out or Path(os.environ.get("OUT") or ".") / "gpu_results.json"
    from lmforge.hardware import nominal_peak
    from lmforge.train.peak import matmul_peak

    cfg = small_config(smoke)
    fpt = cfg.flops_per_token(cfg.max_seq_len)
    batches = [2] if smoke else [16, 8]
    steps = min(args.steps, 3) if smoke else args.steps
    results: dict = {"smoke": smoke}

    def env():
        info = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
            "params": cfg.param_counts()["total"],
            "flops_per_token": fpt,
        }
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            info.update(capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30)
        info["sdpa_backend_bf16"] = sdpa_choice(cfg, device, batches[0])
        print("  " + "\n  ".join(f"{k}: {v}" for k, v in info.items()))
        return info

    section(results, "env", env, out_path)

    peaks: dict[str, float | None] = {"nominal": None, "measured": None}

    def peak():
        n = 256 if smoke else 8192
        m = matmul_peak(torch.bfloat16, device, n, 5, refresh=True, max_seconds=30.0)
        peaks["measured"] = m.flops
        info = {"measured_tflops": m.flops / 1e12, "measured_n": m.n, "measured": m.describe()}
        found = nominal_peak(torch.cuda.get_device_name(), "bf16") if device.type == "cuda" else None
        if found:
            peaks["nominal"] = found[0]
            info.update(nominal_tflops=found[0] / 1e12, nominal_source=found[1])
            info["measured_of_nominal"] = m.flops / found[0]
        print(f"  {m.describe()}")
        print(f"  {found[1] if found else 'no datasheet figure for this device'}")
        return info

    section(results, "peak", peak, out_path)
    section(
        results, "eager",
        lambda: train_section(cfg, device, batches, False, steps, args.seconds, peaks, fpt), out_path,
    )  # fmt: skip
    if args.no_compile:
        print("\n== compiled: skipped (--no-compile)")
    elif time.perf_counter() - start > args.budget:
        print(f"\n== compiled: skipped, {args.budget:.0f} s budget spent")
        results["compiled"] = {"error": "skipped: time budget spent"}
    else:
        section(
            results, "compiled",
            lambda: train_section(cfg, device, batches, True, steps, args.seconds, peaks, fpt), out_path,
        )  # fmt: skip
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    write(results, out_path)
    print_table(results)
    print(f"\nresults: {out_path} ({results['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
