"""Continuous batching (`lmforge.infer.engine.Engine`) against HF transformers `generate`, serving one stream of
requests on the same GPT-2-124M-shaped model (random weights, fixed seed, fp32; HF model = `to_hf` of ours, sdpa
attention, no compile; one process, so the same threads).

Workload: 64 requests drawn from a seeded mix — prompt lengths uniform 16–512, output lengths uniform 16–256,
random token ids, greedy, EOS ignored (engine `ignore_eos=True`; HF `min_new_tokens = max_new_tokens` and no EOS
id) — arriving as a Poisson process (mean gap 0.15 s: every prompt is in within ~10 s, far faster than any of
the three systems drains them, so all of them are saturated). Each system replays the same arrival schedule:

1. ours: the Engine (paged KV cache, continuous batching, chunked prefill, decode attention through the block
   tables; the model through `optimize_for_decode`, so steps of ≤ 16 sequences run in the GEMV kernel); a request
   is added when the wall clock passes its arrival time (between steps; an idle engine sleeps until the next
   arrival).
2. HF one at a time: requests in arrival order, each `generate` alone, started at max(arrival, previous end).
3. HF static batches of 16: groups of 16 in arrival order, left-padded (input_ids + attention_mask built here,
   pad_token_id set), `max_new_tokens` = the longest in the group; a batch starts when its 16th request has
   arrived and the previous batch is done. Each request counts only its own output tokens: the rest of the
   batch's steps are wasted work (reported).

Figures: output tok/s = output tokens ÷ (last token − first arrival), prefill included; TTFT = first token −
scheduled arrival (queueing included); ITL = gaps between consecutive tokens of one request. HF token times come
from a `generate` streamer (its `put` runs right after each step's tokens are chosen; the first call, the
prompt, is skipped), so a static batch's TTFT is the time its first step finished. Each system runs once (not
interleaved, so ±10–20% machine drift applies between them).

HF one at a time is the slow one: ~136 output tokens per request at ~20 tok/s is ~7–8 min for all 64 on 2 cores.
By default it serves a seeded subset of 16 requests (`--hf-sample`) and the rest are modelled from them
(prefill = a + b·prompt by least squares, decode = the sample's mean s/token), then the FIFO timeline of all 64
is rebuilt from arrival times: its tok/s, TTFT and wall time are then estimates, marked * in the table.
`--hf-sample 0` serves all of them for real.

Before timing, a correctness check (also the warm-up): the engine's greedy tokens for a few workload prompts
against HF `generate` one at a time, and HF's padded batch against HF one at a time.

    python -m benchmarks.batching                  # full run (~8 min on 2 cores; ~14 with --hf-sample 0)
    python -m benchmarks.batching --quick          # tiny model (2 layers, d=128), 8 requests: a smoke run
    python -m benchmarks.batching --record         # append the headline figures to docs/benchmarks.md
    python -m benchmarks.batching --hf-sample 0    # HF one at a time on all requests, no extrapolation

--repeats/--warmup do not apply: each system replays the schedule once. On a machine busy with other jobs,
`--threads 1` avoids oversubscribed OpenMP threads (a --quick run took 50 s with 2 threads, 9 s with 1, under load).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.harness import (
    Table,
    add_common_args,
    apply_common_args,
    command_line,
    environment,
    fmt_seconds,
    format_environment,
    record,
    verdict,
)
from benchmarks.hf_baselines import (
    Job,
    Run,
    gaps,
    hf_generate,
    percentile,
    run_hf_single,
    run_hf_static,
)
from lmforge.config import load_config
from lmforge.infer.engine import Engine
from lmforge.infer.fastpath import optimize_for_decode
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf_export import to_hf

GPT2_YAML = Path(__file__).resolve().parents[1] / "configs" / "model" / "gpt2-124m.yaml"
GOAL_VS_SINGLE, GOAL_VS_STATIC = 5.0, 1.5
# At GPT-2's init std (0.02) a random model's greedy output just repeats the last prompt token, whatever the
# context, and a parity check of such tokens proves nothing about attention or the KV cache; at 0.1 the tokens
# depend on the context. Timing does not depend on the weights' values.
INIT = "init_std=0.1"


@dataclass
class Setup:
    label: str
    model_overrides: tuple[str, ...]
    requests: int
    prompt_len: tuple[int, int]  # inclusive range
    output_len: tuple[int, int]
    mean_gap: float  # s between Poisson arrivals
    static_batch: int
    hf_sample: int  # 0: all
    check_requests: int
    check_tokens: int
    kv_gib: float  # the engine's KV cache


FULL = Setup(label="GPT-2-124M", model_overrides=(INIT,), requests=64, prompt_len=(16, 512),
             output_len=(16, 256), mean_gap=0.15, static_batch=16, hf_sample=16, check_requests=4,
             check_tokens=12, kv_gib=2.0)  # fmt: skip
QUICK = Setup(label="tiny GPT (2 layers, d=128, vocab 2048)",
              model_overrides=("n_layer=2", "d_model=128", "n_head=4", "vocab_size=2048", INIT), requests=8,
              prompt_len=(8, 48), output_len=(4, 24), mean_gap=0.02, static_batch=4, hf_sample=0, check_requests=2,
              check_tokens=6, kv_gib=0.0625)  # fmt: skip


# ---- workload and models -------------------------------------------------------------------------------------


def make_workload(setup: Setup, vocab: int, seed: int) -> list[Job]:
    g = torch.Generator().manual_seed(seed)
    n = setup.requests
    prompt_lens = torch.randint(setup.prompt_len[0], setup.prompt_len[1] + 1, (n,), generator=g).tolist()
    output_lens = torch.randint(setup.output_len[0], setup.output_len[1] + 1, (n,), generator=g).tolist()
    inter = torch.empty(n, dtype=torch.float64).exponential_(1 / setup.mean_gap, generator=g)
    arrivals = (inter.cumsum(0) - inter[0]).tolist()  # the first request arrives at 0
    prompts = [torch.randint(vocab, (p,), generator=g).tolist() for p in prompt_lens]
    return [Job(i, a, p, o) for i, (a, p, o) in enumerate(zip(arrivals, prompts, output_lens))]


def make_models(setup: Setup, seed: int):
    cfg = load_config(ModelConfig, GPT2_YAML, setup.model_overrides)
    torch.manual_seed(seed)
    ours = Transformer(cfg).eval()
    hf = to_hf(ours)
    # As `lmforge generate` serves: steps of up to kernels.MAX_ROWS sequences in lmforge's GEMV kernel.
    return optimize_for_decode(ours), hf


def greedy(job: Job, max_new: int | None = None) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new or job.max_new, temperature=0, ignore_eos=True, seed=0)


# ---- the three systems -------------------------------------------------------------------------------------


def run_ours(engine: Engine, jobs: list[Job]) -> Run:
    pending = deque(jobs)
    served: list[tuple[Job, object]] = []
    steps = waiting_steps = max_waiting = 0
    t0 = time.perf_counter()  # = the first arrival
    while pending or engine.has_work():
        now = time.perf_counter()
        while pending and t0 + pending[0].arrival <= now:
            job = pending.popleft()
            served.append((job, engine.add_request(job.prompt, greedy(job))))
        if engine.has_work():
            waiting = len(engine.waiting)  # requests queued for (or in) prefill while this step runs
            engine.step()
            steps += 1
            waiting_steps += waiting > 0
            max_waiting = max(max_waiting, waiting)
        else:
            time.sleep(max(0.0, t0 + pending[0].arrival - time.perf_counter()))
    elapsed = time.perf_counter() - t0
    ttft, itl, last = [], [], 0.0
    for job, req in served:
        seq = req.seqs[0]
        if len(seq.output) != job.max_new:
            raise RuntimeError(f"request {job.index}: {len(seq.output)} tokens, asked for {job.max_new}")
        ttft.append(seq.first_token_time - (t0 + job.arrival))
        itl += gaps(seq.token_times)
        last = max(last, seq.token_times[-1])
    s = engine.stats
    extra = dict(preemptions=s.preemptions, max_running=s.max_running, steps=s.steps,
                 prefill_tokens=s.prefill_tokens, prefix_hit_tokens=s.prefix_hit_tokens,
                 saturated_steps=waiting_steps / max(steps, 1), max_waiting=max_waiting)  # fmt: skip
    notes = [
        f"{s.steps} steps, max running batch {s.max_running}, {s.preemptions} preemptions, "
        f"{s.prefill_tokens:,} tokens prefilled (prompts: {sum(len(j.prompt) for j in jobs):,}), prefix-cache hits "
        f"{s.prefix_hit_tokens}; requests waiting for prefill in {waiting_steps / max(steps, 1):.0%} of steps "
        f"(at most {max_waiting})"
    ]
    out = sum(j.max_new for j in jobs)
    return Run("ours (continuous batching)", out, last - t0, ttft, itl, elapsed=elapsed, notes=notes, extra=extra)


# ---- correctness -------------------------------------------------------------------------------------------


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def parity_check(model, hf, jobs: list[Job], n_tokens: int, block_size: int = 16) -> dict:
    """Greedy tokens: engine (the jobs batched) vs HF one at a time vs HF padded batch. Also the warm-up."""
    blocks = sum(-(-(len(j.prompt) + n_tokens) // block_size) for j in jobs) + 2
    engine = Engine(model, num_blocks=blocks, block_size=block_size)
    ours = [r.seqs[0].output for r in engine.generate([j.prompt for j in jobs], greedy(jobs[0], n_tokens))]
    single = [hf_generate(hf, [j.prompt], n_tokens)[0][0] for j in jobs]
    batch, _ = hf_generate(hf, [j.prompt for j in jobs], n_tokens)
    diff_ours = [first_difference(o, s) for o, s in zip(ours, single)]
    diff_batch = [first_difference(o, s) for o, s in zip(batch, single)]
    return dict(
        requests=len(jobs), tokens=n_tokens, distinct=len({t for o in single for t in o}),
        engine_equal=sum(d is None for d in diff_ours),
        batch_equal=sum(d is None for d in diff_batch), engine_diff=diff_ours, batch_diff=diff_batch,
    )  # fmt: skip


def describe_parity(p: dict) -> str:
    def where(diffs):
        bad = [f"request {i} from token {d}" for i, d in enumerate(diffs) if d is not None]
        return f" (differs: {', '.join(bad)})" if bad else ""

    return (
        f"greedy parity on {p['requests']} workload prompts × {p['tokens']} tokens ({p['distinct']} distinct): "
        f"engine = HF one at a time "
        f"{p['engine_equal']}/{p['requests']}{where(p['engine_diff'])}; HF padded batch = HF one at a time "
        f"{p['batch_equal']}/{p['requests']}{where(p['batch_diff'])}"
    )


# ---- report ------------------------------------------------------------------------------------------------


def report(runs: dict[str, Run], static_size: int) -> Table:
    single, static = runs["hf_single"], runs["hf_static"]
    table = Table(["system", "output tok/s", "× HF 1-at-a-time", f"× HF static-{static_size}", "TTFT p50",
                   "TTFT p99", "ITL p50", "ITL p99", "wall"],
                  title="output tok/s = output tokens ÷ (last token − first arrival); TTFT from the scheduled "
                        "arrival; ITL = gaps between a request's consecutive tokens")  # fmt: skip
    for run in runs.values():
        star = "*" if run.estimated else ""
        table.add(run.name, f"{run.tok_s:,.1f}{star}", f"{run.tok_s / single.tok_s:.2f}×",
                  f"{run.tok_s / static.tok_s:.2f}×", fmt_seconds(percentile(run.ttft, 0.5)) + star,
                  fmt_seconds(percentile(run.ttft, 0.99)) + star, fmt_seconds(percentile(run.itl, 0.5)),
                  fmt_seconds(percentile(run.itl, 0.99)), fmt_seconds(run.span) + star)  # fmt: skip
    return table


def latency(run: Run) -> str:
    star = "*" if run.estimated else ""
    return (
        f"TTFT p50/p99 {fmt_seconds(percentile(run.ttft, 0.5))}/{fmt_seconds(percentile(run.ttft, 0.99))}{star}, "
        f"ITL p50/p99 {fmt_seconds(percentile(run.itl, 0.5))}/{fmt_seconds(percentile(run.itl, 0.99))}"
    )


def record_rows(runs: dict[str, Run], what: str, static_size: int) -> None:
    ours, single, static = runs["ours"], runs["hf_single"], runs["hf_static"]
    sampled = f", * extrapolated from {len(single.extra['sample'])} served" if single.estimated else ""
    cmd = command_line()
    record(
        f"{what}: continuous batching (Engine) output tok/s vs HF generate",
        f"{ours.tok_s:,.1f} tok/s = {ours.tok_s / single.tok_s:.2f}× HF one at a time ({single.tok_s:,.1f}"
        f"{'*' if single.estimated else ''} tok/s{sampled}), {ours.tok_s / static.tok_s:.2f}× HF static-"
        f"{static_size} ({static.tok_s:,.1f} tok/s); {ours.extra['preemptions']} preemptions, max batch "
        f"{ours.extra['max_running']}",
        cmd,
    )
    record(
        f"{what}: latency, continuous batching vs HF generate",
        f"ours {latency(ours)}; HF static-{static_size} {latency(static)}; HF one at a time {latency(single)}",
        cmd,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-sample", type=int, default=None,
                        help=f"HF one at a time serves K seeded requests, the rest extrapolated (0: all; default "
                             f"{FULL.hf_sample}, all with --quick)")  # fmt: skip
    parser.add_argument("--requests", type=int, default=None, help=f"requests (default {FULL.requests})")
    parser.add_argument("--mean-gap", type=float, default=None, help="mean Poisson inter-arrival time, s")
    parser.add_argument("--kv-gib", type=float, default=None, help=f"engine KV cache, GiB (default {FULL.kv_gib})")
    parser.add_argument("--token-budget", type=int, default=512, help="engine tokens per step (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="weights, workload and HF sample seed")
    args = apply_common_args(add_common_args(parser).parse_args(argv))
    base = QUICK if args.quick else FULL
    setup = dataclasses.replace(
        base,
        requests=args.requests or base.requests,
        mean_gap=args.mean_gap or base.mean_gap,
        kv_gib=args.kv_gib or base.kv_gib,
        hf_sample=base.hf_sample if args.hf_sample is None else args.hf_sample,
    )
    setup.check_requests = min(setup.check_requests, setup.requests)

    env = environment()
    print(format_environment(env))
    t_all = time.perf_counter()
    model, hf = make_models(setup, args.seed)
    cfg = model.cfg
    jobs = make_workload(setup, cfg.vocab_size, args.seed)
    n_prompt, n_out = sum(len(j.prompt) for j in jobs), sum(j.max_new for j in jobs)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {setup.label}, {params / 1e6:.1f}M params, {cfg.n_layer} layers × {cfg.d_model}, vocab "
        f"{cfg.vocab_size}, fp32, random weights ({INIT}, seed {args.seed}); HF: {type(hf).__name__} "
        f"({hf.config._attn_implementation}), same weights"
    )
    print(f"workload: {len(jobs)} requests, prompts {setup.prompt_len[0]}–{setup.prompt_len[1]} (total {n_prompt:,}), "
          f"outputs {setup.output_len[0]}–{setup.output_len[1]} (total {n_out:,}), greedy, EOS ignored; Poisson "
          f"arrivals at {1 / setup.mean_gap:.1f} req/s (mean gap {setup.mean_gap * 1e3:.0f} ms; last arrival at "
          f"{jobs[-1].arrival:.1f} s)")  # fmt: skip

    t = time.perf_counter()
    parity = parity_check(model, hf, jobs[: setup.check_requests], setup.check_tokens)
    print(f"{describe_parity(parity)} ({time.perf_counter() - t:.1f} s; also the warm-up)")

    # A fresh engine: the check's prompts stay out of its prefix cache.
    engine = Engine(model, kv_memory_gib=setup.kv_gib, token_budget=args.token_budget)
    capacity = engine.capacity_line()
    print(capacity)
    runs: dict[str, Run] = {}
    runs["ours"] = run_ours(engine, jobs)
    del engine  # its KV pool
    runs["hf_static"] = run_hf_static(hf, jobs, setup.static_batch)
    runs["hf_single"] = run_hf_single(hf, jobs, setup.hf_sample, args.seed)
    runs = {k: runs[k] for k in ("ours", "hf_single", "hf_static")}

    report(runs, setup.static_batch).print()
    for run in runs.values():
        for note in run.notes:
            print(f"  {run.name}: {note}")
    ours = runs["ours"]
    vs_single, vs_static = ours.tok_s / runs["hf_single"].tok_s, ours.tok_s / runs["hf_static"].tok_s
    est = " (HF side extrapolated, *)" if runs["hf_single"].estimated else ""
    print("\ngoals")
    print(f"  ours >= {GOAL_VS_SINGLE}× HF one at a time: {vs_single:.2f}×{est} {verdict(vs_single >= GOAL_VS_SINGLE)}")
    print(f"  ours >= {GOAL_VS_STATIC}× HF static-{setup.static_batch}: {vs_static:.2f}× "
          f"{verdict(vs_static >= GOAL_VS_STATIC)}")  # fmt: skip
    phases = ", ".join(f"{r.name} {fmt_seconds(r.elapsed)}" for r in runs.values())
    print(f"time: {phases}; total {time.perf_counter() - t_all:.0f} s")

    if args.record:
        record_rows(runs, f"{setup.label} fp32, {len(jobs)} Poisson requests at {1 / setup.mean_gap:.1f}/s",
                    setup.static_batch)  # fmt: skip
    return dict(setup=setup, jobs=jobs, parity=parity, capacity=capacity, runs=runs,
                ratios=dict(vs_single=vs_single, vs_static=vs_static))  # fmt: skip


if __name__ == "__main__":
    main()
