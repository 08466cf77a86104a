"""Tests of benchmarks/harness.py: interleaving, statistics on a fake clock, ratio direction, `record`,
and the two memory helpers against allocations of known size."""

import argparse

import pytest
import torch

from benchmarks import harness
from benchmarks.harness import Bench, Table, peak_live_memory, peak_rss_growth, record

MiB = 2**20
ENV = {
    "date": "2026-11-29T12:00:00+00:00",
    "machine": "Test CPU, 2 cores",
    "python": "3.11.7",
    "torch": "2.13.0",
    "threads": 2,
}


class FakeClock:
    """Time advances only when a case 'runs' for its scripted duration."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def runner(self, durations):
        durations = list(durations)

        def fn():
            self.now += durations.pop(0)

        return fn


def test_interleaving_is_round_robin_with_unrecorded_warmup():
    calls = []
    bench = Bench(
        repeats=3,
        warmup=2,
    )
    for name in "ABC":
        bench.add(name, lambda _, name=name: calls.append(name), setup=lambda name=name: calls.append("s" + name))
    result = bench.run(env=ENV)
    assert calls == ["sA", "A", "sB", "B", "sC", "C"] * 5
    assert [c.n for c in result.cases] == [3, 3, 3]


def test_setup_value_is_passed_and_untimed():
    clock = FakeClock()
    seen = []

    def setup():
        clock.now += 100.0  # must not be counted
        return "state"

    bench = Bench(
        repeats=2,
        warmup=0,
        clock=clock,
    )
    bench.add("A", lambda s: (seen.append(s), clock.runner([1.0])()), setup=setup)
    assert bench.run(env=ENV)["A"].times == [1.0, 1.0]
    assert seen == ["state", "state"]


def test_median_min_max_ratio_on_fake_clock():
    clock = FakeClock()
    bench = Bench(
        repeats=5,
        warmup=1,
        clock=clock,
    )
    # The first value of each list is the warmup round and must be ignored.
    bench.add("slow", clock.runner([99, 4, 2, 8, 6, 10]), work=1000, unit="tok")
    bench.add("fast", clock.runner([99, 1, 3, 2, 5, 4]), baseline=True, work=1000, unit="tok")
    result = bench.run(env=ENV)
    slow, fast = result["slow"], result["fast"]
    assert result.baseline == "fast"
    assert slow.times == [4, 2, 8, 6, 10]
    assert (slow.median, slow.min, slow.max, slow.n) == (6, 2, 10, 5)
    assert (fast.median, fast.min, fast.max, fast.n) == (3, 1, 5, 5)
    # Direction: time ratio = median / baseline median (> 1 slower), speed-up is its inverse.
    assert slow.ratio == pytest.approx(2.0)
    assert slow.speedup == pytest.approx(0.5)
    assert fast.ratio == 1.0 and fast.speedup == 1.0
    assert slow.paired_ratio == pytest.approx(2.5)  # per-round 4/1, 2/3, 8/2, 6/5, 10/4 -> median 2.5
    assert slow.throughput == pytest.approx(1000 / 6)
    text = result.table().render()
    assert "fast (base)" in text and "tok/s" in text
    assert "speed-up vs fast" in slow.describe()


def test_first_case_is_baseline_by_default_and_errors():
    bench = (
        Bench(
            repeats=1,
            warmup=0,
        )
        .add("a", lambda: None)
        .add("b", lambda: None)
    )
    assert bench.run(env=ENV).baseline == "a"
    with pytest.raises(ValueError):
        bench.add("a", lambda: None)
    with pytest.raises(ValueError):
        Bench().run()


def test_table_is_fixed_width():
    t = Table(["case", "median"], title="T").add("a", "1 ms").add("longer name", "12.5 ms")
    assert t.render().splitlines() == [
        "T",
        "case          median",
        "-----------  -------",
        "a               1 ms",
        "longer name  12.5 ms",
    ]


def test_record_creates_header_and_appends_one_row(tmp_path):
    path = tmp_path / "sub" / "bench.md"
    row = record("decode | bf16", "1.83× speed-up", "python -m benchmarks.decode --quick", path, env=ENV)
    text = path.read_text()
    assert text == harness.RECORD_HEADER + row
    table_lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert table_lines[0] == "| figure | value | command | date | machine | versions |"
    assert len(table_lines) == 3  # header, separator, one row
    cells = [c.strip() for c in row.strip().strip("|").split(" | ")]
    assert cells == [
        "decode \\| bf16",
        "1.83× speed-up",
        "`python -m benchmarks.decode --quick`",
        "2026-11-29",
        "Test CPU, 2 cores",
        "python 3.11.7, torch 2.13.0, threads 2",
    ]
    record("second", "x", "cmd", path, env=ENV)
    assert path.read_text().count("\n| second |") == 1
    assert path.read_text().startswith(harness.RECORD_HEADER)  # header written once


def test_record_into_file_without_trailing_newline(tmp_path):
    path = tmp_path / "b.md"
    path.write_text(harness.RECORD_HEADER.rstrip("\n"))
    record("f", "v", "c", path, env=ENV)
    assert path.read_text().splitlines()[-1].startswith("| f | v | `c` |")


def test_environment_keys():
    env = harness.environment()
    for key in ("date", "machine", "cpu", "cores", "python", "torch", "threads"):
        assert key in env
    assert env["threads"] == torch.get_num_threads()


def test_common_args():
    parser = harness.add_common_args(argparse.ArgumentParser(), repeats=7, warmup=2)
    args = harness.apply_common_args(parser.parse_args([]))
    assert (args.repeats, args.warmup, args.record, args.quick) == (7, 2, False, False)
    args = harness.apply_common_args(parser.parse_args(["--quick", "--warmup", "0"]))
    assert (args.repeats, args.warmup, args.quick) == (3, 0, True)


def _keep_64mib():
    a = torch.ones(16 * MiB)  # 64 MiB of float32, alive until the end
    b = a * 2  # +64 MiB
    del b
    return a.sum()


def test_peak_live_memory_sees_plain_tensors():
    result = peak_live_memory(_keep_64mib)
    assert result.bytes == pytest.approx(128 * MiB, rel=0.1)  # a and b were alive together
    assert "MemTracker" in result.method


def test_peak_live_memory_counts_tracked_externals():
    lin = torch.nn.Linear(1024, 1024)  # 4 MiB of weights, made before the call
    x = torch.randn(8, 1024)
    result = peak_live_memory(lambda: lin(x).sum().backward(), track=[lin])
    assert result.detail["at_start"] == pytest.approx(4 * MiB, rel=0.01)
    assert result.bytes >= 8 * MiB  # parameters + gradients


def _allocate_200mib():
    x = torch.ones(50 * MiB)  # 200 MiB of float32, pages touched
    return float(x[-1])


def test_peak_rss_growth_of_a_200mib_allocation():
    result = peak_rss_growth(_allocate_200mib)
    assert result.bytes == pytest.approx(200 * MiB, rel=0.25)
    assert "subprocess" in result.method


def test_formatting():
    assert harness.fmt_seconds(0.0123) == "12.3 ms"
    assert harness.fmt_bytes(64 * MiB) == "64.0 MiB"
    assert harness.fmt_count(3470.2) == "3,470" and harness.fmt_count(2.97e8) == "297M"
