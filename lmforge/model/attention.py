"""Causal self-attention softmax(QKᵀ/√d)V with MHA/GQA/MQA and five kernels, chosen by `cfg.attention`:

- sdpa            torch's fused scaled_dot_product_attention (flash path on CPU and GPU when it can).
- naive           explicit matmul → mask → softmax → matmul: the reference the other kernels are tested on.
- sliding_window  each query sees the last W keys, computed chunk by chunk: O(T·W) time and memory.
- block_sparse    local blocks plus one summary key per earlier block (Child et al. 2019), with block ≈ √T,
                  computed by gathering only those keys: O(T·√T) time and memory.
- linear          φ(q)·Σφ(k)vᵀ with φ = elu+1 (Katharopoulos et al. 2020), causal in chunks so memory stays
                  O(T·d), and a recurrent one-token form for decoding.

The fast structured paths run for a plain causal batch (training, a prompt without padding or cache). With a
cache or padding every kernel falls back to one explicit mask built from positions (`attention_mask`), which
encodes the same pattern — the tests compare both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import Cache
from .config import ModelConfig
from .layers import RMSNorm
from .positions import apply_rope


@dataclass
class AttentionContext:
    """What every layer's attention needs, computed once per forward by the Transformer."""

    q_pos: torch.Tensor  # [B, T]
    k_pos: torch.Tensor  # [B, Tk]
    plain_causal: bool  # no cache, no padding, positions 0..T-1: structured fast paths apply
    mask: torch.Tensor | None = None  # [B, 1, T, Tk] bool, True = may attend; None on the plain path
    bias: torch.Tensor | None = None  # [B|1, H, T, Tk] additive (ALiBi, T5 relative)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin for q_pos (keys get theirs when stored)
    k_valid: torch.Tensor | None = None  # [B, Tk] (False: padding), or [B, T, Tk] (packed documents)
    cache: Cache | None = None
    # New tokens at the positions right after everything the cache holds, no padding: token i sees every cached key
    # and the new ones up to itself (what a fused decode step assumes; `mask` then encodes just that)
    follows_cache: bool = False


def attention_mask(cfg: ModelConfig, q_pos, k_pos, k_valid=None) -> torch.Tensor:
    """[B, 1, Tq, Tk] bool: the keys each query may see under this config's pattern, from positions."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    allowed = k <= q
    if cfg.window:
        allowed = allowed & (q - k < cfg.window)
    if cfg.attention == "block_sparse":
        b = cfg.block_sparse_size
        local = (q // b - k // b) <= 1  # own block and the one before
        summary = (k % b) == (b - 1)  # the last key of every earlier block
        allowed = allowed & (local | summary)
    if k_valid is not None:  # [B, Tk]: padding keys; [B, T, Tk]: which keys each query's document holds
        allowed = allowed & (k_valid[:, None, :] if k_valid.dim() == 2 else k_valid)
    # A padding query may see nothing; let it see everything instead of producing NaN (its output is unused).
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


def _sdpa(q, k, v, mask, bias, dropout_p, is_causal):
    if bias is not None:
        attn_mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        attn_mask = attn_mask.to(q.dtype)
        is_causal = False
    else:
        attn_mask = mask
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=gqa
    )


def naive_attention(q, k, v, mask=None, bias=None, dropout_p=0.0):
    """The textbook formula; mask None means causal (keys and queries aligned at the end)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    if mask is None:
        tq, tk = q.shape[-2], k.shape[-2]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(scores.softmax(-1, dtype=torch.float32).to(q.dtype), p=dropout_p)
    return probs @ v


