"""Measured matmul peaks: the best FLOP/s of large square matmuls on this machine, for MFU where there is no
datasheet figure (any CPU; a GPU not in `lmforge.hardware.NOMINAL_PEAKS`) and for the benchmarks.

A CPU has no useful datasheet figure — the same "AMD EPYC" name covers AVX2-only parts, where a bf16 matmul
runs two orders of magnitude slower than fp32, and AVX-512-bf16 parts, where it runs ~2× faster — so on a CPU
the peak is measured. Measured peaks are cached in `~/.cache/lmforge/peak.json` (keyed by device, ISA, torch
version, threads, dtype and size), so a script measures once per machine. Measuring takes seconds: only
reporting asks for it (`lmforge.train.mfu.device_peak`, at a Trainer's first logged step) and the benchmarks,
never building a Trainer.

    from lmforge.train.peak import matmul_peak
    print(matmul_peak(torch.bfloat16, "cpu").describe())   # measured bf16 matmul peak ... GFLOP/s on ...

Imports only torch, the standard library and `lmforge.hardware`: the offline GPU script
(`benchmarks/gpu_train.py`) uses it.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmforge.hardware import cpu_isa, cpu_model, matmul_kind, torch_dtype

__all__ = [
    "PeakMeasurement",
    "cpu_bf16_ratio",
    "cpu_supports_fast_bf16",
    "default_cache_path",
    "matmul_peak",
]


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
    dtype, sync = torch_dtype("fp32" if kind == "tf32" else kind), _sync(device)  # tf32: fp32 on tensor cores
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
    kind = matmul_kind(dtype)
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


def cpu_bf16_ratio(n: int = 512, *, refresh: bool = False, cache_path: str | os.PathLike[str] | None = None) -> float:
    """Measured bf16 ÷ fp32 matmul FLOP/s on this CPU at n×n (cached): ~2 with AVX-512-bf16/AMX, ~0.01 on
    an AVX2-only part, where bf16 is emulated."""
    kw = dict(refresh=refresh, cache_path=cache_path, max_seconds=5.0)
    return matmul_peak(torch.bfloat16, "cpu", n, **kw).flops / matmul_peak(torch.float32, "cpu", n, **kw).flops


def cpu_supports_fast_bf16(
    threshold: float = 0.25,
    n: int = 512,
    *,
    refresh: bool = False,
    cache_path: str | os.PathLike[str] | None = None,
) -> bool:
    """Whether bf16 matmuls on this CPU reach at least `threshold` × the fp32 rate (measured, cached): what the
    benchmarks check before timing bf16, which takes hours where it is emulated. A Trainer's precision=auto
    asks `lmforge.hardware.cpu_has_native_bf16` instead, which measures nothing."""
    return cpu_bf16_ratio(n, refresh=refresh, cache_path=cache_path) >= threshold
