"""Batch-1 decode of a GPT-2-124M-shaped model: lmforge's contiguous-cache loop against HF `generate`, side by
side, with the GEMV roofline and the per-token cost at position 1024 against 128.

Both sides run the same random weights (seed 0; `lmforge.model.hf_export.to_hf`), with max_seq_len 2048 so position
1024 exists (learned positions, as GPT-2). A 32-token prompt, 128 new tokens, greedy, in ONE interleaved `Bench`:

  HF generate fp32   the baseline: GPT2LMHeadModel, attn_implementation="sdpa", its default (dynamic) cache,
                     no compile, do_sample=False, max_new_tokens = min_new_tokens = 128, the same threads
  ours fp32          `generate_stream` over `ContiguousKVCache`, no stop ids, so exactly 128 tokens, through
                     `lmforge.infer.fastpath.optimize_for_decode` as `lmforge generate`: every layer of a decode
                     step in one C call around lmforge's GEMV kernel
  ours bf16          `quantize_model(m, "bf16")` then `optimize_for_decode`, the path of `lmforge generate
                     --quantize bf16` (the same fused step, bf16 widened in the GEMV kernel)
  ours int8          weight-only int8 per channel; decode steps widen int8 to fp32 in the GEMV kernel
  ours w8a8          int8 weights × int8 dynamic activations in fbgemm
  ours int4          int4 per group of 64, dequantized on every call (a memory scheme)
  GEMV roofline      a 1-row x times every Linear weight of the model and the LM head, once, each by the fastest
                     reader of its shape (torch x·Wᵀ, torch x·Wt from a transposed copy, or lmforge's kernel):
                     the bytes a decode step must read, read with nothing else. Roofline tok/s = 1 ÷ its time,
                     bandwidth = weight bytes ÷ its time (embedding lookups are negligible).

Both generations stop after the 128th token: prefill + 127 one-token forwards each (`itertools.islice` stops
`generate_stream` before it feeds the last token back). Slow cases are not timed over the whole generation: one
decode step of each of ours is probed first, and a case over 2× fp32's step (on an AVX2 CPU: emulated bf16, int4,
weight-only int8 — whatever the probe finds) is timed over a few decode steps, the prefill timed apart in the
Bench's untimed setup, its 128-token time estimated as prefill + 127 × step (rows marked *). "ours fp32 (steps)"
is timed the same way: it gives the decode-only rate compared with the roofline, and checks the estimate against
the measured fp32 generation. Per-token time at position 1024 vs 128: single fp32 decode steps with the cache
holding 1024 or 128 tokens (filled through the cache protocol), truncated back after each step.

    python -m benchmarks.decode               # full run (~4-5 min on 2 quiet cores)
    python -m benchmarks.decode --quick       # 2 layers, d=128, 16 tokens, 2 repeats: a smoke run
    python -m benchmarks.decode --record      # append the headline figures to docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    fmt_bytes,
    format_environment,
    record,
    verdict,
)
from lmforge.config import load_config
from lmforge.infer import kernels
from lmforge.infer.fastpath import optimize_for_decode
from lmforge.infer.generate import generate_stream
from lmforge.infer.kv_cache import ContiguousKVCache
from lmforge.infer.quantize import quantization_report, quantize_model
from lmforge.model import ModelConfig, Transformer

GPT2_YAML = Path(__file__).resolve().parents[1] / "configs" / "model" / "gpt2-124m.yaml"
PROMPT_LEN = 32
POSITIONS = (128, 1024)
SCHEMES = ("bf16", "int8", "w8a8", "int4")
GOAL_VS_HF, GOAL_ROOFLINE, GOAL_BF16, GOAL_INT8, GOAL_POS = 1.15, 0.90, 1.8, 3.0, 1.25
BASE, OURS = "HF generate fp32", "ours fp32"


# A case whose decode step takes over SLOW × fp32's is timed over a few steps (the prefill apart) and scaled, so
# that it costs about STEP_BUDGET of the fp32 generation per round: emulated bf16, int4 and weight-only int8 run
# 2-10x slower than fp32 on an AVX2 CPU, and 128 tokens of each would take minutes.
SLOW, STEP_BUDGET, MAX_STEPS = 2.0, 0.25, 16


@dataclass
class Plan:
    """What one run measures: the model, the generation length, the decode steps ours fp32 (steps) times."""

    cfg: ModelConfig
    label: str
    new_tokens: int
    fp32_steps: int  # the decode-only fp32 rate, for the roofline
    step_repeats: int  # rounds of the position bench


def make_plan(quick: bool) -> Plan:
    if quick:
        cfg = ModelConfig(vocab_size=4096, max_seq_len=2048, n_layer=2, d_model=128, n_head=4, ffn="gelu_tanh",
                          position="learned", norm="layernorm", bias=True, tie_embeddings=True)  # fmt: skip
        return Plan(cfg, "quick 2-layer d=128", new_tokens=16, fp32_steps=4, step_repeats=3)
    # GPT-2 small's shape, with 2048 learned positions so a decode step at position 1024 is allowed.
    cfg = load_config(ModelConfig, GPT2_YAML, ["max_seq_len=2048"])
    return Plan(cfg, "GPT-2-124M", new_tokens=128, fp32_steps=16, step_repeats=25)


def probe_step(model: Transformer, prompt: list[int]) -> float:
    """Seconds of one greedy decode step: the faster of two, after the prefill and a first step (which also warm
    the model up). The faster, so that a step descheduled on a busy machine does not make a case look slow."""
    stream = generate_stream(model, prompt, max_new_tokens=4, temperature=0.0)
    next(stream), next(stream)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        next(stream)
        times.append(time.perf_counter() - t0)
    return min(times)


def choose_steps(probes: dict[str, float], n: int, fp32_steps: int) -> dict[str, int]:
    """Decode steps to time per stepped case: ours fp32 always (for the roofline), and every case slower than
    SLOW × fp32, with as many steps as fit STEP_BUDGET of the fp32 generation (2 to MAX_STEPS)."""
    fp32 = probes[OURS]
    steps = {OURS: fp32_steps}
    for name, t in probes.items():
        if name != OURS and t > SLOW * fp32:
            steps[name] = max(2, min(MAX_STEPS, round(STEP_BUDGET * n * fp32 / t)))
    return steps


# ---- the decoders ------------------------------------------------------------------------------------------


def ours_generate(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy, exactly n tokens; stops right after the n-th, so the forward that would feed it back (whose
    logits nobody reads) never runs: prefill + n-1 forwards, as HF's generate."""
    return list(itertools.islice(generate_stream(model, prompt, max_new_tokens=n, temperature=0.0), n))


