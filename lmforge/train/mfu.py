"""Model FLOPs utilisation: achieved training FLOP/s ÷ the peak FLOP/s of the hardware.

The achieved side is tokens/s × `ModelConfig.flops_per_token(T)` (6N + 12·L·H·Q·T, PaLM App. B). The peak
side (`device_peak`) is the datasheet figure of a known GPU (`lmforge.hardware.NOMINAL_PEAKS`, dense — no 2:4
sparsity), else a measured one (`lmforge.train.peak`: the best FLOP/s of large square matmuls, cached per
machine). The Trainer asks for the peak at its first logged step, so building one measures nothing.

    from lmforge.train.mfu import device_peak, mfu
    peak, source = device_peak("cpu", torch.float32)
    print(f"MFU {mfu(tokens_per_s, cfg.flops_per_token(256), peak):.1%} of {source}")
"""

from __future__ import annotations

import os

import torch

from lmforge.hardware import matmul_kind, nominal_peak

__all__ = ["device_peak", "mfu"]


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: tokens_per_s × flops_per_token ÷ peak (a fraction, 0.4 = 40%)."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_s * flops_per_token / peak


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
    from .peak import matmul_peak  # seconds of matmuls the first time on a machine (then cached)

    device = torch.device(device)
    kind = matmul_kind(dtype)
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
