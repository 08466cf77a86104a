"""Routing policies on a multi-round chat workload over 2 replicas × 1 thread (`lmforge router` in front of two
`lmforge serve` processes), then a replica killed mid-run, then the router's own added latency.

Workload (seeded): USERS users × ROUNDS rounds of chat; every conversation starts with the same ~200-token system
prompt and grows by a user message (~200 tokens: code pasted in) and the model's reply (greedy, REPLY tokens,
`ignore_eos`) each round; users run concurrently, each asking again a random think time (mean THINK s) after its
reply is in, and each names itself in `user` (what the session policy hashes). Each replica's KV memory holds
about half of the live histories (`--kv-at mean`, the default: half the users' histories at their mean length over
the run; `--kv-at longest`: at their length in the last round, so the KV holds all of them for the first half of
the run), so a policy that spreads a user's rounds over both replicas evicts what it will need again. Per policy
and seed (replicas restarted, caches empty): the prefix-cache hit rate (prompt tokens served from the cache ÷
prompt tokens, from the replicas' /metrics), TTFT p50/p95, output tok/s, and the load imbalance (requests on the
busier replica ÷ the mean). The model: random weights of a small Llama-style shape (the hit rate and its effect on
TTFT do not depend on what the weights say), a char tokenizer.

Kill: round_robin, replicas with --max-batch 2, 16 long streams; replica A is SIGKILLed while it holds ≥ 8 requests
(2 streaming, the rest queued): requests that failed, and whether each had started streaming.
Router overhead: one request at a time (max_tokens 1, not streamed), direct to a replica and through the router,
interleaved: latency p50/p99 of each and their difference.

    python -m benchmarks.routing                  # ~6-8 min on 2 cores (Zen 4), ~25 min with 3 seeds
    python -m benchmarks.routing --seeds 3 --record
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from benchmarks.harness import environment, format_environment, report_rows
from benchmarks.serving import free_port, pct, sse_chunks, wait_healthy
from lmforge.serve.policies import POLICIES

USERS, ROUNDS, REPLY, QUESTION_WORDS = 32, 6, 64, 32  # a question ~200 tokens: code pasted in
THINK = 1.0  # mean seconds between a reply and the next question (exponential)
WORDS = (
    "list dict tuple set import module class function return yield async await lambda thread lock queue "
    "socket file path string bytes error raise except finally context manager iterator generator"
).split()
SYSTEM = (
    "You are a careful assistant for Python programmers. Answer briefly, show code when it helps, name the "
    "module you use, and say when something depends on the version of Python. Prefer the standard library. "
)


def make_run(folder: Path) -> Path:
    """A run folder `lmforge serve` reads: a char tokenizer and a random model (6 layers, d 384, GQA 6/2)."""
    from lmforge.config import save_config
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import save_checkpoint
    from lmforge.train.pretrain import PretrainConfig

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.train_char([SYSTEM + " ".join(WORDS) + "?.,0123456789"])
    tok.save(folder)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=2048, n_layer=6, d_model=384, n_head=6, n_kv_head=2,
                      position="rope", ffn="swiglu", norm="rmsnorm", bias=False)  # fmt: skip
    save_config(PretrainConfig(model=cfg), folder / "config.yaml")
    save_checkpoint(folder / "checkpoints", 1, Transformer(cfg), {"step": 1})
    return folder


def kv_gib_for_half_the_histories(at: str = "mean") -> float:
    """KV bytes of half the users' conversations (fp32: 2 × layers × kv heads × head dim × 4) at their length in
    the last round ("longest") or averaged over the rounds ("mean": what is live through the run)."""
    question = len(user_message(random.Random(0), 0))
    per_round = question + REPLY + 8  # chars = tokens (char tokenizer), template tokens too
    rounds = ROUNDS if at == "longest" else (ROUNDS + 1) / 2
    per_token = 2 * 6 * 2 * 64 * 4
    return USERS / 2 * (len(SYSTEM) + rounds * per_round) * per_token / 2**30


def user_message(rng: random.Random, turn: int) -> str:
    return f"Question {turn}: " + " ".join(rng.choice(WORDS) for _ in range(QUESTION_WORDS)) + "?"


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def replicas(run: Path, kv: float, max_batch: int = 16) -> tuple[list[subprocess.Popen], list[str]]:
    ports = [free_port(), free_port()]
    procs = [start([sys.executable, "-m", "lmforge", "serve", str(run), "--port", str(p), "--threads", "1",
                    "--kv-memory", f"{kv:.4f}", "--max-batch", str(max_batch), "--served-model-name", "m"])
             for p in ports]  # fmt: skip
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    for proc, url in zip(procs, urls):
        wait_healthy(url, proc, "a replica")
    return procs, urls


def router(urls: list[str], policy: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [a for u in urls for a in ("--backend", u)]
    proc = start([sys.executable, "-m", "lmforge", "router", *args, "--policy", policy, "--port", str(port),
                  "--health-interval", "0.5"])  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, "the router")
    return proc, url


def stop(procs) -> None:
    for p in procs:
        p.kill()
        p.wait()


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def chat_workload(url: str, seed: int) -> tuple[list[float], int, float]:
    """(TTFTs, output tokens, wall seconds) of every user's rounds."""
    rng = random.Random(seed)
    plans = [(rng.uniform(0, 2.0), random.Random(rng.random())) for _ in range(USERS)]
    ttfts, tokens = [], 0

    async def user(client, name, delay, urng):
        nonlocal tokens
        await asyncio.sleep(delay)
        messages = [{"role": "system", "content": SYSTEM}]
        for turn in range(ROUNDS):
            messages.append({"role": "user", "content": user_message(urng, turn)})
            body = {"model": "m", "messages": messages, "max_tokens": REPLY, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}, "user": name}  # fmt: skip
            sent, first, reply = time.perf_counter(), None, []
            async for chunk in sse_chunks(client, f"{url}/v1/chat/completions", body):
                for c in chunk.get("choices", []):
                    if c["delta"].get("content"):
                        first = first or time.perf_counter()
                        reply.append(c["delta"]["content"])
                if chunk.get("usage"):
                    tokens += chunk["usage"]["completion_tokens"]
            ttfts.append((first or time.perf_counter()) - sent)
            messages.append({"role": "assistant", "content": "".join(reply)})
            await asyncio.sleep(urng.expovariate(1 / THINK))  # a person reads the reply: users fall out of step

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=USERS * 2)) as client:
        start_time = time.perf_counter()
        await asyncio.gather(*(user(client, f"user-{i}", d, r) for i, (d, r) in enumerate(plans)))
        return ttfts, tokens, time.perf_counter() - start_time