def make_hf(model: Transformer):
    from lmforge.model.hf_export import to_hf

    hf = to_hf(model)  # GPT2LMHeadModel, eval, the same weights
    hf.config._attn_implementation = "sdpa"  # set by hf_config already; explicit, as the baseline depends on it
    return hf


def hf_generate(hf, prompt: list[int], n: int) -> list[int]:
    from transformers import GenerationConfig

    # min_new_tokens = max_new_tokens: exactly n tokens whatever the eos id; the default (dynamic) cache.
    gen = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    return out[0, len(prompt) :].tolist()


@dataclass
class SteppedDecode:
    """A generation timed in two parts: the prefill (and first token) in the Bench's untimed setup, timed here
    by hand, then `steps` one-token decode steps, the Bench's timed part. The 128-token time is estimated as
    prefill + (n-1) × step."""

    model: Transformer
    prompt: list[int]
    steps: int
    total: int  # the generation length estimated (max_new_tokens of the stream)
    prefill_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def setup(self):
        stream = generate_stream(self.model, self.prompt, max_new_tokens=self.total, temperature=0.0)
        t0 = time.perf_counter()
        first = next(stream)  # the prefill forward and the first token
        self.prefill_times.append(time.perf_counter() - t0)
        return stream, first

    def run(self, state) -> None:
        stream, first = state
        self.tokens = [first] + [next(stream) for _ in range(self.steps)]

    def prefill(self, warmup: int) -> float:
        return statistics.median(self.prefill_times[warmup:] or self.prefill_times)

    def estimate(self, steps_median: float, warmup: int) -> float:
        return self.prefill(warmup) + steps_median * (self.total - 1) / self.steps


