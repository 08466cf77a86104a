"""Tests of lmforge/train/mfu.py: MFU arithmetic, the datasheet lookup, and the measured-peak cache (tiny
matmuls into a temporary cache file, so nothing here touches ~/.cache or takes long)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.model import ModelConfig
from lmforge.train import mfu as m


def test_mfu_arithmetic():
    # 1,000 tokens/s × 6e9 FLOPs/token = 6 TFLOP/s achieved; on a 12 TFLOP/s peak that is 50%.
    assert m.mfu(1_000, 6e9, 12e12) == pytest.approx(0.5)
    assert m.mfu(0, 6e9, 12e12) == 0.0
    with pytest.raises(ValueError):
        m.mfu(1, 1, 0)


def test_mfu_with_the_model_flop_definition():
    cfg = ModelConfig(vocab_size=65, max_seq_len=256, n_layer=6, d_model=384, n_head=6, ffn="gelu_tanh")
    fpt = cfg.flops_per_token(256)
    # achieved FLOP/s / peak, whatever the units
    assert m.mfu(2_000, fpt, 2_000 * fpt) == pytest.approx(1.0)
    assert m.mfu(2_000, fpt, 4_000 * fpt) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "name, dtype, label, tflops",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, "H100 SXM", 989),
        ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", 756),
        ("NVIDIA H100 NVL", "bf16", "H100 NVL", 835),
        ("NVIDIA H200", torch.bfloat16, "H200", 989),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, "A100", 312),
        ("NVIDIA A100-PCIE-40GB", torch.float32, "A100", 19.5),
        ("NVIDIA A100 80GB PCIe", "fp16", "A100", 312),
        ("NVIDIA A10G", "bf16", "A10G", 125),
        ("NVIDIA A10", "fp32", "A10", 31.2),
        ("NVIDIA L4", "bfloat16", "L4", 121),
        ("NVIDIA L40S", "bf16", "L40S", 362.05),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, "RTX 4090", 165.2),
    ],
)
def test_nominal_lookup_picks_the_specific_variant(name, dtype, label, tflops):
    flops, source = m.nominal_peak(name, dtype)
    assert flops == pytest.approx(tflops * 1e12)
    assert source.startswith(f"nominal {label} ")


def test_nominal_lookup_misses_unknown_devices():
    assert m.nominal_peak("NVIDIA GeForce GTX 1080", "bf16") is None
    assert m.nominal_peak("NVIDIA L40", "bf16") is None  # not the L4, not the L40S


def test_nominal_table_is_dense_and_consistent():
    for label, entry in m.NOMINAL_PEAKS.items():
        assert entry["bf16"] == entry["fp16"], label  # fp32 accumulation: the same rate
        assert entry["fp32"] < entry["bf16"], label
        assert entry["source"], label


def test_dtype_names():
    assert m.dtype_name(torch.float32) == m.dtype_name("float32") == "fp32"
    assert m.dtype_name(torch.bfloat16) == m.dtype_name("BF16") == "bf16"
    with pytest.raises(ValueError):
        m.dtype_name(torch.int8)


def test_measured_peak_is_cached_and_refreshable(tmp_path):
    path = tmp_path / "peak.json"
    first = m.matmul_peak(torch.float32, "cpu", n=64, repeats=2, cache_path=path, max_seconds=1.0)
    assert not first.cached and first.flops > 0 and first.n == 64
    stored = json.loads(path.read_text())
    assert list(stored) == [first.key]
    assert "fp32" in first.key and "n 64" in first.key and f"threads {torch.get_num_threads()}" in first.key
    assert torch.__version__ in first.key

    again = m.matmul_peak(torch.float32, "cpu", n=64, repeats=2, cache_path=path)
    assert again.cached and again.flops == first.flops  # read back, not re-measured

    # a planted value proves the file is what is read (once per process: later calls use the memo);
    # refresh=True measures and overwrites it
    stored[first.key]["flops"] = 123.0
    path.write_text(json.dumps(stored))
    assert m.measure_matmul_peak(torch.float32, "cpu", n=64, repeats=2, cache_path=path) == first.flops
    m._MEMO.clear()
    assert m.measure_matmul_peak(torch.float32, "cpu", n=64, repeats=2, cache_path=path) == 123.0
    fresh = m.measure_matmul_peak(torch.float32, "cpu", n=64, repeats=2, cache_path=path, refresh=True)
    assert fresh != 123.0
    assert json.loads(path.read_text())[first.key]["flops"] == fresh

    # another dtype or size is another entry
    m.matmul_peak(torch.float32, "cpu", n=32, repeats=2, cache_path=path)
    assert len(json.loads(path.read_text())) == 2


def test_corrupt_or_unwritable_cache_does_not_fail(tmp_path):
    path = tmp_path / "peak.json"
    path.write_text("{not json")
    assert m.measure_matmul_peak(torch.float32, "cpu", n=32, repeats=1, cache_path=path) > 0
    assert json.loads(path.read_text())  # rewritten whole
    blocked = tmp_path / "file" / "peak.json"
    (tmp_path / "file").write_text("a file where the folder should be")
    assert m.measure_matmul_peak(torch.float32, "cpu", n=32, repeats=1, cache_path=blocked) > 0


def test_slow_dtype_is_measured_smaller_instead_of_hanging(tmp_path):
    # A budget far too small for 512² makes it shrink the size and say so.
    r = m.matmul_peak(torch.float32, "cpu", n=512, repeats=2, cache_path=tmp_path / "p.json", max_seconds=1e-4)
    assert r.n < 512 and r.requested_n == 512 and "reduced from 512²" in r.describe()


def test_device_peak_on_cpu_is_measured(tmp_path):
    flops, source = m.device_peak("cpu", torch.float32, n=64, cache_path=tmp_path / "p.json")
    assert flops > 0 and source.startswith("measured fp32 matmul peak")


def test_device_peak_on_cuda_uses_the_datasheet(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert m.device_peak("cuda:0", torch.bfloat16)[0] == pytest.approx(989e12)
    assert m.device_peak("cuda:0", torch.float32)[0] == pytest.approx(67e12)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    flops, source = m.device_peak("cuda:0", torch.float32)
    assert flops == pytest.approx(494.5e12) and "tf32" in source


def test_fast_bf16_is_the_ratio_against_a_threshold(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    calls = []

    def fake(dtype, device, n, **kw):
        calls.append(dtype)
        return {torch.bfloat16: 1e9, torch.float32: 100e9}[dtype]

    monkeypatch.setattr(m, "measure_matmul_peak", fake)
    assert m.cpu_bf16_ratio(cache_path=path) == pytest.approx(0.01)
    assert not m.cpu_supports_fast_bf16(cache_path=path)
    assert m.cpu_supports_fast_bf16(threshold=0.005, cache_path=path)


def test_cpu_bf16_ratio_measures_for_real(tmp_path):
    ratio = m.cpu_bf16_ratio(n=64, cache_path=tmp_path / "p.json")
    assert ratio > 0
    assert m.cpu_supports_fast_bf16(n=64, cache_path=tmp_path / "p.json") == (ratio >= 0.25)


# ---- benchmarks/gpu_train.py: what can be checked without a GPU ----------------------------------------

GPU_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_train.py"
BARE_TORCH = "import sys; sys.modules['transformers'] = None; sys.modules['safetensors'] = None; "


def run_gpu_script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run gpu_train.py in a fresh interpreter where transformers and safetensors cannot be imported (as on
    a machine with a bare torch install), its peak cache in tmp_path."""
    prog = BARE_TORCH + f"sys.argv = [{str(GPU_SCRIPT)!r}, *{list(args)!r}]; import runpy; "
    prog += f"runpy.run_path({str(GPU_SCRIPT)!r}, run_name='__main__')"
    env = {**os.environ, "LMFORGE_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_gpu_script_without_cuda_says_so_and_exits_0(tmp_path):
    proc = run_gpu_script(tmp_path, "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no CUDA device"
    assert not (tmp_path / "r.json").exists()


def test_gpu_script_cpu_smoke_eager(tmp_path):
    out = tmp_path / "r.json"
    proc = run_gpu_script(tmp_path, "--cpu-smoke", "--no-compile", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    for name in ("env", "peak", "eager"):
        assert "error" not in results[name], results[name]
    eager = results["eager"]
    assert eager["tokens_per_s"] > 0 and eager["steps_timed"] >= 3 and eager["batch"] == 2
    assert 0 < eager["mfu_measured"] and eager["mfu_nominal"] is None
    assert "compiled" not in results and "MFU measured" in proc.stdout


@pytest.mark.slow
def test_gpu_script_cpu_smoke_compiled(tmp_path):
    out = tmp_path / "r.json"
    proc = run_gpu_script(tmp_path, "--cpu-smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    compiled = json.loads(out.read_text())["compiled"]
    assert "error" not in compiled, compiled
    assert compiled["compile_s"] > 0 and compiled["tokens_per_s"] > 0
