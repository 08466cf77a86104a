"""What the inference shortcuts cost in quality: Δperplexity on held-out stdlib text of trained runs.

1. Quantization. Perplexity = exp(mean nats/token) over a fixed set of val windows of the model's full
   context (`--windows`, default 64 × max_seq_len = 256 tokens, evenly spaced over val.bin so they span many
   files), each scheme against fp32 on the same tokens:
   - int8 KV cache, measured *through* the cache: the first half of each window is prefilled into a
     `ContiguousKVCache(kv_dtype="int8")`, the rest is fed one token at a time (`--kv-chunk`), so every
     query attends to int8-stored keys and values. The fp32 reference runs the same way with an fp32 cache,
     and must equal the plain forward (no cache) to ~1e-5: the sanity line.
   - weights: `quantize_model(copy.deepcopy(model), scheme)` for int8 (weight-only), w8a8, int4 (group 64 and
     32) and bf16 (only when a timing says it is cheap: on a CPU without native bf16 it is emulated);
     bytes = `quantization_report`'s quantized layers against their fp32 bytes.
   "± SE" is the standard error of Δ from the per-window paired differences: Δ is well above noise when
   it is several SE. Goals: Δ ≤ 1% for int8 KV and int8, ≤ 2% for w8a8, ≤ 5% for int4; bytes ≤ 27% (int8,
   w8a8) and ≤ 16% (int4) of the fp32 bytes.
2. Equal memory: a KV budget of B ∈ {32, 64, 128} entries per layer (`--budgets`). Each window (`--budget-
   windows`, default 24) is prefilled with its first B tokens, then fed one token at a time, through
   - sliding window: `SlidingKVCache(window=B)`, the last B tokens;
   - sinks: `SlidingKVCache(window=B, sinks=4)`, the first 4 tokens + the last B − 4 (Xiao et al. 2023);
   - merging: `TokenMergingCache(budget=B, sinks=4, recent=B // 2)`: the most similar adjacent entries
     between the sinks and the last B/2 merged (`--merge-recent`; on runs/tiny at step 240, B=32, recent
     0 → B/4 → B/2 → 3B/4 gave +10%, +1.9%, +0.3%, +0.1% Δppl on 16 windows: unprotected recent tokens hurt);
   against the full cache (one plain forward: exact). Perplexity over the positions ≥ B, where the budget
   binds. The window count keeps this table within ~3 minutes for runs/medium on a busy 2-core machine
   (24 windows, one thread: 121 s at load ~3, ~165 s at load ~6): it is 256 − B token-by-token steps per cache
   and budget, each a forward of all windows, and a merging step costs 2-3 sliding ones. Cost grows about
   linearly in windows.

One thread by default (`--threads`): quality does not depend on it, and on a busy machine two threads
contending with other work ran these forwards 10-20× slower. A run still being trained is measured at its
latest checkpoint (printed); a missing run is skipped with a note.

    python -m benchmarks.inference_quality                        # runs/tiny (~2-3 min), runs/medium (~4-5 min)
    python -m benchmarks.inference_quality --runs runs/tiny       # one run
    python -m benchmarks.inference_quality --quick                # random 2-layer model, few windows: a smoke run
    python -m benchmarks.inference_quality --record               # append the headline figures to docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness import (
    REPO_ROOT,
    Table,
    add_common_args,
    apply_common_args,
    command_line,
    environment,
    record,
    verdict,
)
from lmforge.infer.kv_cache import ContiguousKVCache
from lmforge.infer.merging import TokenMergingCache
from lmforge.infer.quantize import quantization_report, quantize_model
from lmforge.infer.sliding import SlidingKVCache
from lmforge.model import ModelConfig, Transformer

DEFAULT_RUNS = ("runs/tiny", "runs/medium")
SINKS = 4
# (label, scheme, int4 group size, Δppl goal, bytes goal): the goals as fractions
WEIGHT_SCHEMES = (
    ("int8", "int8", 64, 0.01, 0.27),
    ("w8a8", "w8a8", 64, 0.02, 0.27),
    ("int4 g64", "int4", 64, 0.05, 0.16),
    ("int4 g32", "int4", 32, 0.05, 0.16),
    ("bf16", "bf16", 64, None, None),
)
KV_GOAL = 0.01
BF16_MAX_SECONDS = 60.0  # run bf16 only when a one-window timing projects less than this


# ---- perplexity --------------------------------------------------------------------------------------------
@dataclass
class Score:
    """Per-window mean nats/token ([N], every window scores the same number of tokens)."""

    nats: torch.Tensor

    @property
    def ppl(self) -> float:
        return math.exp(self.nats.mean().item())

    def delta(self, ref: Score) -> tuple[float, float]:
        """Δppl vs `ref` as a fraction, and its standard error from the per-window paired differences."""
        diff = (self.nats - ref.nats).double()
        se = diff.std().item() / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        return math.expm1(diff.mean().item()), se


def token_nats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, T]


@torch.no_grad()
def nats_plain(model, windows: torch.Tensor, batch: int) -> torch.Tensor:
    """Next-token nats [N, T] of windows [N, T + 1], one forward per batch, no cache."""
    out = [token_nats(model(w[:, :-1]), w[:, 1:]) for w in windows.split(batch)]
    return torch.cat(out)


@torch.no_grad()
def nats_cached(model, windows: torch.Tensor, make_cache: Callable[[int], object], prefill: int, chunk: int,
                batch: int) -> torch.Tensor:  # fmt: skip
    """Next-token nats [N, T] with a fresh cache per batch: the first `prefill` tokens in one forward, the rest
    `chunk` at a time, so each later token attends to what the cache kept and returned."""
    out = []
    for w in windows.split(batch):
        x, y = w[:, :-1], w[:, 1:]
        cache = make_cache(len(w))
        logits = [model(x[:, :prefill], cache=cache)]
        logits += [model(x[:, i : i + chunk], cache=cache) for i in range(prefill, x.shape[1], chunk)]
        out.append(token_nats(torch.cat(logits, 1), y))
    return torch.cat(out)


def select_windows(tokens: np.ndarray, n: int, length: int, offset: float = 0.0) -> torch.Tensor:
    """n windows of length + 1 tokens evenly spaced over `tokens` (shifted by `offset` of a spacing), so a
    small count still spans many files; deterministic, so every scheme and every run scores the same text."""
    span = len(tokens) - (length + 1)
    if span < 0 or n < 1:
        raise ValueError(f"need n >= 1 windows of {length + 1} tokens, val has {len(tokens)}")
    spacing = span / n
    starts = [min(span, round((i + offset) * spacing)) for i in range(n)]
    return torch.from_numpy(np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in starts]))


# ---- 1. quantization ----------------------------------------------------------------------------------------
def measure_kv(model, windows, args) -> dict:
    cfg, T = model.cfg, windows.shape[1] - 1
    prefill = T // 2
    plain = Score(nats_plain(model, windows, args.batch).mean(1))
    scores, nbytes, seconds = {}, {}, {}
    for kv in ("fp32", "int8"):
        t0 = time.perf_counter()

        def make(n, kv=kv):
            cache = ContiguousKVCache(cfg, n, T, kv_dtype=kv)
            nbytes[kv] = cache.nbytes() / n
            return cache

        scores[kv] = Score(nats_cached(model, windows, make, prefill, args.kv_chunk, args.batch).mean(1))
        seconds[kv] = time.perf_counter() - t0
    sanity = abs(scores["fp32"].ppl / plain.ppl - 1)
    delta, se = scores["int8"].delta(scores["fp32"])
    return {
        "plain_ppl": plain.ppl, "fp32_ppl": scores["fp32"].ppl, "int8_ppl": scores["int8"].ppl, "sanity": sanity,
        "delta": delta, "se": se, "bytes_ratio": nbytes["int8"] / nbytes["fp32"], "plain": plain,
        "seconds": seconds["int8"],
    }  # fmt: skip


def bf16_is_cheap(model, windows, args) -> tuple[bool, str]:
    if args.bf16 != "auto":
        return args.bf16 == "on", "--bf16 off"
    one = windows[:1]
    qmodel = quantize_model(copy.deepcopy(model), "bf16")
    times = {}
    for name, m in (("fp32", model), ("bf16", qmodel)):
        nats_plain(m, one, 1)  # warm-up
        t0 = time.perf_counter()
        nats_plain(m, one, 1)
        times[name] = time.perf_counter() - t0
    projected = times["bf16"] * len(windows)
    slower = times["bf16"] / max(times["fp32"], 1e-9)
    if projected <= BF16_MAX_SECONDS:
        return True, ""
    return False, (f"bf16 skipped: a window takes {slower:.0f}× fp32's time here (no native bf16 matmul), "
                   f"~{projected:.0f} s for all; --bf16 on runs it")  # fmt: skip


def measure_weights(model, windows, ref: Score, args) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    run_bf16, why = bf16_is_cheap(model, windows, args)
    for label, scheme, group, goal, bytes_goal in WEIGHT_SCHEMES:
        if scheme == "bf16" and not run_bf16:
            notes.append(why)
            continue
        try:
            qmodel = quantize_model(copy.deepcopy(model), scheme, group_size=group)
        except RuntimeError as e:  # w8a8 without fbgemm
            notes.append(f"{label} skipped: {e}")
            continue
        t0 = time.perf_counter()
        score = Score(nats_plain(qmodel, windows, args.batch).mean(1))
        delta, se = score.delta(ref)
        report = quantization_report(model, qmodel)
        ok = None if goal is None else (delta <= goal and report["ratio"] <= bytes_goal)
        rows.append({
            "scheme": label, "ppl": score.ppl, "delta": delta, "se": se, "bytes_ratio": report["ratio"],
            "model_ratio": report["model_ratio"], "goal": goal, "bytes_goal": bytes_goal, "ok": ok,
            "seconds": time.perf_counter() - t0,
        })  # fmt: skip
    return rows, notes


def quant_table(name: str, kv: dict, rows: list[dict], n: int, T: int) -> Table:
    table = Table(
        ["scheme", "ppl", "Δppl", "± SE", "bytes / fp32", "model bytes", "goal (Δ, bytes)", "verdict", "s"],
        title=f"{name}: Δperplexity vs fp32 on {n} val windows × {T} tokens (int8 KV: vs an fp32 cache, "
        f"prefill {T // 2}, then token by token)",
    )
    kv_ok = kv["delta"] <= KV_GOAL
    table.add("fp32", f"{kv['plain_ppl']:.4f}", "", "", "", "", "", "", "")
    kv_cells = [f"{kv['int8_ppl']:.4f}", f"{kv['delta']:+.3%}", f"{kv['se']:.3%}", f"{kv['bytes_ratio']:.1%} (K/V)"]
    table.add("int8 KV cache", *kv_cells, "", f"≤{KV_GOAL:.0%}", verdict(kv_ok), f"{kv['seconds']:.0f}")
    for r in rows:
        goal = "" if r["goal"] is None else f"≤{r['goal']:.0%}, ≤{r['bytes_goal']:.0%}"
        table.add(r["scheme"], f"{r['ppl']:.4f}", f"{r['delta']:+.3%}", f"{r['se']:.3%}", f"{r['bytes_ratio']:.1%}",
                  f"{r['model_ratio']:.1%}", goal, verdict(r["ok"]), f"{r['seconds']:.0f}")  # fmt: skip
    return table


# ---- 2. equal memory ----------------------------------------------------------------------------------------
def budget_caches(cfg: ModelConfig, budget: int, merge_recent: float) -> dict[str, Callable[[int], object]]:
    caches = {"sliding window": lambda n: SlidingKVCache(cfg, n, budget)}
    if budget > SINKS:
        caches["sinks"] = lambda n: SlidingKVCache(cfg, n, budget, sinks=SINKS)
    recent = int(budget * merge_recent)
    if budget > SINKS + recent:
        caches["merging"] = lambda n: TokenMergingCache(cfg, n, budget, sinks=SINKS, recent=recent)
    return caches


def measure_budgets(model, windows, budgets: Sequence[int], args) -> tuple[list[dict], list[str]]:
    T = windows.shape[1] - 1
    full = nats_plain(model, windows, args.batch)
    rows, notes = [], []
    for budget in budgets:
        if not 0 < budget < T:
            notes.append(f"budget {budget} skipped: needs 0 < B < {T}")
            continue
        ref = Score(full[:, budget:].mean(1))
        row = {"budget": budget, "full": ref.ppl, "caches": {}}
        caches = budget_caches(model.cfg, budget, args.merge_recent)
        if len(caches) < 3:
            notes.append(f"B={budget}: too small for {SINKS} sinks (+ the merging cache's recent entries)")
        for name, make in caches.items():
            nbytes = []

            def counted(n, make=make, nbytes=nbytes):
                cache = make(n)
                nbytes.append(cache.nbytes() / n)
                return cache

            t0 = time.perf_counter()
            score = Score(nats_cached(model, windows, counted, budget, 1, args.batch)[:, budget:].mean(1))
            delta, se = score.delta(ref)
            row["caches"][name] = {"ppl": score.ppl, "delta": delta, "se": se, "bytes": nbytes[0],
                                   "seconds": time.perf_counter() - t0}  # fmt: skip
        rows.append(row)
    return rows, notes


def budget_table(name: str, rows: list[dict], n: int, T: int, cfg: ModelConfig) -> Table:
    table = Table(
        ["B", "full cache ppl", "cache", "KV bytes/seq", "ppl", "Δppl vs full", "± SE", "s"],
        title=f"{name}: KV budget B entries per layer, {n} windows × {T} tokens fed one at a time after a "
        f"B-token prefill; ppl over positions ≥ B (full cache: {cfg.kv_bytes_per_token() * T / 1024:.0f} KiB/seq)",
    )
    for row in rows:
        for i, (cache, r) in enumerate(row["caches"].items()):
            first = i == 0
            table.add(str(row["budget"]) if first else "", f"{row['full']:.4f}" if first else "", cache,
                      f"{r['bytes'] / 1024:.1f} KiB", f"{r['ppl']:.4f}", f"{r['delta']:+.2%}", f"{r['se']:.2%}",
                      f"{r['seconds']:.0f}")  # fmt: skip
    return table


# ---- runs ---------------------------------------------------------------------------------------------------
def quick_model() -> tuple[Transformer, np.ndarray, str]:
    """A random 2-layer model and random tokens: exercises every path in seconds, measures nothing."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, max_seq_len=64, n_layer=2, d_model=64, n_head=2, position="rope",
                      ffn="swiglu", norm="rmsnorm", bias=False)  # fmt: skip
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 4096).astype(np.uint16)
    return (
        Transformer(cfg).eval(),
        tokens,
        "random 2-layer model on random tokens (--quick): exercises the code, measures nothing",
    )