def sliding_window_attention(q, k, v, window: int, dropout_p=0.0):
    """Causal attention where query t sees keys t-W+1..t. Queries go in chunks of C = W; a chunk's keys are
    its own C and the C before, so scores are [T/C, C, 2C]: O(T·W) time and memory."""
    B, H, T, D = q.shape
    if window >= T:
        return _sdpa(q, k, v, None, None, dropout_p, is_causal=True)
    C = window
    n = math.ceil(T / C)
    pad_end = n * C - T
    q = F.pad(q, (0, 0, 0, pad_end))
    k = F.pad(k, (0, 0, C, pad_end))  # C zero keys in front: chunk 0 has no predecessor
    v = F.pad(v, (0, 0, C, pad_end))
    hk = k.shape[1]
    # [B, H, n, C, D] queries; [B, Hk, n, 2C, D] keys: windows of 2C advancing by C
    qc = q.view(B, H, n, C, D)
    kc = k.unfold(2, 2 * C, C).transpose(-1, -2)
    vc = v.unfold(2, 2 * C, C).transpose(-1, -2)
    r = torch.arange(C, device=q.device)[:, None]  # query offset in its chunk
    c = torch.arange(2 * C, device=q.device)[None, :]  # key offset in the window (C = the chunk start)
    distance = C + r - c
    band = (distance >= 0) & (distance < window)
    first = band & (c >= C)  # chunk 0: the front keys are padding
    mask = torch.stack([first] + [band] * (n - 1))[:, None]  # [n, 1, C, 2C]
    out = _sdpa(
        qc.transpose(1, 2).reshape(B * n, H, C, D),
        kc.transpose(1, 2).reshape(B * n, hk, 2 * C, D),
        vc.transpose(1, 2).reshape(B * n, hk, 2 * C, D),
        mask.repeat(B, 1, 1, 1),
        None,
        dropout_p,
        is_causal=False,
    )
    return out.view(B, n, H, C, D).transpose(1, 2).reshape(B, H, n * C, D)[:, :, :T]


def block_sparse_attention(q, k, v, block: int, dropout_p=0.0):
    """Fixed sparse pattern (Child et al. 2019): a query in block i sees blocks i-1 and i (causally) and the
    last key of every block before those ("summary" keys). With block ≈ √T each query sees ≈ 3√T keys, and
    only those are gathered: scores are [T/b, b, 2b + T/b], O(T·√T) time and memory."""
    B, H, T, D = q.shape
    b = block
    n = math.ceil(T / b)
    pad_end = n * b - T
    q, k, v = (F.pad(x, (0, 0, 0, pad_end)) for x in (q, k, v))
    hk = k.shape[1]
    summary_k, summary_v = k[:, :, b - 1 :: b], v[:, :, b - 1 :: b]  # [B, Hk, n, D]
    k_pad, v_pad = F.pad(k, (0, 0, b, 0)), F.pad(v, (0, 0, b, 0))
    local_k = k_pad.unfold(2, 2 * b, b).transpose(-1, -2)  # [B, Hk, n, 2b, D]
    local_v = v_pad.unfold(2, 2 * b, b).transpose(-1, -2)
    keys = torch.cat([local_k, summary_k[:, :, None].expand(B, hk, n, n, D)], dim=3)
    values = torch.cat([local_v, summary_v[:, :, None].expand(B, hk, n, n, D)], dim=3)
    i = torch.arange(n, device=q.device)[:, None, None]
    r = torch.arange(b, device=q.device)[None, :, None]
    c = torch.arange(2 * b, device=q.device)[None, None, :]
    local_ok = (c <= b + r) & ((i > 0) | (c >= b))  # causal inside; block -1 is padding
    j = torch.arange(n, device=q.device)[None, None, :]
    summary_ok = (j <= i - 2).expand(n, b, n)  # earlier than the local pair
    mask = torch.cat([local_ok.expand(n, b, 2 * b), summary_ok], dim=-1)[:, None]  # [n, 1, b, 2b+n]
    out = _sdpa(
        q.view(B, H, n, b, D).transpose(1, 2).reshape(B * n, H, b, D),
        keys.transpose(1, 2).reshape(B * n, hk, 2 * b + n, D),
        values.transpose(1, 2).reshape(B * n, hk, 2 * b + n, D),
        mask.repeat(B, 1, 1, 1),
        None,
        dropout_p,
        is_causal=False,
    )
    return out.view(B, n, H, b, D).transpose(1, 2).reshape(B, H, n * b, D)[:, :, :T]


