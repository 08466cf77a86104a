"""Facts about the machine, in one place: bytes per dtype (and the torch dtype of each name), lmforge's weight
quantization schemes and their bytes per weight, accelerator datasheet peaks, and what the CPU can do.

    from lmforge import hardware
    hardware.dtype_bytes("bfloat16")                # 2 (any spelling: bf16, bfloat16; fp32, float32, float; ...)
    hardware.torch_dtype("fp16")                    # torch.float16 (torch is imported only here)
    hardware.quant_bytes_per_weight("int4", 64)     # 0.578: half a byte + an fp32 scale and a uint8 zero per group
    hardware.nominal_peak("NVIDIA H100 80GB HBM3", "bf16")   # (989e12, "nominal H100 SXM dense bf16 ...")
    hardware.cpu_isa(), hardware.cpu_has_native_bf16()      # "AVX-512 bf16", True

Tables and flags only, nothing is measured here: a measured matmul peak is `lmforge.train.peak`. Imports only the
standard library (torch lazily, in `torch_dtype`), so the CLI's argument tables can use it without loading torch,
and every stage may import it (it sits at the bottom of the layout, beside `config`).
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COMPUTE_DTYPES",
    "DTYPES",
    "DTYPE_BYTES",
    "NOMINAL_PEAKS",
    "OTHER_PEAKS",
    "QUANT_SCHEMES",
    "DType",
    "cpu_flags",
    "cpu_has_native_bf16",
    "cpu_isa",
    "cpu_model",
    "dtype_bytes",
    "dtype_name",
    "matmul_kind",
    "nominal_peak",
    "quant_bytes_per_weight",
    "torch_dtype",
    "torch_dtypes",
]

# ---- dtypes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DType:
    """One element type: its short `name`, `bytes` per element, the `torch` attribute that is its dtype, the
    other spellings accepted for it, and whether matmuls compute in it (training precision, serving dtype) or
    it is a storage format only (fp8 and int8 K/V or weights, scaled)."""

    name: str
    bytes: int
    torch: str
    aliases: tuple[str, ...] = ()
    compute: bool = True


# Short names first, as lmforge's options spell them; the aliases are torch's own names for the same dtype
# (torch.float is torch.float32, torch.half is torch.float16). fp8 is e4m3, the format fp8 KV caches use
# (vLLM's default); "fp8" alone is what a planner means by 1-byte floats.
DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("fp32", 4, "float32", ("float32", "float")),
        DType("bf16", 2, "bfloat16", ("bfloat16",)),
        DType("fp16", 2, "float16", ("float16", "half")),
        DType("fp8", 1, "float8_e4m3fn", compute=False),
        DType("int8", 1, "int8", compute=False),
    )
}
_SPELLINGS: dict[str, str] = {spelling: d.name for d in DTYPES.values() for spelling in (d.name, *d.aliases)}
_TORCH_NAMES: dict[str, str] = {d.torch: d.name for d in DTYPES.values()}  # str(torch.float8_e4m3fn), ...
DTYPE_BYTES: dict[str, int] = {spelling: DTYPES[name].bytes for spelling, name in _SPELLINGS.items()}
COMPUTE_DTYPES: tuple[str, ...] = tuple(d.name for d in DTYPES.values() if d.compute)  # fp32, bf16, fp16


def dtype_name(dtype: Any) -> str:
    """The short name ('fp32', 'bf16', 'fp16', 'fp8', 'int8') of a torch dtype or any spelling of one."""
    key = str(dtype).lower().removeprefix("torch.")  # str(torch.bfloat16) is "torch.bfloat16"
    name = _SPELLINGS.get(key) or _TORCH_NAMES.get(key)
    if name is None:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(_SPELLINGS)}")
    return name


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a torch dtype or any spelling of one."""
    return DTYPES[dtype_name(dtype)].bytes


