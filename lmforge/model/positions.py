"""Position information, five ways. Each takes per-row integer positions ([B, T]) so batches of unequal
lengths (left padding) and cached decoding see the same positions a full recompute would.

- sinusoidal and learned: a vector added to the token embedding (Vaswani et al. 2017; GPT-2).
- rope: rotate query/key channel pairs by position·θ_i (Su et al. 2021, RoFormer), with the
  linear, dynamic-NTK and Llama-3 scalings for running past the trained length.
- alibi: a fixed per-head linear penalty on distance added to attention logits (Press et al. 2022).
- relative: T5's learned bias per (log-spaced distance bucket, head) (Raffel et al. 2020).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import ModelConfig


def sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., dim] with sin on even channels and cos on odd ones: PE(p, 2i) = sin(p / 10000^(2i/d))."""
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=positions.device) * (-math.log(10000.0) / dim))
    angles = positions.float()[..., None] * inv_freq
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class SinusoidalPositions(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dim = cfg.d_model

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return sinusoidal_table(positions, self.dim)


class LearnedPositions(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.max_seq_len, cfg.d_model))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.weight[positions]


# ---- RoPE ------------------------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """θ_i = base^(-2i/d), rescaled by the static scalings (linear, llama3). Dynamic NTK depends on the
    sequence length and is applied per forward in `RotaryEmbedding.inv_freq_for`."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_scaling == "linear":
        # Position interpolation (Chen et al. 2023): positions / factor, i.e. frequencies / factor.
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        inv_freq = _llama3_scale(inv_freq, cfg)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between."""
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_len or cfg.max_seq_len
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) for given positions; `apply_rope` rotates q and k with them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def inv_freq_for(self, positions: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.rope_scaling != "dynamic":
            return self.inv_freq
        # Dynamic NTK (bloc97/emozilla): past the trained length L, grow the base with the current length S:
        # base' = base · (f·S/L − (f−1))^(d/(d−2)). Computed with tensor ops so torch.compile sees no branch.
        dim, trained = cfg.head_dim, cfg.rope_original_max_len or cfg.max_seq_len
        seq_len = (positions.max() + 1).clamp(min=trained).float()
        base = cfg.rope_theta * (cfg.rope_factor * seq_len / trained - (cfg.rope_factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
        return 1.0 / base**exponents

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, head_dim] in fp32 (half-split layout, as Llama/HF)."""
        angles = positions.float()[..., None] * self.inv_freq_for(positions).to(positions.device)
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, d]: pair channel i with i + d/2 (the half-split convention of GPT-NeoX and HF Llama;
    Meta's original pairs neighbours, which HF's weight conversion permutes into this layout)."""
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


# ---- attention biases ------------------------------------------------------------------------------
def alibi_slopes(n_head: int) -> torch.Tensor:
    """Geometric slopes 2^(-8i/n) for n a power of two; otherwise those of the closest smaller power of
    two followed by every other slope of the next power (Press et al. 2022, their reference code)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two(closest)
    if closest < n_head:
        slopes += power_of_two(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes)


class ALiBi(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(cfg.n_head), persistent=False)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bias [B, H, Tq, Tk] = −slope_h · (q_pos − k_pos)."""
        distance = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).float()
        return -self.slopes[None, :, None, None] * distance


def t5_relative_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal (unidirectional) bucket of relative = k_pos − q_pos: exact buckets for distances below
    num_buckets/2, then log-spaced up to max_distance, beyond which everything shares the last bucket."""
    distance = (-relative).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return torch.where(is_small, distance, large)


class RelativeBias(nn.Module):
    """One table shared by every layer, as T5 computes it in the first layer and reuses it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.weight = nn.Parameter(torch.zeros(cfg.relative_buckets, cfg.n_head))

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        relative = k_pos[:, None, :] - q_pos[:, :, None]  # [B, Tq, Tk]
        buckets = t5_relative_bucket(relative, self.num_buckets, self.max_distance)
        return self.weight[buckets].permute(0, 3, 1, 2)  # [B, H, Tq, Tk]