def one_policy(run: Path, kv: float, policy: str, seed: int, max_batch: int) -> dict:
    procs, urls = replicas(run, kv, max_batch)
    rproc, rurl = router(urls, policy)
    try:
        ttfts, tokens, wall = asyncio.run(chat_workload(rurl, seed))
        m = [scrape(u) for u in urls]
        hits = sum(x.get("lmforge_prefix_cache_hit_tokens_total", 0) for x in m)
        prompt = sum(x.get("lmforge_prompt_tokens_total", 0) for x in m)
        routed = scrape(rurl)
        per = [routed.get(f'lmforge_router_requests_total{{replica="{u}"}}', 0) for u in urls]
        return {"hit": hits / prompt, "ttft50": pct(ttfts, 50), "ttft95": pct(ttfts, 95), "tok_s": tokens / wall,
                "imbalance": max(per) / statistics.mean(per)}  # fmt: skip
    finally:
        stop([rproc, *procs])


def kill_test(run: Path, kv: float) -> str:
    procs, urls = replicas(run, kv, max_batch=2)
    rproc, rurl = router(urls, "round_robin")
    results: dict[int, tuple[float | None, bool]] = {}

    async def one(client, i):
        body = {"model": "m", "prompt": SYSTEM, "max_tokens": 200, "ignore_eos": True, "stream": True}
        started, done = None, False
        try:
            async with client.stream("POST", f"{rurl}/v1/completions", json=body) as answer:
                async for line in answer.aiter_lines():
                    if line.startswith("data: "):
                        started = started or time.time()
                        done = line == "data: [DONE]"
        except httpx.HTTPError:
            pass
        results[i] = (started, done)

    async def main():
        async with httpx.AsyncClient(timeout=600) as client:
            tasks = [asyncio.create_task(one(client, i)) for i in range(16)]
            held, deadline = 0, time.time() + 60
            while held < 8 and time.time() < deadline:
                await asyncio.sleep(0.05)
                rows = (await client.get(f"{rurl}/admin/replicas")).json()
                held = next(r["in_flight"] for r in rows if r["url"] == urls[0])
            await asyncio.sleep(0.5)
            os.kill(procs[0].pid, signal.SIGKILL)
            killed = time.time()
            await asyncio.gather(*tasks)
            return held, killed

    try:
        held, killed = asyncio.run(main())
    finally:
        stop([rproc, *procs])
    failed = [i for i, (_, ok) in results.items() if not ok]
    queued = [i for i, (s, _) in results.items() if s is None or s > killed]
    streaming = [i for i in failed if results[i][0] is not None and results[i][0] <= killed]
    return (f"replica A killed holding {held} requests: {len(failed)} of 16 failed, {len(streaming)} of them already "
            f"streaming; {len(queued)} not yet streaming at the kill, {sum(results[i][1] for i in queued)} of them "
            "answered in full by the other replica")  # fmt: skip


