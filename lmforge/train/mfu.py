"""Model FLOPs utilisation: achieved training FLOP/s ÷ the peak FLOP/s of the hardware.

The achieved side is tokens/s × `ModelConfig.flops_per_token(T)` (6N + 12·L·H·Q·T, PaLM App. B). The peak
side is either a datasheet figure (`NOMINAL_PEAKS`, NVIDIA GPUs, dense — no 2:4 sparsity) or a measured one
(`measure_matmul_peak`: the best FLOP/s of large square matmuls). A CPU has no useful datasheet figure —
the same "AMD EPYC" name covers AVX2-only parts, where a bf16 matmul runs two orders of magnitude slower than
fp32, and AVX-512-bf16 parts, where it runs ~2× faster — so on a CPU the peak is always measured. Measured
peaks are cached in `~/.cache/lmforge/peak.json` (keyed by device, ISA, torch version, threads, dtype and
size), so a script measures once per machine.

    from lmforge.train.mfu import device_peak, mfu
    peak, source = device_peak("cpu", torch.float32)
    print(f"MFU {mfu(tokens_per_s, cfg.flops_per_token(256), peak):.1%} of {source}")

Imports only torch and the standard library: the offline GPU script (`benchmarks/gpu_train.py`) uses it.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = [
    "NOMINAL_PEAKS",
    "OTHER_PEAKS",
    "PeakMeasurement",
    "cpu_bf16_ratio",
    "cpu_supports_fast_bf16",
    "default_cache_path",
    "device_peak",
    "dtype_name",
    "matmul_peak",
    "measure_matmul_peak",
    "mfu",
    "nominal_peak",
]

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
        # used for it. Measure (`measure_matmul_peak`) when the figure matters.
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

_DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    "float32": "fp32",
    "fp32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "fp16": "fp16",
    "half": "fp16",
    "tf32": "tf32",
}
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}


def dtype_name(dtype: torch.dtype | str) -> str:
    """'fp32', 'bf16', 'fp16' or 'tf32' for a torch dtype or any of its usual spellings."""
    key = dtype.lower() if isinstance(dtype, str) else dtype
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 (or fp32/bf16/fp16/tf32)")
    return _DTYPE_NAMES[key]


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: tokens_per_s × flops_per_token ÷ peak (a fraction, 0.4 = 40%)."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_s * flops_per_token / peak


def nominal_peak(device_name: str, dtype: torch.dtype | str) -> tuple[float, str] | None:
    """(FLOP/s, source) from `NOMINAL_PEAKS` for a CUDA device name, or None when no entry matches."""
    kind = dtype_name(dtype)
    for label, entry in NOMINAL_PEAKS.items():
        if re.search(entry["match"], device_name, re.IGNORECASE):
            tflops = entry[kind]
            return tflops * 1e12, f"nominal {label} dense {kind} {tflops:g} TFLOP/s ({entry['source']})"
    return None


# ---- measuring --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeakMeasurement:
    """A measured matmul peak: `flops` FLOP/s, fastest of `repeats` timings of `inner` n×n×n matmuls each.
    `n` may be smaller than asked when the dtype is so slow that the asked size would not fit the time
    budget (`requested_n` is what was asked)."""

    flops: float
    dtype: str
    device: str
    n: int
    requested_n: int
    repeats: int
    inner: int
    date: str
    key: str = ""
    cached: bool = False

    def describe(self) -> str:
        size = f"{self.n}²"
        if self.n != self.requested_n:
            size += f", reduced from {self.requested_n}² to fit the time budget"
        cached = f", cached {self.date[:10]}" if self.cached else ""
        return (
            f"measured {self.dtype} matmul peak {self.flops / 1e9:,.1f} GFLOP/s on {self.device} "
            f"({size}, best of {self.repeats}{cached})"
        )


def default_cache_path() -> Path:
    """$LMFORGE_CACHE_DIR/peak.json, else $XDG_CACHE_HOME/lmforge/peak.json, else
    ~/.cache/lmforge/peak.json."""
    root = os.environ.get("LMFORGE_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "peak.json"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "lmforge" / "peak.json"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_isa() -> str:
    """The widest vector ISA the CPU reports: one "AMD EPYC" name covers AVX2-only and AVX-512/bf16 parts,
    and bf16 matmul speed differs by orders of magnitude between them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return platform.machine()
    for flag, name in (("amx_bf16", "AMX-bf16"), ("avx512_bf16", "AVX-512 bf16"), ("avx512f", "AVX-512"),
                       ("avx2", "AVX2")):  # fmt: skip
        if flag in flags:
            return name
    return platform.machine()


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({cpu_isa()})"