# ---- the roofline ------------------------------------------------------------------------------------------


def linear_weights(model: Transformer) -> list[torch.Tensor]:
    """Every weight matrix a decode step multiplies by: each nn.Linear of the blocks, then the LM head (tied to
    the embedding in GPT-2: read once per token as the head)."""
    found = [m.weight.detach() for m in model.blocks.modules() if isinstance(m, nn.Linear)]
    return found + [model.lm_head.weight.detach()]


def weight_bytes(weights: Sequence[torch.Tensor]) -> int:
    return sum(w.numel() * w.element_size() for w in weights)


def gemv_readers(w: torch.Tensor, x: torch.Tensor) -> dict:
    """The ways this CPU can multiply a 1-row x by w: torch's x·Wᵀ from [out, in], torch's x·Wt from a contiguous
    [in, out] copy, and lmforge's GEMV kernel (when built)."""
    readers = {"torch x·Wᵀ": lambda: F.linear(x, w)}
    wt = w.t().contiguous()
    readers["torch x·Wt"] = lambda: torch.mm(x, wt)
    if kernels.available():  # planned once, as the model's modules do: the reader pays no per-call checks
        plan = kernels.GemvPlan([(w, None, None)])
        readers["lmforge gemv"] = lambda: plan(x)
    return readers


def gemv_sweep(weights: Sequence[torch.Tensor], readers: dict[tuple[int, int], str]):
    """fn() that multiplies a 1-row input by every weight once, in model order (so, as in a decode step, each
    matrix comes from memory, not cache): the weight reads of one token and nothing else. Each weight is read by
    `readers[shape]`, the fastest of `gemv_readers` for its shape in `gemv_by_shape`: the roofline is the best
    this CPU streams these matrices, whatever ours uses. Consecutive matrices that lmforge's kernel reads with one
    input width go in one call (a layer's q, k, v, o and up), as a fused decode step reads them: the sweep pays no
    more Python per matrix than the step it bounds."""
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}

    def joins(before: torch.Tensor, w: torch.Tensor) -> bool:  # the kernel reads both, with one input width
        kernel = "lmforge gemv"
        return readers[tuple(before.shape)] == readers[tuple(w.shape)] == kernel and before.shape[1] == w.shape[1]

    runs: list[list[torch.Tensor]] = []
    for w in weights:
        if runs and joins(runs[-1][-1], w):
            runs[-1].append(w)
        else:
            runs.append([w])
    calls = []
    for run in runs:
        if len(run) > 1:
            plan = kernels.GemvPlan([(w, None, None) for w in run])
            calls.append(lambda plan=plan, x=xs[run[0].shape[1]]: plan(x))
        else:
            calls.append(gemv_readers(run[0], xs[run[0].shape[1]])[readers[tuple(run[0].shape)]])

    def fn() -> None:
        for call in calls:
            call()

    return fn


