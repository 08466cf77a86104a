"""What tensor parallelism costs on this machine: the training step of a ~56M-parameter Llama-style model (8 layers,
d 512, GQA 8/4, SwiGLU, vocab 32,000, untied) on one process with 2 threads against 2 tensor-parallel ranks
(`lmforge.parallel.tensor`, gloo) with 1 thread each, the same batch (4 × 256 tokens), fp32, AdamW; and the share
of the TP step spent in collectives (all-gathers before attention and the FFN, reduce-scatters after, the
gathered logits), from torch.profiler on rank 0. On CPUs in one machine TP only adds work: this measures how much,
as the price of splitting a model that does not fit one device. Kept in the report: the keys of the profiler's
collective events, so the share can be checked against what was counted.

    python -m benchmarks.tensor_parallel            # ~2 min on 2 cores
    python -m benchmarks.tensor_parallel --record
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS, WARMUP = 8, 2
# DTensor issues functional collectives (_c10d_functional::all_gather_into_tensor, reduce_scatter_tensor, ...) and
# blocks in wait_tensor while gloo moves the data: each op's own time, so nested calls are counted once
COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "allgather", "allreduce", "broadcast", "wait")


def model_and_batch():
    import torch

    from lmforge.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=32000, max_seq_len=256, n_layer=8, d_model=512, n_head=8, n_kv_head=4,
                      position="rope", ffn="swiglu", norm="rmsnorm", bias=False, tie_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (4, 257), generator=torch.Generator().manual_seed(1))
    return Transformer(cfg), x[:, :-1], x[:, 1:]


def worker(out: str) -> None:
    """One process, or one rank of 2 under torchrun: time STEPS steps; rank 0 writes the times (and collectives)."""
    import torch
    import torch.nn.functional as F

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    model, x, y = model_and_batch()
    if world > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from lmforge.parallel import tensor_parallel

        dist.init_process_group("gloo")
        tensor_parallel(model, init_device_mesh("cpu", (world,)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        logits = model(x)
        F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(STEPS):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    comm, events = None, []
    if world > 1:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            step()
            profiled = time.perf_counter() - t
        spent = sum(e.self_cpu_time_total for e in prof.key_averages()
                    if any(c in e.key.lower() for c in COLLECTIVES) and "c10d" in e.key.lower()) / 1e6  # fmt: skip
        comm = spent / profiled
        events = sorted({e.key for e in prof.key_averages() if "c10d" in e.key.lower()})
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "comm": comm, "events": events}))
    if world > 1:
        dist.destroy_process_group()


def run(ranks: int, tmp: Path) -> dict:
    out = tmp / f"tp{ranks}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // ranks)}
    me = [str(Path(__file__).resolve()), "--worker", str(out)]
    cmd = [sys.executable, *me] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *me]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.harness import environment, format_environment, report_rows

    print(format_environment(environment()))
    model, _, _ = model_and_batch()
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        one, two = run(1, Path(tmp)), run(2, Path(tmp))
    a, b = statistics.median(one["times"]), statistics.median(two["times"])
    print("collective events counted:", ", ".join(e for e in two["events"] if any(c in e.lower() for c in COLLECTIVES)))
    rows = [(f"training step, {params / 1e6:.0f}M Llama-style, 4 × 256 tokens, fp32: 1 process × 2 threads vs "
             "2 TP ranks × 1 thread (gloo)",
             f"{a * 1e3:.0f} vs {b * 1e3:.0f} ms (TP ÷ one = {b / a:.2f}×); collectives {100 * two['comm']:.0f}% of "
             f"the TP step (medians of {STEPS} steps)")]  # fmt: skip
    report_rows(rows, prefix="tensor parallel", save=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
