"""Hand-written CPU kernels for what torch does slowly at batch 1: the one-row matrix-vector product of a decode
step, with fp32, bf16 or int8 weights (`gemv.c`, ~60 lines of AVX2). torch multiplies a 1-row input by a weight
matrix at ~16-20 GB/s on the 2-core AVX2 machine lmforge is developed on; these loops stream the same weights at
~25-32 GB/s, and read bf16 or int8 weights without converting the matrix first (`benchmarks/decode.py`).

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

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
_FUNCTIONS = {torch.float32: "gemv_f32", torch.bfloat16: "gemv_bf16", torch.int8: "gemv_i8"}
WEIGHT_DTYPES = tuple(_FUNCTIONS)


def cache_dir() -> Path:
    if root := os.environ.get("LMFORGE_CACHE"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"


def _build(compiler: str) -> Path:
    """Compile gemv.c once per (source, compiler, flags); the file name carries their hash, so an edited source
    builds anew. Written to a temp file and renamed: a concurrent build never leaves a half-written library."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"gemv-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
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
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 2
        fn.restype = None
    return lib


def available() -> bool:
    """Whether the kernels are built and loaded on this machine (building them on the first call)."""
    return _library() is not None


def gemv(weight: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None = None,
         bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """y = (weight · x) · scale + bias as fp32 [out], from weight [out, in] (fp32, bf16 or int8), x [in] or [1, in]
    fp32, and optional fp32 scale [out] (per output row) and bias [out], all contiguous CPU tensors. No autograd:
    for inference. Raises RuntimeError when `available()` is False.

    Checked with a handful of attribute reads: a decode step calls this ~70 times, and each µs here is ~1% of a
    small model's step."""
    lib = _library()
    if lib is None:
        raise RuntimeError("lmforge's decode kernels are not available here: check kernels.available() first")
    out, inp = weight.shape
    name = _FUNCTIONS.get(weight.dtype)
    tensors = (weight, x) if scale is None and bias is None else (weight, x, scale, bias)
    if (name is None or x.numel() != inp or x.dtype != torch.float32
            or not all(t is None or (t.is_contiguous() and t.is_cpu) for t in tensors)):  # fmt: skip
        got = f"{weight.dtype} {tuple(weight.shape)} and {x.dtype} {tuple(x.shape)}"
        raise ValueError(f"gemv takes contiguous CPU tensors: weight [out, in] in {WEIGHT_DTYPES} and an fp32 x of "
                         f"{inp} values, got {got}")  # fmt: skip
    y = torch.empty(out)
    getattr(lib, name)(
        weight.data_ptr(),
        x.data_ptr(),
        None if scale is None else scale.data_ptr(),
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        out,
        inp,
    )
    return y
