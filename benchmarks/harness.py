"""The shared measuring tool of every script in `benchmarks/`.

The development machine is shared and noisy (2 cores, ±10–20% drift), so a figure here is never an absolute
time on its own: it is a ratio against a baseline measured in the same run. `Bench` runs its cases
interleaved (A, B, C, A, B, C, ...) so that drift hits every case alike, times them with
`time.perf_counter`, and reports median / min / max per case and the ratio of medians to the baseline.
Memory has two helpers: `peak_live_memory` (live tensor bytes, via torch's `MemTracker`) and
`peak_rss_growth` (process peak RSS, in a fresh subprocess). `record` appends one row to
`docs/benchmarks.md`; `add_common_args` gives every script the same flags.

A benchmark script (run from the repository root as `python -m benchmarks.<name>`):

    from benchmarks.harness import Bench, add_common_args, apply_common_args, command_line, record
    parser = argparse.ArgumentParser(description=__doc__)
    args = apply_common_args(add_common_args(parser).parse_args())
    x = torch.randn(64, 4096)
    bench = Bench(repeats=args.repeats, warmup=args.warmup, title="gelu, 64x4096 fp32")
    bench.add("exact", lambda: F.gelu(x), baseline=True, work=x.numel(), unit="elem")
    bench.add("tanh", lambda: F.gelu(x, approximate="tanh"), work=x.numel(), unit="elem")
    result = bench.run()
    result.print()  # environment line + table
    if args.record:
        record("gelu tanh vs exact, 64x4096 fp32", result["tanh"].describe(), command_line())
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.hardware import cpu_isa, cpu_model

from .formatting import fmt_bytes, fmt_count, fmt_seconds
from .memory import MemoryResult, peak_live_memory, peak_rss_growth

__all__ = [
    "Bench",
    "BenchResult",
    "CaseResult",
    "MemoryResult",
    "Table",
    "add_common_args",
    "apply_common_args",
    "command_line",
    "environment",
    "fmt_bytes",
    "fmt_count",
    "fmt_seconds",
    "format_environment",
    "peak_live_memory",
    "peak_rss_growth",
    "record",
    "report_rows",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECORD_PATH = REPO_ROOT / "docs" / "benchmarks.md"
RECORD_COLUMNS = ("figure", "value", "command", "date", "machine", "versions")
RECORD_HEADER = f"""# Benchmarks

Figures measured by the scripts in `benchmarks/`. The development machine is shared and noisy, so every
figure is a **ratio against a baseline measured in the same run**, cases interleaved (A, B, A, B, ...) so
drift hits them alike; absolute times are given only for context. "time ratio" is median time ÷ baseline
median time (< 1 is faster); "speed-up" is its inverse (> 1 is faster). Memory figures name their method:
live tensor bytes (`MemTracker`) or peak RSS growth in a fresh subprocess.

Rows are appended by `benchmarks.harness.record`, one per figure, when a script runs with `--record`
(e.g. `python -m benchmarks.<name> --record`). Re-run the command in a row to check it; add a new row rather
than editing an old one. Keep this table the last thing in the file.

