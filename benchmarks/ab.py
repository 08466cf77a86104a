"""A/B of two lmforge checkouts on lmforge's own hot paths, interleaved in one sitting: did a change move speed?

A refactor that must not change behaviour must not change speed either. This runs the same workloads against
the working tree (B) and another checkout (A: e.g. `git worktree add /tmp/before <commit>`), alternating
A, B, A, B, ... in fresh processes so that neither gets a warmer machine, and prints the median of each with
the ratio B ÷ A. Random weights (fixed seed), the same shapes as benchmarks/decode.py and batching.py:

- decode fp32 / int8: batch-1 one-token steps through a contiguous cache after a 16-token prompt, GPT-2-124M
  shape, the model through `optimize_for_decode` (+ `quantize_model(m, "int8")`), as `lmforge generate` runs it
  (every layer in the fused C step): 1 / the fastest of 5 runs of 100 steps, in tok/s. (Whole `generate` calls
  add sampling, which no refactor of the model touches, and twice the noise.)
- batching fp32: the paged `Engine`, 16 concurrent requests × 64 new tokens (prompts of 32), greedy, EOS
  ignored: output tok/s over the whole run, fastest of 3 (the module-by-module path: a batch never takes the
  fused step).
- train step: forward + backward + AdamW of a 10.8M GPT (vocab 65, 6 layers, d 384, T 256, B 8), fp32: ms/step.

    python -m benchmarks.ab --baseline /tmp/before              # 3 rounds (~4 min on 2 cores)
    python -m benchmarks.ab --baseline /tmp/before --rounds 5 --only decode_fp32

Each process pins torch to `--threads` (2). Noise on a shared 2-core machine is a few percent: read a ratio
within ±5% as unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each workload prints one JSON number: higher is better for tok/s, lower for ms.
WORKLOADS = {
    "decode_fp32": (
        "tok/s",
        "higher",
        """
from lmforge.infer.fastpath import optimize_for_decode
result = decode_steps(optimize_for_decode(gpt2()))
""",
    ),
    "decode_int8": (
        "tok/s",
        "higher",
        """
from lmforge.infer.fastpath import optimize_for_decode
from lmforge.infer.quantize import quantize_model
result = decode_steps(optimize_for_decode(quantize_model(gpt2(), "int8")))
""",
    ),
    "batching_fp32": (
        "tok/s",
        "higher",
        """
from lmforge.infer.engine import Engine
from lmforge.infer.fastpath import optimize_for_decode
from lmforge.infer.sampling import SamplingParams
engine = Engine(optimize_for_decode(gpt2()), num_blocks=512)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 50000, (32,), generator=g).tolist() for _ in range(16)]
params = SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True)
engine.generate(prompts[:2], SamplingParams(max_new_tokens=4, temperature=0))  # warm-up
result = best(lambda: engine.generate(prompts, params), 16 * 64)
""",
    ),
    "train_step": (
        "ms/step",
        "lower",
        """
from lmforge.model import ModelConfig, Transformer
torch.manual_seed(0)
model = Transformer(ModelConfig(vocab_size=65, max_seq_len=256, n_layer=6, d_model=384, n_head=6)).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 65, (8, 257))
def step():
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
step(); step()
t = time.perf_counter()
for _ in range(8): step()
result = (time.perf_counter() - t) / 8 * 1000
""",
    ),
}

PRELUDE = """
import json, sys, time
sys.path.insert(0, {tree!r})
import torch
torch.set_num_threads({threads})
import lmforge
assert lmforge.__file__.startswith({tree!r}), lmforge.__file__
from lmforge.model import ModelConfig, Transformer
def best(run, tokens, repeats=3):  # tok/s of the fastest run: the least disturbed by the machine's other tenants
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return tokens / min(times)
def decode_steps(model, steps=100, repeats=5):  # batch-1 one-token steps after a 16-token prompt: 1 / fastest step
    from lmforge.infer.kv_cache import ContiguousKVCache
    cache = ContiguousKVCache(model.cfg, 1, 16 + 20 + steps)
    token = torch.tensor([[5]])
    with torch.no_grad():
        model(torch.arange(16)[None], cache=cache)
        for _ in range(20):
            model(token, cache=cache)
        fastest = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(steps):
                model(token, cache=cache)
            fastest = min(fastest, (time.perf_counter() - t) / steps)
            cache.truncate(36)
    return 1 / fastest
def gpt2():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50257, max_seq_len=1024, n_layer=12, d_model=768, n_head=12)
    return Transformer(cfg).eval()
{body}
print(json.dumps(result))
"""


def run_once(tree: Path, workload: str, threads: int) -> float:
    code = PRELUDE.format(tree=str(tree), threads=threads, body=WORKLOADS[workload][2].strip())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode:
        raise SystemExit(f"{workload} failed in {tree}:\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def git_commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return done.stdout.strip()[:72] or "?"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="the other checkout (A), e.g. a git worktree")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs of each side (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=sorted(WORKLOADS), help="a subset of the workloads")
    ap.add_argument("--record", action="store_true", help="append the ratios to docs/benchmarks.md")
    args = ap.parse_args(argv)
    if not (args.baseline / "lmforge" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {args.baseline}: no lmforge/ there; make one with git worktree add PATH COMMIT")
    sides = {"A": args.baseline.resolve(), "B": ROOT}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    print(f"A = {git_commit(sides['A'])}\nB = {git_commit(sides['B'])} (working tree)")
    print(f"CPU {cpu}, {args.threads} threads, {args.rounds} interleaved rounds\n")
    print("| workload | unit | A | B | B ÷ A | best B ÷ best A | runs A | runs B |\n|---|---|---|---|---|---|---|---|")
    figures = []
    for workload in args.only or WORKLOADS:
        unit, better, _ = WORKLOADS[workload]
        runs: dict[str, list[float]] = {"A": [], "B": []}
        for _ in range(args.rounds):
            for side, tree in sides.items():
                runs[side].append(run_once(tree, workload, args.threads))
        a, b = (statistics.median(runs[s]) for s in "AB")
        speed = {s: [x if better == "higher" else 1 / x for x in runs[s]] for s in "AB"}  # higher = faster
        ratio = statistics.median(speed["B"]) / statistics.median(speed["A"])
        best = max(speed["B"]) / max(speed["A"])
        spread = " | ".join(" ".join(f"{x:.1f}" for x in runs[s]) for s in "AB")
        print(f"| {workload} | {unit} | {a:.1f} | {b:.1f} | {ratio:.3f} | {best:.3f} | {spread} |", flush=True)
        figures.append(f"{workload} {ratio:.3f}, best {best:.3f} ({a:.1f} → {b:.1f} {unit})")
    print("\nRatios are speed B ÷ speed A: above 1, the working tree is faster. The best run of each side is the one")
    print("least disturbed by other tenants; the medians carry their noise.")
    if args.record:
        from benchmarks.harness import command_line, record

        a_commit, b_commit = (git_commit(sides[s]).split()[0] for s in "AB")
        print(record(f"A/B speed, {b_commit} ÷ {a_commit} (medians of {args.rounds} interleaved runs; > 1 faster)",
                     "; ".join(figures), command_line()))  # fmt: skip


if __name__ == "__main__":
    main()
