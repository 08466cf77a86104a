"""Hand-written CPU kernels for the two things torch does slowly in a decode step (`decode.c`, AVX2 + OpenMP):

- `gemv`: the matrix-vector product of a decode step (one row, or up to MAX_ROWS: a speculative verification, a
  small batch), with fp32, bf16 or int8 weights. torch multiplies a 1-row input by a weight matrix at ~14-20 GB/s
  on the 2-core AVX2 machine lmforge is developed on; this streams the same weights at ~20-30 GB/s, reads them
  once for every row, and reads bf16 or int8 weights without converting the matrix first (`benchmarks/decode.py`).
- `decode_attention`: one new query per row over that row's cached keys, read in place from a contiguous cache or
  through a paged cache's block table, so the keys are not gathered into a contiguous copy for SDPA first.

The C file is compiled on first use with the system C compiler into a per-source cache file
(`$LMFORGE_CACHE`, else `~/.cache/lmforge`), then loaded with ctypes. Without an x86 CPU with AVX2 and FMA, or
without a compiler, or with `LMFORGE_KERNELS=0`, `available()` is False and callers use torch's matmul.

    from lmforge.infer import kernels
    if kernels.available():
        y = kernels.gemv(weight, x, bias=bias)       # weight [out, in] fp32 | bf16 | int8 (+ scale [out])
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCES = (Path(__file__).with_name("decode.c"), Path(__file__).with_name("layer.c"))
# Up to this many input rows the GEMV kernel reads the weights once for all of them and beats torch's GEMM (a
# decode step, a speculative verification of γ + 1 tokens, a small batch: 7 rows took half of torch's time, 16
# rows 60%, measured on GPT-2's block matrices); past it the product is compute-bound
# and torch's GEMM is the better kernel.
MAX_ROWS = 16
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-lm", f"-DMAX_ROWS={MAX_ROWS}")  # layer.c reads it
_FUNCTIONS = {torch.float32: "gemv_f32", torch.bfloat16: "gemv_bf16", torch.int8: "gemv_i8"}
WEIGHT_DTYPES = tuple(_FUNCTIONS)


def cache_dir() -> Path:
    if root := os.environ.get("LMFORGE_CACHE"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"


def _build(compiler: str) -> Path:
    """Compile the C sources once per (sources, compiler, flags); the file name carries their hash, so an edited
    source builds anew. Written to a temp file and renamed: a concurrent build never leaves a half-written library."""
    sources = b"".join(source.read_bytes() for source in SOURCES)
    key = hashlib.sha256(sources + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LMFORGE_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        warnings.warn(f"lmforge: the decode kernels did not build ({detail.strip()[:300]}); decoding falls back to "
                      f"torch's matmul. Set LMFORGE_KERNELS=0 to skip the attempt.", stacklevel=3)  # fmt: skip
        return None
    for name in _FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_long] + [ctypes.c_void_p] * 6 + [ctypes.c_long] * 2
        fn.restype = None
    lib.decode_attention.argtypes = (
        [ctypes.c_void_p] * 5 + [ctypes.c_long] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_long] * 6 + [ctypes.c_float]
    )
    lib.decode_attention.restype = None
    pointer, number = ctypes.c_void_p, ctypes.c_long  # decode_layers(n_layer, layers, x, m, k, v, slots, slot, ...)
    lib.decode_layers.argtypes = [number, pointer, pointer, number, pointer, pointer, number, number] + [pointer] * 3
    lib.decode_layers.restype = None
    return lib


def available() -> bool:
    """Whether the kernels are built and loaded on this machine (building them on the first call)."""
    return _library() is not None


def gemv_applies(x: torch.Tensor, in_features: int) -> bool:
    """Whether a product can take `gemv`: a few contiguous fp32 rows (≤ MAX_ROWS: a decode step, a speculative
    verification) on the CPU, with autograd off (the kernel has no backward), kernels built. Cheap attribute reads
    only: it runs for every layer of every decode step."""
    return (
        x.numel() <= MAX_ROWS * in_features
        and not torch.is_grad_enabled()
        and x.dtype == torch.float32
        and x.is_cpu
        and x.is_contiguous()
        and available()
    )


def gemv(weight: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None,
         bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """y = (x · weightᵀ) · scale + bias in fp32, shaped [..., out] like x [..., in], from weight [out, in] (fp32, bf16
    or int8) and optional fp32 scale [out] (per output row) and bias [out], all contiguous CPU tensors. Any number
    of rows; meant for few (≤ MAX_ROWS). No autograd: for inference. Raises RuntimeError when `available()` is
    False. A module calling this every decode step keeps a `GemvPlan` instead."""
    plan = GemvPlan([(weight, scale, bias)])
    if x.shape[-1] != plan.inp or x.dtype != torch.float32 or not (x.is_contiguous() and x.is_cpu):
        raise ValueError(f"gemv takes an fp32 contiguous CPU x [..., {plan.inp}], got {x.dtype} {tuple(x.shape)}")
    return plan(x)


class GemvPlan:
    """`gemv` with the weight side checked once, for a module that calls it at every decode step: a call is then
    one `torch.empty` and one C call. (The checks of a plain `gemv` call cost ~10-20 µs, and a GPT-2 step makes ~70
    products: ~1 ms of a ~25 ms step.) `parts` are (weight, scale, bias) triples of one weight dtype and one `in`:
    several matrices are read in one call and their outputs laid side by side, [..., Σ out] (a layer's q, k and v).

    It holds addresses, not tensors (a deep copy of a module copies no weights through it): the caller keeps the
    tensors alive and gets its plan through `current_plan` before a call, since `.to()` or `load_state_dict`
    may move them. `plan(x)` trusts that x is fp32, contiguous, on the CPU with last dim `inp`: `gemv_applies`."""

    __slots__ = ("function", "out", "inp", "pointers", "_arrays")

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]):
        if _library() is None:
            raise RuntimeError("lmforge's decode kernels are not available here: check kernels.available() first")
        for weight, scale, bias in parts:
            readable = all(t is None or (t.is_contiguous() and t.is_cpu) for t in (weight, scale, bias))
            fp32_sides = all(t is None or t.dtype == torch.float32 for t in (scale, bias))
            if weight.dtype not in _FUNCTIONS or weight.dim() != 2 or not (readable and fp32_sides):
                raise ValueError(f"gemv takes a contiguous CPU weight [out, in] in {WEIGHT_DTYPES} and fp32 "
                                 f"contiguous scale and bias, got {weight.dtype} {tuple(weight.shape)}")  # fmt: skip
        if len({(w.dtype, w.shape[1]) for w, _, _ in parts}) != 1:
            raise ValueError("matrices read in one gemv call need one weight dtype and one input width")
        self.function = _FUNCTIONS[parts[0][0].dtype]
        self.inp = parts[0][0].shape[1]
        self.out = sum(w.shape[0] for w, _, _ in parts)
        self.pointers = tuple(None if t is None else t.data_ptr() for part in parts for t in part)
        n = len(parts)
        self._arrays = (  # weights, scales, biases, outs: C arrays, kept alive with the plan
            (ctypes.c_void_p * n)(*self.pointers[0::3]),
            (ctypes.c_void_p * n)(*self.pointers[1::3]),
            (ctypes.c_void_p * n)(*self.pointers[2::3]),
            (ctypes.c_long * n)(*(w.shape[0] for w, _, _ in parts)),
            n,
        )

    def stale(self, parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]) -> bool:
        """Whether these parts are not the tensors planned for: new storage, a bias gone."""
        return tuple(None if t is None else t.data_ptr() for part in parts for t in part) != self.pointers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty((*x.shape[:-1], self.out))
        ws, scales, biases, outs, n = self._arrays
        getattr(_library(), self.function)(n, ws, scales, biases, outs, x.data_ptr(), y.data_ptr(), self.inp,
                                           x.numel() // self.inp)  # fmt: skip
        return y


def current_plan(plan: GemvPlan | None, parts: list[tuple]) -> GemvPlan:
    """`plan` when it was made for these parts' tensors as they are now, else a new plan for them: what a module
    keeps between decode steps."""
    return plan if plan is not None and not plan.stale(parts) else GemvPlan(parts)


MAX_HEAD_DIM = 256  # decode.c keeps a query and an accumulator in registers/stack arrays of 32 × 8 floats


def attention_applies(q: torch.Tensor, store: torch.Tensor) -> bool:
    """Whether `decode_attention` can serve these queries [B, H, 1, D] over this K/V storage: fp32, one query per
    row, head_dim a multiple of 8 up to 256, no autograd, kernels built."""
    D = q.shape[-1]
    return (
        q.shape[2] == 1
        and q.dtype == torch.float32
        and store.dtype == torch.float32
        and D % 8 == 0
        and D <= MAX_HEAD_DIM
        and q.is_cpu
        and not torch.is_grad_enabled()
        and available()
    )


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *,
                     row_offsets: torch.Tensor, token_stride: int, head_stride: int, n_kv_head: int,
                     tables: torch.Tensor | None = None, block_size: int = 1) -> torch.Tensor:  # fmt: skip
    """softmax(q·Kᵀ/√d)·V for queries q [B, H, 1, D] (one new token per row), over the first lengths[b] keys of
    each row, read in place from `k` and `v` (fp32 storage of one layer, same layout): key t of row b, KV head j
    at element row_offsets[b] + slot·token_stride + j·head_stride, slot = t, or through the block table
    tables [B, n] (slot = tables[b, t // block_size]·block_size + t % block_size). lengths, row_offsets and
    tables are int64. Returns [B, H, 1, D] fp32."""
    lib = _library()
    B, H, _, D = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    lengths, row_offsets = lengths.contiguous(), row_offsets.contiguous()
    n_cols = 0
    if tables is not None:
        tables = tables.contiguous()
        n_cols = tables.shape[1]
    lib.decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), None if tables is None else tables.data_ptr(),
        n_cols, block_size, lengths.data_ptr(), row_offsets.data_ptr(), B, H, n_kv_head, D, token_stride,
        head_stride, D**-0.5,
    )  # fmt: skip
    return out