| {" | ".join(RECORD_COLUMNS)} |
|{"|".join("---" for _ in RECORD_COLUMNS)}|
"""


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class Case:
    """One named thing to time. `fn` does one repeat; `setup`, if given, runs before every repeat
    (untimed) and its return value is passed to `fn`. `work` units per repeat give a throughput."""

    name: str
    fn: Callable[..., Any]
    setup: Callable[[], Any] | None = None
    work: float | None = None
    unit: str | None = None


@dataclass
class CaseResult:
    name: str
    times: list[float]
    baseline: str
    ratio: float  # median time / baseline median time: < 1 is faster than the baseline
    paired_ratio: float  # median over rounds of (this time / baseline time in the same round)
    work: float | None = None
    unit: str | None = None

    @property
    def n(self) -> int:
        return len(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def speedup(self) -> float:
        """Baseline median time / this median time: > 1 is faster than the baseline."""
        return 1.0 / self.ratio if self.ratio else float("inf")

    @property
    def throughput(self) -> float | None:
        """Work units per second at the median time (e.g. tokens/s), if the case declared `work`."""
        return self.work / self.median if self.work is not None and self.median > 0 else None

    def describe(self) -> str:
        """One line fit for `record`: speed-up, time ratio, medians and repeat count."""
        if self.name == self.baseline:
            return f"baseline, median {fmt_seconds(self.median)} (n={self.n})"
        return (
            f"{self.speedup:.2f}× speed-up vs {self.baseline} (time ratio {self.ratio:.3f}; "
            f"median {fmt_seconds(self.median)}, n={self.n})"
        )


@dataclass
class BenchResult:
    cases: list[CaseResult]
    baseline: str
    title: str | None = None
    env: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> CaseResult:
        for case in self.cases:
            if case.name == name:
                return case
        raise KeyError(name)

    def table(self) -> Table:
        has_work = any(c.work is not None for c in self.cases)
        columns = ["case", "n", "median", "min", "max", "time ratio", "speed-up"]
        if has_work:
            columns.append("throughput")
        table = Table(columns, title=self.title)
        for c in self.cases:
            base = " (base)" if c.name == self.baseline else ""
            row = [c.name + base, str(c.n), fmt_seconds(c.median), fmt_seconds(c.min), fmt_seconds(c.max)]
            row += [f"{c.ratio:.3f}", f"{c.speedup:.2f}×"]
            if has_work:
                tp = c.throughput
                row.append(f"{fmt_count(tp)} {c.unit or 'units'}/s" if tp is not None else "")
            table.add(*row)
        return table

    def print(self) -> None:
        if self.env:
            print(format_environment(self.env))
        self.table().print()
        print("time ratio = median / baseline median (< 1 faster); speed-up = its inverse (> 1 faster)")


class Bench:
    """Time named cases interleaved, round-robin: after `warmup` unrecorded rounds, `repeats` rounds of
    A, B, C, A, B, C, ... so slow drift of a shared machine hits every case alike.

    `clock` is injectable for tests; `sync` runs before each clock read (default None: CUDA synchronize if
    CUDA is in use when `run` starts, since GPU kernels are asynchronous; else nothing). The baseline is
    the case added with `baseline=True`, else the first.
    """

    def __init__(
        self,
        repeats: int = 20,
        warmup: int = 3,
        *,
        title: str | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sync: Callable[[], None] | None = None,
    ) -> None:
        if repeats < 1 or warmup < 0:
            raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats=} {warmup=}")
        self.repeats, self.warmup, self.title = repeats, warmup, title
        self.clock, self.sync = clock, sync
        self.cases: list[Case] = []
        self.baseline: str | None = None

    def add(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        setup: Callable[[], Any] | None = None,
        baseline: bool = False,
        work: float | None = None,
        unit: str | None = None,
    ) -> Bench:
        if any(c.name == name for c in self.cases):
            raise ValueError(f"case {name!r} added twice")
        if baseline and self.baseline is not None:
            raise ValueError(f"two baselines: {self.baseline!r} and {name!r}")
        self.cases.append(Case(name, fn, setup, work, unit))
        if baseline:
            self.baseline = name
        return self

    def _time_once(self, case: Case, sync: Callable[[], None]) -> float:
        args = (case.setup(),) if case.setup is not None else ()
        sync()
        t0 = self.clock()
        case.fn(*args)
        sync()
        return self.clock() - t0

    def run(self, env: dict[str, Any] | None = None) -> BenchResult:
        """Run all rounds; `env` (default: `environment()`) is kept in the result for printing."""
        if not self.cases:
            raise ValueError("no cases added")
        sync = self.sync
        if sync is None:
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            sync = torch.cuda.synchronize if cuda else lambda: None
        times: dict[str, list[float]] = {c.name: [] for c in self.cases}
        for round_ in range(self.warmup + self.repeats):
            for case in self.cases:
                elapsed = self._time_once(case, sync)
                if round_ >= self.warmup:
                    times[case.name].append(elapsed)
        base = self.baseline or self.cases[0].name
        base_times = times[base]
        base_median = statistics.median(base_times)
        results = []
        for c in self.cases:
            t = times[c.name]
            ratio = statistics.median(t) / base_median if base_median > 0 else float("inf")
            paired = statistics.median(a / b if b > 0 else float("inf") for a, b in zip(t, base_times))
            results.append(CaseResult(c.name, t, base, ratio, paired, c.work, c.unit))
        return BenchResult(results, base, self.title, environment() if env is None else env)


# ---------------------------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    """Where and with what a figure was measured: date, machine, versions, threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": cores,
    }
    env["isa"] = cpu_isa()
    env["machine"] = f"{env['cpu']} ({env['isa']}), {cores} cores" if env["isa"] else f"{env['cpu']}, {cores} cores"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["machine"] += f", {env['gpu']}"
    env["python"] = platform.python_version()
    env["torch"] = torch.__version__
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    env["threads"] = torch.get_num_threads()
    return env