def router_overhead(run: Path, kv: float, n: int = 200) -> str:
    procs, urls = replicas(run, kv)
    rproc, rurl = router(urls[:1], "round_robin")
    body = {"model": "m", "prompt": "hi", "max_tokens": 1, "temperature": 0}
    direct, routed = [], []
    try:
        with httpx.Client(timeout=60) as client:
            for _ in range(20):
                client.post(f"{rurl}/v1/completions", json=body)
            for _ in range(n):
                for target, into in ((urls[0], direct), (rurl, routed)):
                    t = time.perf_counter()
                    client.post(f"{target}/v1/completions", json=body).raise_for_status()
                    into.append(time.perf_counter() - t)
    finally:
        stop([rproc, *procs])
    added50, added99 = (pct(routed, 50) - pct(direct, 50)) * 1e3, (pct(routed, 99) - pct(direct, 99)) * 1e3
    return (f"+{added50:.2f} ms p50, +{added99:.2f} ms p99 (direct {pct(direct, 50) * 1e3:.1f}/"
            f"{pct(direct, 99) * 1e3:.1f} ms, via the router "
            f"{pct(routed, 50) * 1e3:.1f}/{pct(routed, 99) * 1e3:.1f} ms; {n} requests each, interleaved)")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--policies", default="round_robin,least_loaded,session,cache_aware")
    ap.add_argument("--kv-at", choices=("mean", "longest"), default="mean",
                    help="size each replica's KV for half the histories at their mean length over the run (default) "
                         "or at their longest")  # fmt: skip
    ap.add_argument("--max-batch", type=int, default=16, help="each replica's --max-batch in the policy runs")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, round_robin and cache_aware")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.policies = 1, "round_robin,cache_aware"
    policies = args.policies.split(",")
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        ap.error(f"--policies: {', '.join(unknown)} unknown; choose from {', '.join(POLICIES)}")
    with tempfile.TemporaryDirectory() as tmp:
        run, kv = make_run(Path(tmp) / "run"), kv_gib_for_half_the_histories(args.kv_at)
        print(format_environment(environment()))
        print(f"{USERS} users × {ROUNDS} rounds, system prompt {len(SYSTEM)} tokens, replies {REPLY} tokens; 2 "
              f"replicas × 1 thread, --max-batch {args.max_batch}, KV {kv * 1024:.0f} MiB each (half the histories at "
              f"their {args.kv_at} length); "
              f"seeds 0..{args.seeds - 1}")  # fmt: skip
        results: dict[str, list[dict]] = {p: [] for p in policies}
        for seed in range(args.seeds):
            for policy in policies:
                results[policy].append(one_policy(run, kv, policy, seed, args.max_batch))
                r = results[policy][-1]
                print(f"  seed {seed} {policy:>12}: hit {r['hit']:.1%}, TTFT p50/p95 {r['ttft50'] * 1e3:.0f}/"
                      f"{r['ttft95'] * 1e3:.0f} ms, {r['tok_s']:.1f} tok/s, imbalance {r['imbalance']:.2f}",
                      flush=True)  # fmt: skip
        kill = kill_test(run, kv)
        overhead = router_overhead(run, kv)
    rows = []
    for policy, runs in results.items():

        def span(key, scale=1.0, fmt="{:.0f}", runs=runs):
            values = [r[key] * scale for r in runs]
            return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"

        rows.append((f"routing {policy}: prefix-cache hit rate, TTFT p50 / p95 ms, output tok/s, imbalance "
                     f"(median (range) of {len(runs)} seeds)",
                     f"{span('hit', 100, '{:.1f}')}%, {span('ttft50', 1e3)} / {span('ttft95', 1e3)}, "
                     f"{span('tok_s', 1, '{:.1f}')}, {span('imbalance', 1, '{:.2f}')}"))  # fmt: skip
    if "cache_aware" in results and "round_robin" in results:
        ca, rr = results["cache_aware"], results["round_robin"]
        hit = statistics.median(r["hit"] for r in ca) / statistics.median(r["hit"] for r in rr)
        p95_ca, p95_rr = [r["ttft95"] for r in ca], [r["ttft95"] for r in rr]
        spread = max(max(p95_ca) - min(p95_ca), max(p95_rr) - min(p95_rr))
        gain = statistics.median(p95_rr) - statistics.median(p95_ca)
        rows.append(("routing cache_aware ÷ round_robin: prefix-cache hit rate (goal ≥ 1.5×)",
                     f"{hit:.2f}× ({'MET' if hit >= 1.5 else 'NOT MET'})"))  # fmt: skip
        verdict = "MET" if gain > spread else "NOT MET"
        rows.append(("routing cache_aware vs round_robin: TTFT p95 lower by, against the spread between seeds",
                     f"{gain * 1e3:.0f} ms vs {spread * 1e3:.0f} ms ({verdict})"))  # fmt: skip
    rows.append(("routing: a replica SIGKILLed mid-run (round_robin, max batch 2, 16 streams)", kill))
    rows.append(("routing: the router's added latency per request (max_tokens 1)", overhead))
    prefix = (f"2 replicas × 1 thread, max batch {args.max_batch}, KV for half the histories at their {args.kv_at} "
              "length")  # fmt: skip
    report_rows(rows, prefix=prefix, save=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