# ---- linear attention --------------------------------------------------------------------------------
def feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def linear_attention(q, k, v, state=None, chunk: int = 64, eps: float = 1e-6):
    """Causal linear attention over feature-mapped q, k ([B, H, T, d]; k, v may have fewer heads).

    out_t = q_t·S_t / q_t·z_t with S_t = Σ_{s≤t} k_s v_sᵀ and z_t = Σ_{s≤t} k_s. Inside a chunk the C×C
    products are exact; across chunks only the running (S, z) is carried, so memory is O(T·d + T/C·d²) —
    never the T·d² of a cumulative sum over all positions. Returns (out, (S, z)) to continue from."""
    B, H, T, D = q.shape
    groups = H // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    Dv = v.shape[-1]
    S = q.new_zeros(B, H, D, Dv) if state is None else state[0]
    z = q.new_zeros(B, H, D) if state is None else state[1]
    n = math.ceil(T / chunk)
    pad = n * chunk - T
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))  # zero keys add nothing to S or z
    qc, kc, vc = (x.view(B, H, n, chunk, x.shape[-1]) for x in (q, k, v))
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    intra = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, H, n, C, C]
    kv = kc.transpose(-1, -2) @ vc  # [B, H, n, D, Dv]: one d×d matrix per chunk
    kv_before = S[:, :, None] + kv.cumsum(2) - kv  # state entering each chunk
    z_chunk = kc.sum(3)
    z_before = z[:, :, None] + z_chunk.cumsum(2) - z_chunk
    num = qc @ kv_before + intra @ vc
    den = (qc * z_before[:, :, :, None]).sum(-1) + intra.sum(-1)
    out = num / (den[..., None] + eps)
    new_state = (S + kv.sum(2), z + z_chunk.sum(2))
    return out.reshape(B, H, n * chunk, Dv)[:, :, :T], new_state


def linear_attention_recurrent(q, k, v, state=None, eps: float = 1e-6):
    """The same function one token at a time (the decoding form): S += k vᵀ, z += k, out = qS / qz."""
    B, H, T, D = q.shape
    groups = H // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    S = q.new_zeros(B, H, D, v.shape[-1]) if state is None else state[0]
    z = q.new_zeros(B, H, D) if state is None else state[1]
    outs = []
    for t in range(T):
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + k[:, :, t]
        num = (q[:, :, t, None, :] @ S).squeeze(-2)
        outs.append(num / ((q[:, :, t] * z).sum(-1, keepdim=True) + eps))
    return torch.stack(outs, dim=2), (S, z)