def _versions(env: dict[str, Any]) -> str:
    parts = [f"python {env['python']}", f"torch {env['torch']}"]
    if "transformers" in env:
        parts.append(f"transformers {env['transformers']}")
    parts.append(f"threads {env['threads']}")
    return ", ".join(parts)


def format_environment(env: dict[str, Any]) -> str:
    return f"{env['date']} | {env['machine']} | {_versions(env)}"


# ---------------------------------------------------------------------------------------------- output


class Table:
    """A fixed-width text table: first column left-aligned, the others right-aligned (or `align`, e.g.
    "lrr")."""

    def __init__(self, columns: Sequence[str], *, title: str | None = None, align: str | None = None):
        self.columns = [str(c) for c in columns]
        self.align = align or "l" + "r" * (len(self.columns) - 1)
        if len(self.align) != len(self.columns):
            raise ValueError("align needs one letter per column")
        self.title = title
        self.rows: list[list[str]] = []

    def add(self, *cells: Any) -> Table:
        if len(cells) != len(self.columns):
            raise ValueError(f"row has {len(cells)} cells, table has {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])
        return self

    def render(self) -> str:
        widths = [max(len(r[i]) for r in [self.columns, *self.rows]) for i in range(len(self.columns))]

        def line(cells: list[str]) -> str:
            out = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, self.align)]
            return "  ".join(out).rstrip()

        lines = [self.title] if self.title else []
        lines += [line(self.columns), "  ".join("-" * w for w in widths)]
        lines += [line(r) for r in self.rows]
        return "\n".join(lines)

    def print(self) -> None:
        print(self.render(), flush=True)


def _md_cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def record(
    figure: str,
    value: str,
    command: str,
    path: str | os.PathLike[str] = DEFAULT_RECORD_PATH,
    *,
    env: dict[str, Any] | None = None,
) -> str:
    """Append one row (figure | value | command | date | machine | versions) to the markdown table in
    `path` (default: docs/benchmarks.md of this repository), creating the file with its header if missing.
    The row goes in one `write` to a file opened for appending, so concurrent scripts do not interleave.
    Returns the row."""
    env = environment() if env is None else env
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(RECORD_HEADER)
    except FileExistsError:
        pass
    cells = [figure, value, f"`{_md_cell(command)}`", env["date"][:10], env["machine"], _versions(env)]
    row = "| " + " | ".join(_md_cell(c) for c in cells) + " |\n"
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
        ends_with_newline = size == 0 or f.read(1) == b"\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(row if ends_with_newline else "\n" + row)
    return row


# ---------------------------------------------------------------------------------------------- command line


def report_rows(rows: Sequence[tuple[str, str]], *, prefix: str, save: bool) -> None:
    """Print (figure, value) rows aligned, and with `save` append each to docs/benchmarks.md as "prefix: figure"."""
    width = max(len(f) for f, _ in rows)
    for figure, value in rows:
        print(f"{figure:<{width}}  {value}")
    if save:
        for figure, value in rows:
            record(f"{prefix}: {figure}", value, command_line())


def add_common_args(parser: argparse.ArgumentParser, *, repeats: int = 20, warmup: int = 3) -> argparse.ArgumentParser:
    """The flags every benchmark script takes. Call `apply_common_args` on the parsed namespace."""
    g = parser.add_argument_group("measurement")
    g.add_argument("--repeats", type=int, default=None, help=f"timed rounds (default {repeats}; 3 with --quick)")
    g.add_argument(
        "--warmup", type=int, default=None, help=f"unrecorded rounds first (default {warmup}; 1 with --quick)"
    )
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    g.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    g.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats: a smoke run")
    parser.set_defaults(_default_repeats=repeats, _default_warmup=warmup)
    return parser


def apply_common_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in repeats/warmup (fewer with --quick unless given) and set torch's thread count."""
    if args.repeats is None:
        args.repeats = 3 if args.quick else args._default_repeats
    if args.warmup is None:
        args.warmup = 1 if args.quick else args._default_warmup
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def verdict(ok: bool | None) -> str:
    """How a script prints a goal: MET, NOT MET, or nothing when the row has no goal."""
    return "" if ok is None else "MET" if ok else "NOT MET"


def command_line(drop: Sequence[str] = ("--record",)) -> str:
    """The command that ran this script, as one would retype it (`python -m benchmarks.x --quick`), without
    `--record`."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    argv[0] = "python"
    return " ".join(a for a in argv if a not in drop)