def load_run(run: str) -> tuple[Transformer, np.ndarray, str]:
    from lmforge.data.loader import TokenData
    from lmforge.runs import RunDir
    from lmforge.train.checkpoint import latest_checkpoint
    from lmforge.train.resolve import resolve_model

    model, _, config = resolve_model(run)
    data = Path(config.data)
    if not data.is_absolute() and not data.exists():
        data = REPO_ROOT / data
    ckpt = latest_checkpoint(RunDir.open(run).checkpoints)
    params = model.cfg.param_counts()["total"] / 1e6
    cfg = model.cfg
    desc = f"{run} ({cfg.n_layer}L d{cfg.d_model}, {params:.1f}M params, {ckpt.name}; val: {config.data})"
    return model, TokenData(data).val, desc


def measure_run(name: str, model, tokens: np.ndarray, args) -> dict:
    T = model.cfg.max_seq_len
    out: dict = {"name": name}
    t0 = time.perf_counter()
    windows = select_windows(tokens, args.windows, T)
    kv = measure_kv(model, windows, args)
    weights, notes = measure_weights(model, windows, kv["plain"], args)
    kv.pop("plain")
    out.update(kv=kv, weights=weights, windows=args.windows, T=T, quant_seconds=time.perf_counter() - t0)
    quant_table(name, kv, weights, args.windows, T).print()
    ok = "OK" if kv["sanity"] <= 1e-5 else "NOT OK"
    print(f"sanity: ppl through an fp32 cache {kv['fp32_ppl']:.6f} vs no cache {kv['plain_ppl']:.6f}: "
          f"|ratio − 1| = {kv['sanity']:.1e} (≤ 1e-5 {ok})")  # fmt: skip
    for note in notes:
        print(note)
    print(f"({out['quant_seconds']:.0f} s)\n")

    t0 = time.perf_counter()
    bwindows = select_windows(tokens, args.budget_windows, T, offset=0.5)
    budgets, notes = measure_budgets(model, bwindows, args.budgets, args)
    out.update(budgets=budgets, budget_windows=args.budget_windows, budget_seconds=time.perf_counter() - t0)
    budget_table(name, budgets, args.budget_windows, T, model.cfg).print()
    print(
        f"sinks = the first {SINKS} tokens + the last B − {SINKS}; merging keeps {SINKS} sinks and the last "
        f"{args.merge_recent:g}·B entries unmerged, and a query also sees itself before the merge (B + 1 keys; "
        "the sliding caches show it B). KV bytes = cache.nbytes() per sequence (merging's counts included)."
    )
    for note in notes:
        print(note)
    print(f"({out['budget_seconds']:.0f} s)\n")
    return out


