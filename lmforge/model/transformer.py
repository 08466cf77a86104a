"""The decoder-only Transformer. Every option is a field of ModelConfig; options pick small modules at
construction time, so `forward` reads the same whatever the architecture.

    model = Transformer(ModelConfig(vocab_size=256, n_layer=2, d_model=64, n_head=4))
    logits = model(idx)                                        # [B, T, vocab]
    logits = model(idx, positions=pos, attn_mask=valid)        # left-padded batch of unequal lengths
    logits = model(idx[:, -1:], cache=cache)                   # decoding with a KV cache (lmforge.infer)
    logits, hidden = model(idx, return_hidden=True)            # hidden states for value / reward heads
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, AttentionContext, attention_mask
from .cache import Cache
from .config import ModelConfig
from .layers import make_ffn, make_norm
from .positions import ALiBi, LearnedPositions, RelativeBias, RotaryEmbedding, SinusoidalPositions


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.norm2, self.ffn = make_norm(cfg), make_ffn(cfg)
        self.checkpoint = False  # a flag the block reads: the trainer sets it (TrainConfig.activation_checkpointing)
        self._forward = {"pre": self._pre_norm, "post": self._post_norm, "output": self._output_norm}[cfg.norm_position]

    def _pre_norm(self, x, ctx):  # GPT-2 onwards: x + f(norm(x)), a clean residual path
        x = x + self.attn(self.norm1(x), ctx)
        return x + self.ffn(self.norm2(x))

    def _post_norm(self, x, ctx):  # the original Transformer (Vaswani et al. 2017): norm(x + f(x))
        x = self.norm1(x + self.attn(x, ctx))
        return self.norm2(x + self.ffn(x))

    def _output_norm(self, x, ctx):  # OLMo 2's reordered norm: x + norm(f(x))
        x = x + self.norm1(self.attn(x, ctx))
        return x + self.norm2(self.ffn(x))

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            # Keep only the block's input; recompute its activations in backward.
            return checkpoint(self._forward, x, ctx, use_reentrant=False)
        return self._forward(x, ctx)


class Blocks(nn.ModuleList):
    """The stack of blocks, run one after another. (A module of its own so that an inference fast path can swap
    in a subclass that runs the whole stack at once: lmforge/infer/fastpath.py.)"""

    def __init__(self, cfg: ModelConfig):
        super().__init__(Block(cfg, i) for i in range(cfg.n_layer))
        self.cfg = cfg

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        for block in self:
            x = block(x, ctx)
        return x


ADDED_POSITIONS = {"sinusoidal": SinusoidalPositions, "learned": LearnedPositions}
BIAS_POSITIONS = {"alibi": ALiBi, "relative": RelativeBias}
# Kernels whose plain causal path needs no explicit mask (without a window or an attention bias).
MASK_FREE = {"sdpa", "sliding_window", "block_sparse", "linear"}


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.add_positions = ADDED_POSITIONS[cfg.position](cfg) if cfg.position in ADDED_POSITIONS else None
        self.rope = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        self.attn_bias = BIAS_POSITIONS[cfg.position](cfg) if cfg.position in BIAS_POSITIONS else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = Blocks(cfg)
        # Post-norm blocks end in a norm already; the others need one before the head.
        self.norm_f = nn.Identity() if cfg.norm_position == "post" else make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # Press & Wolf 2017
        # Whether the pattern needs an explicit mask even where the kernel's own causal path would do: a window,
        # a kernel without a fused causal path (naive), or a position bias. Linear attention never takes one.
        self.always_masked = cfg.attention not in MASK_FREE or bool(cfg.window) or self.attn_bias is not None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, σ) for weights and embeddings (σ = init_std, 0.02), zero biases, unit norms,
        and σ/√(2L) for the projections that write into the residual stream, so its variance does not
        grow with depth (Radford et al. 2019, §2.3)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("attn.wo.weight", "ffn.down.weight"))
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer) if residual else std)
            elif "norm" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: Cache | None = None,
        attn_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
        logits_at: torch.Tensor | None = None,
    ):
        """idx [B, T] token ids. positions [B, T]: each token's position (default: after what the cache holds,
        else 0..T-1). attn_mask [B, T] bool: False marks padding; or [B, T, T] bool: key j is visible to query i
        (documents packed into one row: with positions restarting at each, every document sees only itself), on
        top of causality by position. cache: a `lmforge.model.cache.Cache`. logits_at [B, T] bool: the LM head runs
        only where it is True (a fine-tuning loss on the answers' tokens needs no logits elsewhere, and at a 49k
        vocabulary the head and its softmax are a good part of a step), and the logits are [N, vocab] in order.
        Returns logits [B, T, vocab] (fp32-accumulated in the model's dtype), or (logits, hidden)."""
        hidden = self.hidden_states(idx, positions=positions, cache=cache, attn_mask=attn_mask)
        logits = self.lm_head(hidden if logits_at is None else hidden[logits_at])
        return (logits, hidden) if return_hidden else logits

    def hidden_states(self, idx, *, positions=None, cache=None, attn_mask=None) -> torch.Tensor:
        """The final normed hidden states [B, T, d]: what the LM head, a value head or a reward head reads."""
        ctx = self._context(idx, positions, cache, attn_mask)
        x = self.tok_emb(idx)
        if self.add_positions is not None:
            x = x + self.add_positions(ctx.q_pos).to(x.dtype)
        if self.training:
            x = self.dropout(x)
        return self.norm_f(self.blocks(x, ctx))

    def _context(self, idx, positions, cache, attn_mask) -> AttentionContext:
        """Positions, the keys each query may see, rotary angles and position biases: computed once per forward
        for every layer."""
        cfg = self.cfg
        B, T = idx.shape
        plain = positions is None and cache is None and attn_mask is None  # training, an unpadded prompt
        if plain and cfg.position == "learned" and T > cfg.max_seq_len:
            raise ValueError(f"{T} tokens exceed max_seq_len={cfg.max_seq_len} of learned positions: shorten the input")
        after_cache = cache is not None and positions is None and attn_mask is None
        if positions is None:
            start = 0 if cache is None else cache.length
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        if attn_mask is not None and attn_mask.dim() == 3 and (cache is not None or cfg.attention == "linear"):
            raise ValueError("a [B, T, T] attn_mask (packed documents) needs softmax attention and no cache, "
                             f"not attention={cfg.attention!r}" + (" with a cache" if cache else ""))  # fmt: skip
        k_pos, k_valid = (positions, attn_mask) if cache is None else cache.begin(positions, attn_mask)
        ctx = AttentionContext(q_pos=positions, k_pos=k_pos, plain_causal=plain, k_valid=k_valid, cache=cache,
                               follows_cache=after_cache and k_valid is None)  # fmt: skip
        if self._needs_mask(ctx, T):
            ctx.mask = attention_mask(cfg, positions, k_pos, k_valid)
        if self.rope is not None:
            ctx.rope = self.rope(positions)
        if self.attn_bias is not None:
            ctx.bias = self.attn_bias(positions[:1] if plain else positions, k_pos[:1] if plain else k_pos)
        return ctx

    def _needs_mask(self, ctx: AttentionContext, T: int) -> bool:
        """Whether attention needs the explicit mask: not on the plain causal batch, nor for one new token after
        everything cached under a dense pattern (it sees every key; building a mask would cost more than a small
        model's attention at that step) — unless the pattern itself needs one."""
        if self.cfg.attention == "linear":
            return False
        sees_every_key = T == 1 and ctx.follows_cache and self.cfg.attention != "block_sparse"
        return self.always_masked or not (ctx.plain_causal or sees_every_key)
