"""Tests of benchmarks/inference_quality.py: `main(["--quick"])` in-process on a random 2-layer model (seconds),
the structure of what it returns and prints, the rows `--record` would append, and the window selection."""

import math

import numpy as np
import pytest
import torch

from benchmarks import inference_quality as iq

SCHEMES = {"int8", "w8a8", "int4 g64", "int4 g32"}  # bf16 too when it is cheap here, which it is at this size
CACHES = {"sliding window", "sinks", "merging"}


def test_quick_run_structure():
    quick = iq.main(["--quick", "--bf16", "on"])
    assert quick["skipped"] == []
    (res,) = quick["runs"]
    assert res["name"] == "quick" and res["T"] == 64 and res["windows"] == 8

    kv = res["kv"]
    assert kv["sanity"] <= 1e-5  # an fp32 cache reproduces the plain forward
    assert kv["int8_ppl"] != kv["fp32_ppl"]  # the int8 path really went through quantized K/V
    assert abs(kv["delta"]) < 0.01 and kv["se"] >= 0
    assert kv["bytes_ratio"] == pytest.approx((1 + 4 / 32) / 4)  # int8 + one fp32 scale per 32-wide head

    rows = {r["scheme"]: r for r in res["weights"]}
    assert set(rows) == SCHEMES | {"bf16"}
    for r in rows.values():
        assert math.isfinite(r["ppl"]) and math.isfinite(r["delta"]) and 0 < r["bytes_ratio"] < 1
    assert rows["int8"]["bytes_ratio"] < 0.27 and rows["int4 g64"]["bytes_ratio"] < rows["int4 g32"]["bytes_ratio"]
    assert rows["bf16"]["ok"] is None and rows["int8"]["ok"] in (True, False)

    assert [row["budget"] for row in res["budgets"]] == [16, 32, 48]
    for row in res["budgets"]:
        assert set(row["caches"]) == CACHES
        sliding = row["caches"]["sliding window"]
        assert sliding["bytes"] == row["budget"] * 2 * 2 * 2 * 32 * 4  # B × (K, V) × 2 layers × 2 heads × 32 × fp32
        assert row["caches"]["merging"]["bytes"] > sliding["bytes"]  # + its counts


def test_quick_run_prints_tables(capsys):
    iq.main(["--quick", "--windows", "2", "--budget-windows", "2", "--budgets", "16", "--bf16", "off"])
    out = capsys.readouterr().out
    assert "Δperplexity vs fp32 on 2 val windows × 64 tokens" in out
    assert "int8 KV cache" in out and "int4 g32" in out and "bf16 skipped" not in out
    assert "sanity: ppl through an fp32 cache" in out and "OK" in out
    assert "KV budget B entries per layer" in out and "merging" in out


def test_record_appends_one_row_per_scheme_and_cache(monkeypatch):
    rows = []
    monkeypatch.setattr(iq, "record", lambda figure, value, command: rows.append((figure, value)))
    res = iq.main(["--quick", "--windows", "2", "--budget-windows", "2", "--budgets", "16,32", "--record"])
    (run,) = res["runs"]
    assert len(rows) == 1 + len(run["weights"]) + len(CACHES)
    assert rows[0][0].startswith("quick: int8 KV cache")
    assert all("B=16" in value and "B=32" in value for _, value in rows[-len(CACHES) :])


def test_missing_run_is_skipped(tmp_path, capsys):
    res = iq.main(["--runs", str(tmp_path / "nope"), "--windows", "2"])
    assert res["runs"] == [] and len(res["skipped"]) == 1
    assert "skipped" in capsys.readouterr().out


def test_main_restores_thread_count():
    before = torch.get_num_threads()
    iq.main(["--runs", "/nonexistent-run", "--threads", "1"])
    assert torch.get_num_threads() == before


def test_windows_are_fixed_evenly_spaced_and_in_range():
    tokens = np.arange(10_000, dtype=np.uint16)
    w = iq.select_windows(tokens, 8, 64)
    assert w.shape == (8, 65) and w.dtype == torch.int64
    assert torch.equal(w, iq.select_windows(tokens, 8, 64))
    starts = w[:, 0]
    assert (torch.diff(w, dim=1) == 1).all() and (torch.diff(starts) > 64).all()  # contiguous, no overlap
    assert int(w.max()) < len(tokens)
    with pytest.raises(ValueError):
        iq.select_windows(tokens[:50], 1, 64)