def record_run(res: dict) -> None:
    cmd, name, kv = command_line(), res["name"], res["kv"]
    what = f"{res['windows']} val windows × {res['T']} tokens"
    record(
        f"{name}: int8 KV cache Δperplexity vs an fp32 cache ({what})",
        f"{kv['delta']:+.2%} ± {kv['se']:.2%} (ppl {kv['int8_ppl']:.3f} vs {kv['fp32_ppl']:.3f}); K/V bytes "
        f"{kv['bytes_ratio']:.1%} of fp32; goal ≤{KV_GOAL:.0%} {verdict(kv['delta'] <= KV_GOAL)}",
        cmd,
    )
    for r in res["weights"]:
        goal = "" if r["goal"] is None else f"; goals ≤{r['goal']:.0%}, ≤{r['bytes_goal']:.0%} {verdict(r['ok'])}"
        record(
            f"{name}: {r['scheme']} weights Δperplexity vs fp32 ({what})",
            f"{r['delta']:+.2%} ± {r['se']:.2%} (ppl {r['ppl']:.3f}); quantized layers {r['bytes_ratio']:.1%} "
            f"of their fp32 bytes (whole model {r['model_ratio']:.1%}){goal}",
            cmd,
        )
    names = {c for row in res["budgets"] for c in row["caches"]}
    for cache in sorted(names):
        parts = [f"B={row['budget']} {row['caches'][cache]['delta']:+.1%} ± {row['caches'][cache]['se']:.1%}"
                 for row in res["budgets"] if cache in row["caches"]]  # fmt: skip
        record(
            f"{name}: {cache} KV cache of B entries per layer, Δperplexity vs the full cache over positions ≥ B "
            f"({res['budget_windows']} windows × {res['T']} tokens, token by token)",
            "; ".join(parts),
            cmd,
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="run folders (missing ones skipped)")
    parser.add_argument("--windows", type=int, default=None, help="windows for the quantization table (64)")
    parser.add_argument("--budget-windows", type=int, default=None, help="windows for the budget table (24)")
    parser.add_argument("--budgets", type=lambda s: [int(b) for b in s.split(",")], default=None,
                        help="KV budgets, comma-separated (32,64,128)")  # fmt: skip
    parser.add_argument("--kv-chunk", type=int, default=1, help="tokens per forward after the int8-KV prefill")
    parser.add_argument("--batch", type=int, default=32, help="windows per forward")
    parser.add_argument("--merge-recent", type=float, default=0.5,
                        help="fraction of the budget token merging keeps unmerged at the end (0.5)")  # fmt: skip
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto", help="auto: only if cheap here")
    args = add_common_args(parser).parse_args(argv)
    if args.threads is None:
        # Quality does not depend on it, and on a busy 2-core machine two threads contending with other work
        # ran these small forwards 10-20× slower than one (measured): --threads 2 on a quiet machine.
        args.threads = 1
    args = apply_common_args(args)
    if args.quick:
        args.windows = args.windows or 8
        args.budget_windows = args.budget_windows or 4
        args.budgets = args.budgets or [16, 32, 48]
    else:
        args.windows = args.windows or 64
        args.budget_windows = args.budget_windows or 24
        args.budgets = args.budgets or [32, 64, 128]
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Print the tables; return {"runs": [per-run results], "skipped": [notes]}."""
    threads = torch.get_num_threads()
    try:
        return _main(parse_args(argv))
    finally:
        torch.set_num_threads(threads)  # --threads / --quick set it: leave a calling process as it was


def _main(args: argparse.Namespace) -> dict:
    env = environment()
    print(f"{env['machine']} | torch {env['torch']} | threads {env['threads']}")
    results, skipped = [], []
    sources = [("quick", None)] if args.quick else [(run, run) for run in args.runs]
    for name, run in sources:
        if run is None:
            model, tokens, desc = quick_model()
        else:
            try:
                model, tokens, desc = load_run(run)
            except FileNotFoundError as e:
                skipped.append(f"{run} skipped: {e}")
                print(skipped[-1] + "\n")
                continue
        print(desc)
        results.append(measure_run(run or name, model, tokens, args))
    if args.record:
        for res in results:
            record_run(res)
    return {"runs": results, "skipped": skipped}


if __name__ == "__main__":
    main()
