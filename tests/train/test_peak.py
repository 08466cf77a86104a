"""Tests of lmforge/train/peak.py: the measured matmul peak and its cache (tiny matmuls into a temporary cache
file, so nothing here touches ~/.cache or takes long), the CPU's bf16 ÷ fp32 rate, and benchmarks/gpu_train.py
as far as a machine without a GPU can run it."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.train import peak as m


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
    assert m.matmul_peak(torch.float32, "cpu", n=64, repeats=2, cache_path=path).flops == first.flops
    m._MEMO.clear()
    assert m.matmul_peak(torch.float32, "cpu", n=64, repeats=2, cache_path=path).flops == 123.0
    fresh = m.matmul_peak(torch.float32, "cpu", n=64, repeats=2, cache_path=path, refresh=True).flops
    assert fresh != 123.0
    assert json.loads(path.read_text())[first.key]["flops"] == fresh

    # another dtype or size is another entry
    m.matmul_peak(torch.float32, "cpu", n=32, repeats=2, cache_path=path)
    assert len(json.loads(path.read_text())) == 2


def test_corrupt_or_unwritable_cache_does_not_fail(tmp_path):
    path = tmp_path / "peak.json"
    path.write_text("{not json")
    assert m.matmul_peak(torch.float32, "cpu", n=32, repeats=1, cache_path=path).flops > 0
    assert json.loads(path.read_text())  # rewritten whole
    blocked = tmp_path / "file" / "peak.json"
    (tmp_path / "file").write_text("a file where the folder should be")
    assert m.matmul_peak(torch.float32, "cpu", n=32, repeats=1, cache_path=blocked).flops > 0


def test_slow_dtype_is_measured_smaller_instead_of_hanging(tmp_path):
    # A budget far too small for 512² makes it shrink the size and say so.
    r = m.matmul_peak(torch.float32, "cpu", n=512, repeats=2, cache_path=tmp_path / "p.json", max_seconds=1e-4)
    assert r.n < 512 and r.requested_n == 512 and "reduced from 512²" in r.describe()


def test_fast_bf16_is_the_ratio_against_a_threshold(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    calls = []

    def fake(dtype, device, n, **kw):
        calls.append(dtype)
        return SimpleNamespace(flops={torch.bfloat16: 1e9, torch.float32: 100e9}[dtype])

    monkeypatch.setattr(m, "matmul_peak", fake)
    assert m.cpu_bf16_ratio(cache_path=path) == pytest.approx(0.01)
    assert not m.cpu_supports_fast_bf16(cache_path=path)
    assert m.cpu_supports_fast_bf16(threshold=0.005, cache_path=path)


def test_cpu_bf16_ratio_measures_for_real(tmp_path):
    ratio = m.cpu_bf16_ratio(n=64, cache_path=tmp_path / "p.json")
    assert ratio > 0
    assert m.cpu_supports_fast_bf16(n=64, cache_path=tmp_path / "p.json") == (ratio >= 0.25)


@pytest.mark.parametrize("flags, precision", [({"avx2"}, "fp32"), ({"avx2", "avx512f"}, "fp32"),
                                             ({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16")])  # fmt: skip
def test_building_a_trainer_measures_nothing(monkeypatch, tmp_path, run_dir, flags, precision):
    # precision=auto on a CPU reads the flags (lmforge.hardware.cpu_has_native_bf16); the MFU peak is measured
    # at the first logged step, when the Trainer reports it
    from lmforge import hardware
    from lmforge.train.loop import TrainConfig, Trainer, resolve_precision
    from tests.train.train_helpers import batch_fn_for, lm_loss, tiny_model

    def refuse(*args, **kw):
        raise AssertionError("a matmul benchmark ran while the Trainer was built")

    monkeypatch.setattr(m, "_measure", refuse)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert resolve_precision("auto", torch.device("cpu")) == precision
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    cfg = TrainConfig(steps=1, batch_size=2, warmup_steps=1, progress=False)  # precision="auto"
    trainer = Trainer(tiny_model(), cfg, run_dir, batch_fn=batch_fn_for(2), loss_fn=lm_loss, flops_per_token=1e6)
    assert trainer.precision == precision and trainer._peak is None


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
