"""Attention kernels, forward + backward: time and peak live memory against sequence length.

B=1, H=12, head_dim=64, RoPE applied to q and k, dropout 0, fp32 and bf16, T in {512, 1024, 2048, 4096}, every
kernel of `lmforge.model.attention`. Times are medians of interleaved repeats (all kernels of one T and
dtype take turns); memory is the peak of live tensors allocated by one step (torch's MemTracker: inputs
excluded, gradients and saved activations included). Growth ratios between successive T show the complexity:
×2 per doubling is O(T) or O(T·W), ×2.83 is O(T·√T), ×4 is O(T²).

    python -m benchmarks.attention              # full table (~5 min on 2 cores)
    python -m benchmarks.attention --quick      # T up to 2048, 3 repeats
    python -m benchmarks.attention --record     # append the headline figures to docs/benchmarks.md
    python -m benchmarks.attention --long       # sub-quadratic kernels only, T = 4096 … 32768 (fp32)

At T ≤ 4096 the O(T·d) tensors every kernel holds (q, k, v, their gradients, the output) outweigh the
O(T·√T) part of block_sparse, so its growth shows best in `--long`. Its memory stays O(T·d) in practice: the
≈3√T keys per query are gathered (3·T·d per K and V), and SDPA's flash kernel inside never materialises the
T·3√T scores; only a boolean mask of that size is kept.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from benchmarks.harness import Bench, Table, add_common_args, apply_common_args, command_line, record
from benchmarks.memory import peak_live_memory
from lmforge.hardware import torch_dtype
from lmforge.model import ModelConfig
from lmforge.model.attention import (
    block_sparse_attention,
    feature_map,
    linear_attention,
    naive_attention,
    sliding_window_attention,
)
from lmforge.model.positions import RotaryEmbedding, apply_rope

H, D, WINDOW, CHUNK = 12, 64, 256, 64
KERNELS = ["naive", "sdpa", "sliding_window", "block_sparse", "linear"]
SUBQUADRATIC = ["sliding_window", "block_sparse", "linear"]
DTYPES = {name: torch_dtype(name) for name in ("fp32", "bf16")}  # the dtypes timed, by their short names


def block_for(T: int) -> int:
    return round(math.sqrt(T))


def kernel_fn(name: str, T: int):
    if name == "naive":
        return lambda q, k, v: naive_attention(q, k, v)
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if name == "sliding_window":
        return lambda q, k, v: sliding_window_attention(q, k, v, WINDOW)
    if name == "block_sparse":
        return lambda q, k, v: block_sparse_attention(q, k, v, block_for(T))
    return lambda q, k, v: linear_attention(feature_map(q), feature_map(k), v, chunk=CHUNK)[0]


def make_inputs(T: int, dtype):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, H, T, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
    rope = RotaryEmbedding(ModelConfig(vocab_size=8, n_layer=1, d_model=H * D, n_head=H, position="rope"))
    cos, sin = rope(torch.arange(T)[None])
    return q, k, v, cos, sin


def step(name: str, inputs, T: int):
    """One forward + backward through RoPE and the kernel."""
    q, k, v, cos, sin = inputs
    out = kernel_fn(name, T)(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    out.float().sum().backward()
    q.grad = k.grad = v.grad = None


def measure(kernels, baseline: str, T: int, dtype_name: str, args) -> dict[str, tuple[float, int]]:
    """Interleaved timing of `kernels` at one T and dtype, then each one's peak live memory."""
    inputs = make_inputs(T, DTYPES[dtype_name])
    bench = Bench(repeats=args.repeats, warmup=args.warmup, title=f"{dtype_name} T={T} fwd+bwd")
    for name in kernels:
        bench.add(name, lambda n=name: step(n, inputs, T), baseline=name == baseline)
    result = bench.run()
    result.print()
    return {name: (result[name].median, peak_live_memory(step, (name, inputs, T)).bytes) for name in kernels}


