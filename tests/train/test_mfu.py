"""Tests of lmforge/train/mfu.py: MFU arithmetic and the peak it is taken against (a datasheet figure on a known
GPU, measured elsewhere: tiny matmuls into a temporary cache file, so nothing here touches ~/.cache)."""

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
