"""Memory measurements for benchmarks: live tensor bytes (torch's `MemTracker`) and peak RSS growth of a
function run in a fresh subprocess. Every result names the method that produced it.

    from benchmarks.memory import peak_live_memory, peak_rss_growth
    print(peak_live_memory(lambda: model(idx).sum().backward(), track=(model,)))
    print(peak_rss_growth("benchmarks.attention:one_step", args=("sdpa", 4096)))  # needs a __main__ guard
"""

from __future__ import annotations

import gc
import importlib
import multiprocessing
import resource
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .formatting import fmt_bytes


@dataclass(frozen=True)
class MemoryResult:
    """A memory figure in bytes, with the method that produced it and method-specific detail."""

    bytes: int
    method: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def mib(self) -> float:
        return self.bytes / 2**20

    def __str__(self) -> str:
        return f"{fmt_bytes(self.bytes)} ({self.method})"


def peak_live_memory(
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    track: Iterable[Any] = (),
) -> MemoryResult:
    """Peak bytes of live tensor storage while `fn(*args, **kwargs)` runs, measured with
    `torch.distributed._tools.mem_tracker.MemTracker` (a TorchDispatchMode: every op output's storage is
    counted once, until a weakref finalizer sees it freed).

    On CPU (torch 2.13) it sees plain tensors made inside `fn` with no module involved; such tensors fall in
    its "Activation" category. Modules, optimizers and tensors made *before* the call are invisible unless
    passed in `track` (they then count from the start: `detail["at_start"]`). It does not see allocator
    caching, fragmentation or scratch buffers inside kernels — that is what RSS is for
    (`peak_rss_growth`). `bytes` sums the per-device peaks; `detail` holds each device's breakdown at its
    peak (Parameter, Gradient, Activation, Temp, Optstate, ...).
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    gc.collect()
    mt = MemTracker()
    track = list(track)
    if track:
        mt.track_external(*track)
    at_start = sum(snap["Total"] for snap in mt.get_tracker_snapshot("current").values())
    with mt:
        fn(*args, **(kwargs or {}))
    peak = mt.get_tracker_snapshot("peak")
    detail: dict[str, Any] = {"at_start": at_start}
    for device, snap in peak.items():
        detail[str(device)] = {getattr(k, "value", k): v for k, v in snap.items()}
    total = sum(snap["Total"] for snap in peak.values())
    return MemoryResult(int(total), "live tensors (MemTracker)", detail)


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _resolve(spec: str) -> Callable[..., Any]:
    module, _, qualname = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _rss_child(conn: Any, fn: Any, args: Sequence[Any], kwargs: dict[str, Any], preimport: Sequence[str]):
    try:
        for name in preimport:
            importlib.import_module(name)
        if isinstance(fn, str):
            fn = _resolve(fn)
        gc.collect()
        detail: dict[str, Any] = {}
        before_kib = _proc_status_kib("VmRSS")
        if before_kib is not None:
            # Linux >= 4.0: writing 5 resets the high-water mark to the current RSS, so imports and
            # start-up that peaked earlier do not count (proc(5), /proc/pid/clear_refs).
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                method = "peak RSS growth in a subprocess (VmHWM, reset at start, - VmRSS at start)"
            except OSError:
                method = "peak RSS growth in a subprocess (VmHWM - VmRSS at start; HWM not reset)"
            fn(*args, **kwargs)
            peak_kib = _proc_status_kib("VmHWM") or 0
            before, peak = before_kib * 1024, peak_kib * 1024
        else:
            # No /proc: ru_maxrss is KiB on Linux, bytes on macOS; a peak before the call may hide growth.
            scale = 1 if sys.platform == "darwin" else 1024
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            fn(*args, **kwargs)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            method = "peak RSS growth in a subprocess (ru_maxrss after - before: may undercount)"
        detail.update(rss_before=before, rss_peak=peak)
        conn.send(("ok", (peak - before, method, detail)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def peak_rss_growth(
    fn: Callable[..., Any] | str,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    preimport: Sequence[str] = ("torch",),
    timeout: float = 600.0,
) -> MemoryResult:
    """Peak resident set size of a fresh process during `fn(*args, **kwargs)`, minus its RSS just before.

    `fn` runs in a new `spawn`ed process, so it must be picklable: a top-level function, or a
    `"package.module:function"` string (a script calling this needs the `if __name__ == "__main__":` guard,
    as the child re-imports it). `preimport` modules are imported before the baseline is read
    (torch alone is ~hundreds of MiB). RSS counts what the process really holds — allocator caches,
    fragmentation, kernel scratch, Python objects — so it is coarser than `peak_live_memory`.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_rss_child, args=(child, fn, tuple(args), dict(kwargs or {}), tuple(preimport)))
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"peak_rss_growth: no answer from the child within {timeout} s")
        status, payload = parent.recv()
    except EOFError as e:
        raise RuntimeError(f"peak_rss_growth: child died (exit code {proc.exitcode})") from e
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        raise RuntimeError(f"peak_rss_growth: the function raised in the child:\n{payload}")
    growth, method, detail = payload
    return MemoryResult(int(growth), method, detail)