def _cache_key(device: torch.device, kind: str, n: int) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    desc = _device_description(device)
    return f"{desc} | torch {torch.__version__} | threads {threads} | {kind} | n {n}"


def _load_cache(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(path: Path, key: str, record: dict) -> None:
    """Merge one entry into the cache file, atomically (temp file + rename), so concurrent writers cannot
    leave half a JSON file behind; a lost update only costs a re-measurement."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_cache(path)
        data[key] = record
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".peak.", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home is no reason to fail a measurement


def _sync(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class _Matmul:
    """n×n @ n×n on fixed operands; `time(inner)` is the wall time of `inner` products into one output
    (touched once first, so page faults of a fresh output are not timed)."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, sync) -> None:
        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.b = torch.randn(n, n, device=device, dtype=dtype)
        self.out = torch.zeros(n, n, device=device, dtype=dtype)
        self.n, self.sync = n, sync

    def time(self, inner: int = 1) -> float:
        self.sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(self.a, self.b, out=self.out)
        self.sync()
        return time.perf_counter() - t0


def _fit(rate: float, repeats: int, max_seconds: float, n: int) -> int:
    """The largest size (a multiple of 64 when it can be, at most n) whose warm-up + repeats take about
    `max_seconds` at `rate` FLOP/s."""
    fit = int((max_seconds * rate / (2 * (repeats + 1))) ** (1 / 3))
    return n if fit >= n else max(min(n, 64), fit // 64 * 64 or fit)


def _measure(kind: str, device: torch.device, n: int, repeats: int, max_seconds: float) -> PeakMeasurement:
    dtype, sync = _TORCH_DTYPES[kind], _sync(device)
    # Probe at a small size first: an AVX2 CPU does a 2048² bf16 matmul in about a minute, so the asked
    # size is shrunk until warm-up + repeats fit in `max_seconds` rather than hanging the caller. The best
    # of several probes (the first calls pay thread start-up and clock ramp), so a fast dtype is not shrunk
    # for nothing.
    probe = _Matmul(min(n, 256), dtype, device, sync)
    probe.time()
    t0, best, count = time.perf_counter(), float("inf"), 0
    while count < 3 or (count < 50 and time.perf_counter() - t0 < 0.2):
        best, count = min(best, probe.time()), count + 1
    size = _fit(2 * probe.n**3 / max(best, 1e-9), repeats, max_seconds, n)
    # Warm-up at the chosen size, then refit from its rate: small matmuls run slower (and far slower with
    # a busy core, when one of torch's threads waits for a time slice at every barrier), so the probe can
    # err both ways.
    for _ in range(4):
        mm = _Matmul(size, dtype, device, sync)
        one = mm.time()
        fit = _fit(2 * size**3 / max(one, 1e-9), repeats, max_seconds, n)
        if one * (repeats + 1) > max_seconds and size > 64:
            size = max(64, min(size - 64, fit * 7 // 8 // 64 * 64))
        elif fit > size:
            size = fit
        else:
            break
    if mm.n != size:
        mm = _Matmul(size, dtype, device, sync)
        one = mm.time()
    # Each timed repeat lasts >= ~20 ms so a GPU's launch overhead and timer resolution do not count.
    inner = max(1, min(1000, math.ceil(0.02 / max(one, 1e-9))))
    if one * inner * repeats > max_seconds:
        inner = 1
    times = [mm.time(inner) for _ in range(repeats)]
    # The fastest repeat: on a shared machine load only ever slows a matmul down, so the best time is the
    # closest to what the hardware can do (a median under load gave MFU above 100% later, when quiet).
    flops = 2 * mm.n**3 * inner / min(times)
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return PeakMeasurement(flops, kind, _device_description(device), mm.n, n, repeats, inner, date)


_MEMO: dict[tuple[Path, str], PeakMeasurement] = {}


def matmul_peak(
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    n: int = 2048,
    repeats: int = 5,
    *,
    refresh: bool = False,
    cache_path: str | os.PathLike[str] | None = None,
    max_seconds: float = 20.0,
) -> PeakMeasurement:
    """Measure (or read from the cache) the FLOP/s of n×n @ n×n matmuls in `dtype` on `device`: the fastest
    of `repeats` timings, after a warm-up. `refresh=True` re-measures; the cache keeps the best ever seen.
    `cache_path=None` uses `default_cache_path()`. Whatever the dtype, warm-up and repeats take about
    `max_seconds` at most: a dtype the hardware emulates slowly is measured at a smaller n (then stated in
    `n` and `describe()`)."""
    if n < 1 or repeats < 1:
        raise ValueError(f"need n >= 1 and repeats >= 1, got {n=} {repeats=}")
    kind = dtype_name(dtype)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    key = _cache_key(device, kind, n)
    if not refresh:
        if (path, key) in _MEMO:  # a training loop asks at every log line: read the file once
            return _MEMO[path, key]
        hit = _load_cache(path).get(key)
        if isinstance(hit, dict):
            try:
                _MEMO[path, key] = PeakMeasurement(**{**hit, "key": key, "cached": True})
                return _MEMO[path, key]
            except TypeError:
                pass  # an entry from an older layout: measure again
    if kind == "tf32" and device.type == "cuda":
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            result = _measure(kind, device, n, repeats, max_seconds)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    else:
        result = _measure(kind, device, n, repeats, max_seconds)
    record = asdict(result)
    record.pop("key"), record.pop("cached")
    previous = _load_cache(path).get(key)
    if isinstance(previous, dict) and previous.get("flops", 0) > record["flops"]:
        record.update(flops=previous["flops"], date=previous["date"])  # a peak is the best ever measured
    _store(path, key, record)
    _MEMO[path, key] = PeakMeasurement(**{**record, "key": key, "cached": True})
    return PeakMeasurement(**{**record, "key": key, "cached": False})


def measure_matmul_peak(
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    n: int = 2048,
    repeats: int = 5,
    *,
    refresh: bool = False,
    cache_path: str | os.PathLike[str] | None = None,
    max_seconds: float = 20.0,
) -> float:
    """FLOP/s of square n×n matmuls (best of `repeats`), measured once and cached; see `matmul_peak`."""
    return matmul_peak(dtype, device, n, repeats, refresh=refresh, cache_path=cache_path, max_seconds=max_seconds).flops


def device_peak(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    *,
    n: int | None = None,
    cache_path: str | os.PathLike[str] | None = None,
) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for MFU. CUDA: the datasheet figure of the first
    `NOMINAL_PEAKS` entry matching the device name (fp32 means TF32 when torch's fp32 matmul precision is
    not "highest"), else a measured 8192² matmul peak. CPU (and anything else): measured, 2048²."""
    device = torch.device(device)
    kind = dtype_name(dtype)
    if device.type == "cuda":
        if kind == "fp32" and torch.get_float32_matmul_precision() != "highest":
            kind = "tf32"  # what torch.mm really runs on tensor cores then
        found = nominal_peak(torch.cuda.get_device_name(device), kind)
        if found is not None:
            return found
        m = matmul_peak(kind, device, n or 8192, cache_path=cache_path)
        return m.flops, m.describe() + " (no datasheet entry for this GPU)"
    m = matmul_peak(kind, device, n or 2048, cache_path=cache_path)
    return m.flops, m.describe()


def cpu_bf16_ratio(n: int = 512, *, refresh: bool = False, cache_path: str | os.PathLike[str] | None = None) -> float:
    """Measured bf16 ÷ fp32 matmul FLOP/s on this CPU at n×n (cached): ~2 with AVX-512-bf16/AMX, ~0.01 on
    an AVX2-only part, where bf16 is emulated."""
    kw = dict(refresh=refresh, cache_path=cache_path, max_seconds=5.0)
    bf16 = measure_matmul_peak(torch.bfloat16, "cpu", n, **kw)
    fp32 = measure_matmul_peak(torch.float32, "cpu", n, **kw)
    return bf16 / fp32


def cpu_supports_fast_bf16(
    threshold: float = 0.25,
    n: int = 512,
    *,
    refresh: bool = False,
    cache_path: str | os.PathLike[str] | None = None,
) -> bool:
    """Whether bf16 matmuls on this CPU reach at least `threshold` × the fp32 rate (measured, cached).
    Below 1/4 of fp32, bf16 autocast training is not worth running (and would take hours to benchmark)."""
    return cpu_bf16_ratio(n, refresh=refresh, cache_path=cache_path) >= threshold