def sdpa_backends() -> list[str]:
    """Which backend SDPA picks on this machine for the cases that matter (the index → SDPBackend name)."""
    names = {int(v): k for k, v in SDPBackend.__members__.items()}
    q = torch.randn(1, H, 1024, D, requires_grad=True)
    lines = []
    for label, kwargs in [
        ("causal, no mask", dict(is_causal=True)),
        ("bool mask", dict(attn_mask=torch.ones(1024, 1024, dtype=torch.bool).tril())),
        ("float bias without grad (ALiBi)", dict(attn_mask=torch.randn(1, H, 1024, 1024))),
        (
            "float bias with grad (T5 relative)",
            dict(attn_mask=torch.randn(1, H, 1024, 1024, requires_grad=True)),
        ),
        ("causal, dropout 0.1", dict(is_causal=True, dropout_p=0.1)),
    ]:
        choice = torch._fused_sdp_choice(q, q, q, **kwargs)
        lines.append(f"  {label:36s} -> {names.get(choice, choice)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    parser.add_argument("--long", action="store_true", help="sub-quadratic kernels at T = 4096 … 32768, fp32")
    args = apply_common_args(add_common_args(parser, repeats=5, warmup=1).parse_args())
    if args.long:
        run_long(args)
        return
    args.dtypes = args.dtypes or list(DTYPES)
    lengths = args.lengths or ([512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096])
    print("SDPA backend chosen (torch._fused_sdp_choice, fp32, T=1024, requires_grad):")
    print("\n".join(sdpa_backends()))

    times: dict[tuple, float] = {}
    mems: dict[tuple, int] = {}
    for dtype_name in args.dtypes:
        for T in lengths:
            for name, (t, m) in measure(KERNELS, "naive", T, dtype_name, args).items():
                times[dtype_name, T, name], mems[dtype_name, T, name] = t, m

    for dtype_name in args.dtypes:
        table = Table(
            ["kernel"]
            + [f"T={T} ms" for T in lengths]
            + [f"T={T} MiB" for T in lengths]
            + ["time ×/doubling", "mem ×/doubling"],
            title=f"{dtype_name}: median time and peak live memory (MemTracker), growth per doubling of T",
        )
        for name in KERNELS:
            t = [times[dtype_name, T, name] for T in lengths]
            m = [mems[dtype_name, T, name] for T in lengths]
            grow_t = "/".join(f"{b / a:.2f}" for a, b in zip(t, t[1:]))
            grow_m = "/".join(f"{b / a:.2f}" for a, b in zip(m, m[1:]))
            table.add(name, *(f"{x * 1e3:.1f}" for x in t), *(f"{x / 2**20:.1f}" for x in m), grow_t, grow_m)
        table.print()

    top = max(lengths)
    for dtype_name in args.dtypes:
        ratio = mems[dtype_name, top, "sdpa"] / mems[dtype_name, top, "naive"]
        speed = times[dtype_name, top, "naive"] / times[dtype_name, top, "sdpa"]
        print(f"{dtype_name} T={top}: sdpa peak memory = {ratio:.1%} of naive; sdpa {speed:.2f}× faster")
    if args.record:
        cmd = command_line()
        for dtype_name in args.dtypes:
            n, s = mems[dtype_name, top, "naive"], mems[dtype_name, top, "sdpa"]
            record(
                f"attention fwd+bwd {dtype_name} T={top}: sdpa peak live memory vs naive",
                f"{s / n:.1%} ({s / 2**20:.0f} vs {n / 2**20:.0f} MiB); sdpa "
                f"{times[dtype_name, top, 'naive'] / times[dtype_name, top, 'sdpa']:.2f}× faster",
                cmd,
            )
            for name in ("sliding_window", "block_sparse", "linear", "naive"):
                t = [times[dtype_name, T, name] for T in lengths]
                m = [mems[dtype_name, T, name] for T in lengths]
                record(
                    f"attention {name} {dtype_name}: growth per doubling of T ({lengths[0]}→{top})",
                    "time "
                    + "/".join(f"{b / a:.2f}" for a, b in zip(t, t[1:]))
                    + "; memory "
                    + "/".join(f"{b / a:.2f}" for a, b in zip(m, m[1:])),
                    cmd,
                )


def keys_per_query(name: str, T: int) -> float:
    """Keys a query attends to on average (the work per query), from the kernel's own mask formula."""
    if name == "sliding_window":
        return min(WINDOW, T)
    if name == "block_sparse":
        b = block_for(T)
        return 2 * b + math.ceil(T / b)  # gathered per query block: two local blocks + one summary per block
    return float("nan")


def run_long(args) -> None:
    lengths = args.lengths or [4096, 8192, 16384, 32768]
    times, mems = {}, {}
    for T in lengths:
        for name, (t, m) in measure(SUBQUADRATIC, "sliding_window", T, "fp32", args).items():
            times[T, name], mems[T, name] = t, m
    # Growth across separate runs carries the machine's drift; the time ratio to sliding_window (an O(T·W)
    # kernel, W fixed) inside one interleaved run does not. Theory per doubling: block_sparse √2, linear 1.
    table = Table(
        ["kernel", "keys/query", "time ×/doubling", "mem ×/doubling", "÷ sliding ×/doubling", "geo. mean"],
        title="fp32, long sequences: growth per doubling of T (O(T): 2, O(T·√T): 2.83, O(T²): 4)",
    )
    rows = {}
    for name in SUBQUADRATIC:
        t = [times[T, name] for T in lengths]
        m = [mems[T, name] for T in lengths]
        rel = [times[T, name] / times[T, "sliding_window"] for T in lengths]
        keys = "/".join(f"{keys_per_query(name, T):.0f}" for T in lengths) if name != "linear" else "d×d"
        per_doubling = 1 / (len(t) - 1)
        rows[name] = (
            "/".join(f"{b / a:.2f}" for a, b in zip(t, t[1:])),
            "/".join(f"{b / a:.2f}" for a, b in zip(m, m[1:])),
            "/".join(f"{b / a:.2f}" for a, b in zip(rel, rel[1:])),
            f"time {(t[-1] / t[0]) ** per_doubling:.2f}, ÷ sliding {(rel[-1] / rel[0]) ** per_doubling:.2f}",
        )
        table.add(name, keys, *rows[name])
    table.print()
    if args.record:
        for name in SUBQUADRATIC:
            record(
                f"attention {name} fp32: growth per doubling of T ({lengths[0]}→{lengths[-1]})",
                f"time {rows[name][0]}; memory {rows[name][1]}; time ÷ sliding_window {rows[name][2]} "
                f"(geometric mean per doubling: {rows[name][3]})",
                command_line(),
            )


if __name__ == "__main__":
    main()