def gemv_by_shape(weights: Sequence[torch.Tensor], repeats: int, warmup: int) -> tuple[Table, dict]:
    """Bandwidth per weight shape and reader (all matrices of that shape, once each, so they stream from memory as
    in a decode step), interleaved: torch's 1-row matmul in both layouts against lmforge's GEMV kernel, in the
    same rounds. Returns the table and the fastest reader of each shape (what the roofline reads with)."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for w in weights:
        groups.setdefault(tuple(w.shape), []).append(w)
    bench = Bench(repeats=repeats, warmup=warmup)
    sizes, cases_shape, cases_reader = {}, [], []
    for shape, ws in groups.items():
        x = torch.randn(1, shape[1])
        per_matrix = [gemv_readers(w, x) for w in ws]
        for reader in per_matrix[0]:
            calls = [readers[reader] for readers in per_matrix]
            name = f"{shape[0]}×{shape[1]} {reader}"
            bench.add(name, lambda calls=calls: [call() for call in calls])
            sizes[name] = (len(ws), weight_bytes(ws))
            cases_shape.append(shape)
            cases_reader.append(reader)
    result = bench.run()
    table = Table(["weight [out×in], reader", "matrices", "bytes", "median", "GB/s"],
                  title="fp32 GEMV bandwidth by shape and reader")  # fmt: skip
    fastest: dict[tuple[int, int], tuple[float, str]] = {}
    for case, shape, reader in zip(result.cases, cases_shape, cases_reader):
        count, nbytes = sizes[case.name]
        table.add(case.name, count, fmt_bytes(nbytes), f"{case.median * 1e3:.2f} ms",
                  f"{nbytes / case.median / 1e9:.1f}")  # fmt: skip
        fastest[shape] = min(fastest.get(shape, (float("inf"), "")), (case.median, reader))
    return table, {shape: reader for shape, (_, reader) in fastest.items()}


# ---- position 1024 vs 128 ----------------------------------------------------------------------------------


def filled_cache(cfg: ModelConfig, length: int, room: int = 1, seed: int = 0) -> ContiguousKVCache:
    """A cache holding `length` tokens of random keys and values, with room for `room` more, written through the
    cache protocol (begin once, update per layer) as a prefill would: a step's cost does not depend on them."""
    cache = ContiguousKVCache(cfg, 1, length + room)
    g = torch.Generator().manual_seed(seed)
    cache.begin(torch.arange(length)[None], None)
    shape = (1, cfg.n_kv_head, length, cfg.head_dim)
    for layer in range(cfg.n_layer):
        cache.update(layer, torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    return cache


def decode_step(model: Transformer, cache: ContiguousKVCache, token: int = 0):
    """fn() = one greedy decode step (as `generate_stream` takes it) at the cache's length, then the cache is
    truncated back, so every repeat runs at the same position."""
    length = cache.length
    x = torch.tensor([[token]])

    @torch.no_grad()
    def fn() -> int:
        out = int(model(x, cache=cache)[0, -1].argmax())
        cache.truncate(length)
        return out

    return fn


def position_bench(model: Transformer, repeats: int, warmup: int) -> BenchResult:
    bench = Bench(repeats=repeats, warmup=warmup, title="one fp32 decode step, cache holding N tokens")
    for n in POSITIONS:
        bench.add(f"step @{n}", decode_step(model, filled_cache(model.cfg, n)), baseline=n == POSITIONS[0])
    return bench.run()


# ---- the main bench ----------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the summary: a case's 128-token time (measured or estimated) and what it was built from."""

    name: str
    timed: str
    median: float  # median of what the Bench timed
    generation: float  # seconds for the whole generation (measured, or prefill + (n-1) × step)
    tokens: list[int]
    weight_bytes: int
    estimated: bool = False

    def tok_s(self, n: int) -> float:
        return n / self.generation


def prefix_match(a: list[int], b: list[int]) -> str:
    n = min(len(a), len(b))
    same = next((i for i in range(n) if a[i] != b[i]), n)
    return f"{same}/{n}"


def make_models(base: Transformer) -> dict[str, Transformer]:
    # Every model through optimize_for_decode (lmforge.infer.fastpath), as `lmforge generate` does: batch-1 steps
    # run every layer in one C call where the weights allow (fp32, bf16, int8), module by module elsewhere.
    models = {OURS: optimize_for_decode(copy.deepcopy(base))}
    for scheme in SCHEMES:  # quantize copies: quantize_model works in place
        models[f"ours {scheme}"] = optimize_for_decode(quantize_model(copy.deepcopy(base), scheme).eval())
    return models


def run_main_bench(plan: Plan, base: Transformer, models: dict[str, Transformer], steps: dict[str, int],
                   prompt: list[int], args, readers: dict):  # fmt: skip
    """The interleaved bench of every case; returns (summary rows, the bench result, weight bytes per token)."""
    n = plan.new_tokens
    hf = make_hf(base)
    outputs: dict[str, list[int]] = {}

    def whole(name, fn):
        def run():
            outputs[name] = fn()

        return run

    bench = Bench(repeats=args.repeats, warmup=args.warmup, title=f"{plan.label}: batch-1 greedy decode")
    bench.add(BASE, whole(BASE, lambda: hf_generate(hf, prompt, n)), baseline=True, work=n, unit="tok")
    stepped: dict[str, SteppedDecode] = {}
    for name, model in models.items():
        if name != OURS and name in steps:
            continue  # a slow case: only its stepped form below
        bench.add(name, whole(name, lambda m=model: ours_generate(m, prompt, n)), work=n, unit="tok")
    for name, k in steps.items():
        stepped[name] = SteppedDecode(models[name], prompt, k, n)
        label = f"{name} (steps)" if name == OURS else name
        bench.add(label, stepped[name].run, setup=stepped[name].setup, work=k, unit="tok")
    weights = linear_weights(base)
    sweep = gemv_sweep(weights, readers)
    # As many sweeps per round as ours fp32 (steps) takes decode steps: both cases last as long, so a burst of load
    # on this shared machine weighs on them alike.
    bench.add("GEMV roofline", lambda: [sweep() for _ in range(steps[OURS])], work=steps[OURS], unit="tok")
    print("roofline readers: " + ", ".join(f"{o}×{i} {name}" for (o, i), name in readers.items()))
    cases = ", ".join(c.name for c in bench.cases)
    print(f"main bench: {len(bench.cases)} cases ({cases}), {args.warmup} + {args.repeats} interleaved rounds",
          flush=True)  # fmt: skip
    result = bench.run()

    fp32_bytes = plan.cfg.weight_bytes("float32")
    rows = []
    for case in result.cases:
        name = case.name.removesuffix(" (steps)")
        if case.name == "GEMV roofline":
            continue
        wbytes = fp32_bytes if name in (BASE, OURS) else quantization_report(plan.cfg, models[name])["model_bytes"]
        if case.name in (BASE, OURS) or name not in stepped:
            rows.append(Row(case.name, f"prefill + {n - 1} steps", case.median, case.median, outputs[case.name],
                            wbytes))  # fmt: skip
        else:
            s = stepped[name]
            timed = f"{s.steps} steps (prefill {s.prefill(args.warmup) * 1e3:.0f} ms apart)"
            rows.append(Row(case.name, timed, case.median, s.estimate(case.median, args.warmup), s.tokens, wbytes,
                            estimated=True))  # fmt: skip
    return rows, result, weight_bytes(weights)


def summary_table(rows: list[Row], n: int) -> Table:
    by_name = {r.name: r for r in rows}
    hf, ours = by_name[BASE], by_name[OURS]
    table = Table(["case", "timed", "median", f"{n}-token time", "tok/s", "× HF fp32", "weights", "greedy = fp32"],
                  title=f"batch-1 greedy decode, {PROMPT_LEN}-token prompt, {n} new tokens (* = estimated: prefill "
                  f"+ {n - 1} × median step)")  # fmt: skip
    for r in rows:
        ref = ours if r.name != OURS else hf  # ours fp32 is checked against HF, the rest against ours fp32
        table.add(r.name, r.timed, f"{r.median * 1e3:,.0f} ms", f"{r.generation:.2f} s" + ("*" if r.estimated else ""),
                  f"{r.tok_s(n):.1f}", f"{hf.generation / r.generation:.2f}×", fmt_bytes(r.weight_bytes),
                  prefix_match(r.tokens, ref.tokens) + (" (vs HF)" if r.name == OURS else ""))  # fmt: skip
    return table


def star(row: Row) -> str:
    return " (estimated from steps)" if row.estimated else ""


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the benchmark; returns the headline figures (also printed, and recorded with --record)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_common_args(parser, repeats=5, warmup=1).parse_args(argv)
    if args.quick and args.repeats is None:
        args.repeats = 2
    args = apply_common_args(args)
    warnings.filterwarnings("ignore", message=".*_token_id.*")

    plan = make_plan(args.quick)
    torch.manual_seed(0)
    base = Transformer(plan.cfg).eval()
    prompt = torch.randint(plan.cfg.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()
    import transformers

    print(f"{plan.label}: {plan.cfg.param_counts()['total'] / 1e6:.1f}M params, {plan.cfg.n_layer} layers, "
          f"d={plan.cfg.d_model}, vocab {plan.cfg.vocab_size}, learned positions (max {plan.cfg.max_seq_len}), "
          f"random weights (seed 0)")  # fmt: skip
    print(f"baseline: HF transformers {transformers.__version__} GPT2LMHeadModel.generate, sdpa, default cache, "
          f"no compile; threads {torch.get_num_threads()}")  # fmt: skip
    if not args.quick:  # measured once, cached in ~/.cache/lmforge
        from lmforge.train.peak import cpu_bf16_ratio, cpu_supports_fast_bf16

        fast = "fast bf16" if cpu_supports_fast_bf16() else "no fast bf16 (emulated)"
        print(f"this CPU: bf16 matmuls at {cpu_bf16_ratio():.1%} of the fp32 rate: {fast}")

    models = make_models(base)
    probes = {name: probe_step(model, prompt) for name, model in models.items()}
    steps = choose_steps(probes, plan.new_tokens, plan.fp32_steps)
    print(
        "probe, one decode step: " + ", ".join(f"{k.removeprefix('ours ')} {v * 1e3:.0f} ms" for k, v in probes.items())
    )
    for name, k in steps.items():
        if name != OURS:
            print(f"{name}: {probes[name] / probes[OURS]:.1f}× fp32's step: timed over {k} decode steps and scaled to "
                  f"{plan.new_tokens} tokens (prefill timed apart), not over the whole generation")  # fmt: skip

    # GEMV readers first: the roofline reads each shape with the one that streamed it fastest here.
    by_shape, readers = gemv_by_shape(linear_weights(base), repeats=max(3, args.repeats), warmup=1)
    by_shape.print()
    rows, result, wbytes = run_main_bench(plan, base, models, steps, prompt, args, readers)
    n = plan.new_tokens
    print(format_environment(result.env))
    summary_table(rows, n).print()
    by_name = {r.name: r for r in rows}
    hf, ours = by_name[BASE], by_name[OURS]

    # Roofline: the GEMV sweep ran in the same rounds as the decodes, under the same load. Medians against
    # medians (the goal) and fastest against fastest: this machine's bandwidth swings by ±20% between rounds, and
    # a fastest sweep against a median step would charge that swing to ours.
    sweeps = result["GEMV roofline"]
    sweep = sweeps.median / sweeps.work  # seconds to read every weight once
    roofline = 1 / sweep
    fp32_steps = result[f"{OURS} (steps)"]
    decode_rate = fp32_steps.work / fp32_steps.median
    best_fraction = (fp32_steps.work / fp32_steps.min) / (sweeps.work / sweeps.min)
    est = by_name[f"{OURS} (steps)"].generation
    print(f"\nGEMV roofline: {len(linear_weights(base))} weight matrices ({fmt_bytes(wbytes)} fp32) read once per "
          f"token in {sweep * 1e3:.1f} ms = {wbytes / sweep / 1e9:.1f} GB/s -> {roofline:.1f} tok/s")  # fmt: skip
    print(
        f"ours fp32 decode steps: {decode_rate:.1f} tok/s = {decode_rate / roofline:.1%} of the roofline (medians; "
        f"fastest round against fastest sweep: {best_fraction:.1%}); whole generation (prefill included): "
        f"{ours.tok_s(n):.1f} tok/s = {ours.tok_s(n) / roofline:.1%}"
    )
    print(f"estimate check: ours fp32 estimated {est:.2f} s from prefill + steps vs measured {ours.generation:.2f} s "
          f"({est / ours.generation - 1:+.1%}): the error of the * rows' method")  # fmt: skip

    pos = position_bench(models[OURS], plan.step_repeats, warmup=2)
    pos.table().print()
    pos_ratio = pos[f"step @{POSITIONS[1]}"].ratio

    vs_hf = hf.generation / ours.generation
    bf16 = by_name["ours bf16"]
    int8_name = max(("ours int8", "ours w8a8"), key=lambda k: by_name[k].tok_s(n))
    int8 = by_name[int8_name]
    figures = {
        "ours_fp32_vs_hf": vs_hf,
        "roofline_fraction": decode_rate / roofline,
        "roofline_fraction_fastest": best_fraction,
        "roofline_tok_s": roofline,
        "bf16_vs_hf": hf.generation / bf16.generation,
        "int8_vs_hf": hf.generation / int8.generation,
        "int4_vs_hf": hf.generation / by_name["ours int4"].generation,
        "pos1024_vs_pos128": pos_ratio,
    }
    print("\ngoals")
    print(f"  ours fp32 >= {GOAL_VS_HF}× HF: {vs_hf:.2f}× {verdict(vs_hf >= GOAL_VS_HF)}")
    print(f"  ours fp32 >= {GOAL_ROOFLINE:.0%} of the GEMV roofline: {figures['roofline_fraction']:.1%} "
          f"{verdict(figures['roofline_fraction'] >= GOAL_ROOFLINE)}")  # fmt: skip
    print(f"  bf16 >= {GOAL_BF16}× HF fp32: {figures['bf16_vs_hf']:.2f}×{star(bf16)} "
          f"{verdict(figures['bf16_vs_hf'] >= GOAL_BF16)}")  # fmt: skip
    print(f"  fastest int8 ({int8_name.removeprefix('ours ')}) >= {GOAL_INT8}× HF fp32: {figures['int8_vs_hf']:.2f}×"
          f"{star(int8)} {verdict(figures['int8_vs_hf'] >= GOAL_INT8)}")  # fmt: skip
    print(f"  step @{POSITIONS[1]} <= {GOAL_POS}× step @{POSITIONS[0]}: {pos_ratio:.2f}× "
          f"{verdict(pos_ratio <= GOAL_POS)}")  # fmt: skip

    if args.record:
        cmd = command_line()
        what = f"{plan.label} batch-1 greedy decode ({PROMPT_LEN}-token prompt, {n} new)"
        record(
            f"{what}: lmforge fp32 vs HF generate fp32 (sdpa)",
            f"{vs_hf:.2f}× ({ours.tok_s(n):.1f} vs {hf.tok_s(n):.1f} tok/s, n={result[OURS].n})",
            cmd,
        )
        record(
            f"{what}: lmforge fp32 decode steps, % of fp32 GEMV roofline",
            f"{figures['roofline_fraction']:.0%} of medians, {best_fraction:.0%} fastest vs fastest ({decode_rate:.1f} "
            f"of {roofline:.1f} tok/s; "
            f"{wbytes / sweep / 1e9:.1f} GB/s over {fmt_bytes(wbytes)} of weights)",
            cmd,
        )
        record(
            f"{what}: lmforge bf16 weights vs HF fp32",
            f"{figures['bf16_vs_hf']:.2f}× ({bf16.tok_s(n):.1f} tok/s{star(bf16)})",
            cmd,
        )
        record(
            f"{what}: fastest lmforge int8 ({int8_name.removeprefix('ours ')}) vs HF fp32",
            f"{figures['int8_vs_hf']:.2f}× ({int8.tok_s(n):.1f} tok/s{star(int8)})",
            cmd,
        )
        record(f"{plan.label}: fp32 decode step at position {POSITIONS[1]} ÷ at {POSITIONS[0]}",
               f"{pos_ratio:.2f} (medians {pos[f'step @{POSITIONS[1]}'].median * 1e3:.1f} vs "
               f"{pos[f'step @{POSITIONS[0]}'].median * 1e3:.1f} ms, n={plan.step_repeats})", cmd)  # fmt: skip
    return figures


if __name__ == "__main__":
    main()