# ---- the module --------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Projections, rotary, one kernel, output projection. The kernel is chosen once, by `cfg.attention`; each
    softmax kernel takes its structured fast path on a plain causal batch and the explicit mask otherwise."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.d_model, cfg.q_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_dim, bias=qkv_bias)
        self.wo = nn.Linear(cfg.q_dim, cfg.d_model, bias=cfg.bias)
        if cfg.qk_norm:  # "head": one gain per head_dim channel, shared by the heads; "full": one per channel of q, k
            q_width, k_width = (cfg.head_dim, cfg.head_dim) if cfg.qk_norm == "head" else (cfg.q_dim, cfg.kv_dim)
            self.q_norm, self.k_norm = RMSNorm(q_width, cfg.norm_eps), RMSNorm(k_width, cfg.norm_eps)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.kernel = {
            "sdpa": self._sdpa,
            "naive": self._naive,
            "sliding_window": self._sliding_window,
            "block_sparse": self._block_sparse,
            "linear": self._linear,
        }[cfg.attention]

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q, k, v = self.project_qkv(x)
        if self.cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, -1, hd).transpose(1, 2)
        k = k.view(B, T, -1, hd).transpose(1, 2)
        v = v.view(B, T, -1, hd).transpose(1, 2)
        if self.cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx.rope is not None:
            cos, sin = ctx.rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.wo(self.kernel(q, k, v, ctx).transpose(1, 2).reshape(B, T, -1))
        return self.resid_dropout(out) if self.training else out  # (a module call saved per layer when decoding)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, q_dim], k and v [B, T, kv_dim]."""
        return self.wq(x), self.wk(x), self.wv(x)

    @property
    def _dropout_p(self) -> float:
        return self.cfg.dropout if self.training else 0.0

    def _all_keys(self, k, v, ctx: AttentionContext):
        """Every key and value the new tokens may see (this forward's, plus what the cache holds) and the bias on
        their logits: the position bias, plus the cache's own (e.g. log(count) of merged entries)."""
        if ctx.cache is None:
            return k, v, ctx.bias
        k, v = ctx.cache.update(self.layer, k, v)
        extra = ctx.cache.logit_bias(self.layer)
        if extra is None:
            return k, v, ctx.bias
        return k, v, extra if ctx.bias is None else ctx.bias + extra

    def _sdpa(self, q, k, v, ctx: AttentionContext):
        if ctx.cache is not None and q.shape[2] == 1 and not self.cfg.window and ctx.bias is None:
            # One new token per row under the dense causal pattern: the cache may store it and attend itself,
            # reading keys where they are stored (lmforge.infer's decode kernel) instead of returning them.
            out = ctx.cache.attend(self.layer, q, k, v)
            if out is not None:
                return out
        k, v, bias = self._all_keys(k, v, ctx)
        # No mask: the plain causal batch, or one new token that sees every key (is_causal would align it with
        # the first key, not the last).
        return _sdpa(q, k, v, ctx.mask, bias, self._dropout_p, is_causal=ctx.mask is None and ctx.plain_causal)

    def _naive(self, q, k, v, ctx: AttentionContext):
        k, v, bias = self._all_keys(k, v, ctx)
        return naive_attention(q, k, v, ctx.mask, bias, self._dropout_p)

    def _sliding_window(self, q, k, v, ctx: AttentionContext):
        if ctx.plain_causal and ctx.bias is None:
            return sliding_window_attention(q, k, v, self.cfg.window, self._dropout_p)
        return self._masked(q, k, v, ctx)

    def _block_sparse(self, q, k, v, ctx: AttentionContext):
        if ctx.plain_causal and ctx.bias is None:
            return block_sparse_attention(q, k, v, self.cfg.block_sparse_size, self._dropout_p)
        return self._masked(q, k, v, ctx)

    def _masked(self, q, k, v, ctx: AttentionContext):
        """A structured pattern off its fast path (a cache, padding, a bias): sdpa under the explicit mask."""
        k, v, bias = self._all_keys(k, v, ctx)
        return _sdpa(q, k, v, ctx.mask, bias, self._dropout_p, is_causal=ctx.mask is None and ctx.plain_causal)

    def _linear(self, q, k, v, ctx: AttentionContext):
        q, k = feature_map(q), feature_map(k)
        if ctx.k_valid is not None:  # padding keys contribute nothing to the running sums
            valid = ctx.k_valid[:, -k.shape[2] :, None]
            k, v = k * valid[:, None], v * valid[:, None]
        state = ctx.cache.get_state(self.layer) if ctx.cache is not None else None
        if q.shape[2] == 1:
            out, state = linear_attention_recurrent(q, k, v, state)
        else:
            out, state = linear_attention(q, k, v, state, chunk=self.cfg.linear_chunk)
        if ctx.cache is not None:
            ctx.cache.set_state(self.layer, state)
        return out