def torch_dtype(dtype: Any):
    """The torch dtype of a name ('bf16', 'bfloat16', ...); a torch dtype is returned as it is."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, DTYPES[dtype_name(dtype)].torch)


def torch_dtypes(*names: str) -> dict[str, Any]:
    """Every spelling of the dtypes `names` (short names; none: all) → its torch dtype, e.g. a table of the dtypes
    a KV cache may store: torch_dtypes("fp32", "bf16", "fp16", "int8")."""
    chosen = {dtype_name(n) for n in names} if names else set(DTYPES)
    return {spelling: torch_dtype(name) for spelling, name in _SPELLINGS.items() if name in chosen}


# ---- weight quantization schemes ---------------------------------------------------------------------------

# lmforge.infer.quantize has one module class per name (its SCHEMES is keyed by this tuple); the CLI's
# --quantize choices and the planner's estimates read it from here.
QUANT_SCHEMES: tuple[str, ...] = ("int8", "w8a8", "int4", "bf16")


def quant_bytes_per_weight(scheme: str, group_size: int = 64) -> float:
    """Bytes per weight as lmforge.infer.quantize stores them, scales included where they count: int8 and w8a8
    one byte (their fp32 scale per output channel is negligible), int4 half a byte + an fp32 scale and a uint8
    zero point per group of `group_size` inputs, bf16 two bytes. The exact bytes of one layer (padding to
    whole groups, per-row scales, biases) are `lmforge.scaling.estimate.quantized_linear_bytes`."""
    if scheme in ("int8", "w8a8"):
        return 1.0
    if scheme == "int4":
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        return 0.5 + (4 + 1) / group_size
    if scheme == "bf16":
        return 2.0
    raise ValueError(f"unknown quantization scheme {scheme!r}: use one of {', '.join(QUANT_SCHEMES)}")


# ---- accelerators: datasheet peaks -------------------------------------------------------------------------

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets; bf16/fp16 with fp32 accumulation, fp32 on
# the CUDA cores (PyTorch's default for fp32 matmul; "tf32" is the tensor-core figure it uses when
# `torch.set_float32_matmul_precision("high")`). Datasheets print the sparse figure for tensor formats: the
# dense one is half. `match` is searched (case-insensitive) in `torch.cuda.get_device_name()`, in table
# order, so the specific variants come before the generic name ("H100 PCIe" before "H100", "A100" before
# "A10"). `memory_gib` is the datasheet's memory ("80GB"): for these parts a binary figure, as the driver
# shows it (an "80GB" A100 reports 81,920 MiB); torch sees a little less, after the driver's reserve.
NOMINAL_PEAKS: dict[str, dict] = {
    "H100 PCIe": {
        "match": r"H100.*PCIe",
        "bf16": 756.0,
        "fp16": 756.0,
        "tf32": 378.0,
        "fp32": 51.0,
        "memory_gib": 80,
        "source": "NVIDIA H100 Tensor Core GPU datasheet (PCIe): 1,513 sparse bf16 TFLOPS",
    },
    "H100 NVL": {
        "match": r"H100.*NVL",
        "bf16": 835.0,
        "fp16": 835.0,
        "tf32": 417.5,
        "fp32": 60.0,
        "memory_gib": 94,
        "source": "NVIDIA H100 Tensor Core GPU datasheet (NVL): 1,671 sparse bf16 TFLOPS",
    },
    "H100 SXM": {
        "match": r"H100",  # "NVIDIA H100 80GB HBM3" is the SXM part
        "bf16": 989.0,
        "fp16": 989.0,
        "tf32": 494.5,
        "fp32": 67.0,
        "memory_gib": 80,
        "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM): 1,979 sparse bf16 TFLOPS",
    },
    "H200 NVL": {
        "match": r"H200.*NVL",
        "bf16": 835.0,
        "fp16": 835.0,
        "tf32": 417.5,
        "fp32": 60.0,
        "memory_gib": 141,
        "source": "NVIDIA H200 Tensor Core GPU datasheet (NVL): 1,671 sparse bf16 TFLOPS",
    },
    "H200": {
        "match": r"H200",
        "bf16": 989.0,
        "fp16": 989.0,
        "tf32": 494.5,
        "fp32": 67.0,
        "memory_gib": 141,
        "source": "NVIDIA H200 Tensor Core GPU datasheet (SXM): 1,979 sparse bf16 TFLOPS",
    },
    "A100 40GB": {
        "match": r"A100.*40\s*GB",
        "bf16": 312.0,
        "fp16": 312.0,
        "tf32": 156.0,
        "fp32": 19.5,
        "memory_gib": 40,
        "source": "NVIDIA A100 Tensor Core GPU datasheet (40GB): 312 dense bf16 TFLOPS, 19.5 fp32",
    },
    "A100": {
        "match": r"A100",
        "bf16": 312.0,
        "fp16": 312.0,
        "tf32": 156.0,
        "fp32": 19.5,
        "memory_gib": 80,
        "source": "NVIDIA A100 Tensor Core GPU datasheet: 312 dense bf16 TFLOPS, 19.5 fp32",
    },
    "L40S": {
        "match": r"\bL40S\b",
        "bf16": 362.05,
        "fp16": 362.05,
        "tf32": 183.0,
        "fp32": 91.6,
        "memory_gib": 48,
        "source": "NVIDIA L40S datasheet: 733 sparse bf16 TFLOPS, 91.6 fp32",
    },
    "L4": {
        "match": r"\bL4\b",
        "bf16": 121.0,
        "fp16": 121.0,
        "tf32": 60.0,
        "fp32": 30.3,
        "memory_gib": 24,
        "source": "NVIDIA L4 Tensor Core GPU datasheet: 242 sparse bf16 TFLOPS, 30.3 fp32",
    },
    "A10G": {
        # No NVIDIA datasheet of its own (an AWS part); these are the A10 datasheet's figures, as commonly
        # used for it. Measure (`lmforge.train.peak.matmul_peak`) when the figure matters.
        "match": r"\bA10G\b",
        "bf16": 125.0,
        "fp16": 125.0,
        "tf32": 62.5,
        "fp32": 31.2,
        "memory_gib": 24,
        "source": "NVIDIA A10 datasheet figures (A10G has none of its own): 250 sparse bf16 TFLOPS",
    },
    "A10": {
        "match": r"\bA10\b",
        "bf16": 125.0,
        "fp16": 125.0,
        "tf32": 62.5,
        "fp32": 31.2,
        "memory_gib": 24,
        "source": "NVIDIA A10 Tensor Core GPU datasheet: 250 sparse bf16 TFLOPS, 31.2 fp32",
    },
    "RTX 4090": {
        "match": r"RTX 4090",
        "bf16": 165.2,
        "fp16": 165.2,
        "tf32": 82.6,
        "fp32": 82.6,
        "memory_gib": 24,
        "source": "NVIDIA Ada (AD102) architecture whitepaper, RTX 4090: 165.2 dense bf16 TFLOPS (fp32 acc.)",
    },
}

# Accelerators that are never a CUDA device, for planning only (`lmforge.scaling.estimate`; `nominal_peak`
# matches CUDA device names against NOMINAL_PEAKS alone). Only the figures the datasheet gives: TPU v4's
# matrix units multiply bf16 (and int8), so there is no fp16/tf32/fp32 entry.
OTHER_PEAKS: dict[str, dict] = {
    "TPU v4": {
        "bf16": 275.0,
        "memory_gib": 32,
        "source": "Google Cloud TPU v4 documentation: 275 peak bf16 TFLOPS, 32 GiB HBM2 per chip",
    },
}

MATMUL_KINDS = ("fp32", "bf16", "fp16", "tf32")  # what a peak is quoted for: the compute dtypes, and fp32 as tf32


def matmul_kind(dtype: Any) -> str:
    """'fp32', 'bf16', 'fp16' or 'tf32' (fp32 inputs on tensor cores) for a torch dtype or any spelling of one:
    the dtypes a peak FLOP/s figure is quoted for."""
    if str(dtype).lower() == "tf32":
        return "tf32"
    try:
        kind = dtype_name(dtype)
    except ValueError:
        kind = None
    if kind not in MATMUL_KINDS:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 (or fp32/bf16/fp16/tf32)")
    return kind


def nominal_peak(device_name: str, dtype: Any) -> tuple[float, str] | None:
    """(FLOP/s, source) from `NOMINAL_PEAKS` for a CUDA device name, or None when no entry matches."""
    kind = matmul_kind(dtype)
    for label, entry in NOMINAL_PEAKS.items():
        if re.search(entry["match"], device_name, re.IGNORECASE):
            tflops = entry[kind]
            return tflops * 1e12, f"nominal {label} dense {kind} {tflops:g} TFLOP/s ({entry['source']})"
    return None


# ---- the CPU -----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 9654"), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> frozenset[str]:
    """The feature flags the (x86) CPU reports in /proc/cpuinfo; empty where there is no such file or line."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_isa() -> str:
    """The widest vector ISA the CPU reports: one "AMD EPYC" name covers AVX2-only and AVX-512/bf16 parts,
    and bf16 matmul speed differs by orders of magnitude between them."""
    flags = cpu_flags()
    for flag, name in (("amx_bf16", "AMX-bf16"), ("avx512_bf16", "AVX-512 bf16"), ("avx512f", "AVX-512"),
                       ("avx2", "AVX2")):  # fmt: skip
        if flag in flags:
            return name
    return platform.machine()


def cpu_has_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX-512-bf16 dot products or AMX tiles): there a bf16
    matmul runs ~2-4× the fp32 rate; elsewhere (AVX2, AVX-512 without bf16) it is emulated, ~100× slower on
    AVX2-only parts, so bf16 autocast is not worth it."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
