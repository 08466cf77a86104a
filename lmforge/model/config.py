"""ModelConfig: every architecture choice of the transformer is one field here, plus the estimates
(parameters, training FLOPs, weight and KV-cache bytes) that describe the model it builds.

    from lmforge.model import ModelConfig
    cfg = ModelConfig(vocab_size=8192, n_layer=6, d_model=384, n_head=6)
    print(cfg.summary())
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal

from lmforge.config import ConfigError
from lmforge.hardware import dtype_bytes

Attention = Literal["sdpa", "naive", "sliding_window", "block_sparse", "linear"]
Position = Literal["sinusoidal", "learned", "relative", "alibi", "rope", "none"]
RopeScaling = Literal["linear", "dynamic", "llama3"]
FeedForward = Literal["relu", "gelu", "gelu_tanh", "swiglu"]
Norm = Literal["layernorm", "rmsnorm"]


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    max_seq_len: int = 256  # longest sequence trained on; learned positions and block-sparse size use it
    n_layer: int = 6
    d_model: int = 384
    n_head: int = 6
    n_kv_head: int | None = None  # None: = n_head (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: d_model // n_head
    d_ff: int | None = None  # None: 4·d, or 8/3·d rounded up to a multiple of 64 for swiglu

    attention: Attention = "sdpa"
    window: int | None = None  # sliding window in tokens (a query sees itself and W-1 before it)
    sparse_block: int | None = None  # block_sparse block size; None: ≈ √max_seq_len
    linear_chunk: int = 64  # chunk size of causal linear attention

    position: Position = "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_factor: float = 1.0
    rope_original_max_len: int | None = None  # trained length the scaling stretches; None: max_seq_len
    rope_low_freq_factor: float = 1.0  # llama3 scaling only
    rope_high_freq_factor: float = 4.0  # llama3 scaling only
    relative_buckets: int = 32  # T5 relative attention bias
    relative_max_distance: int = 128

    ffn: FeedForward = "gelu"
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    # pre: x + f(norm(x)) (GPT-2 onwards); post: norm(x + f(x)) (Vaswani et al. 2017); output: x + norm(f(x)), the
    # sublayer's output normed before it joins the residual stream (OLMo 2's "reordered norm", Team OLMo 2024)
    norm_position: Literal["pre", "post", "output"] = "pre"
    bias: bool = True  # biases in every linear layer (and LayerNorm)
    qkv_bias: bool = False  # biases on q, k and v even where `bias` is off (Qwen2)
    # RMSNorm of queries and keys before RoPE (Dehghani et al. 2023, ViT-22B: it keeps attention logits from
    # growing without bound in training): "head" over each head's head_dim (Qwen3), "full" over the whole q and k
    # projections, all heads together (OLMo 2); None: off
    qk_norm: Literal["head", "full"] | None = None
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    extra: dict = field(default_factory=dict)  # free-form metadata (e.g. the HF family it came from)

    # Keys an older config.yaml (or a quantized file's metadata) may hold: loading drops them (lmforge.config),
    # and each says where the setting lives now. Checkpointing activations is the trainer's choice, not the
    # architecture's: the trainer sets each Block's `checkpoint` flag.
    retired_keys: ClassVar[dict[str, str]] = {"activation_checkpointing": "train.activation_checkpointing"}

    def __post_init__(self) -> None:
        # Fields left None are derived; remember which, so a saved config re-derives them when loaded with
        # other overrides (lmforge.config.to_dict writes them back as None).
        self.derived_fields = tuple(f for f in ("n_kv_head", "head_dim", "d_ff") if getattr(self, f) is None)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None and self.n_head > 0:
            self.head_dim = self.d_model // self.n_head
        if self.d_ff is None:
            if self.ffn == "swiglu":
                # SwiGLU has three matrices: 2/3 of 4·d keeps the parameter count of a 4·d MLP (Shazeer 2020)
                self.d_ff = 64 * -(-8 * self.d_model // (3 * 64))  # ceil in integers: d_model may be huge
            else:
                self.d_ff = 4 * self.d_model
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a message saying what to change."""
        positive = (
            "vocab_size",
            "max_seq_len",
            "n_layer",
            "d_model",
            "n_head",
            "n_kv_head",
            "head_dim",
            "d_ff",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self._check_shapes()
        if self.attention == "sliding_window" and not self.window:
            raise ValueError("attention 'sliding_window' needs window=<tokens>")
        if self.window is not None and self.window <= 0:
            raise ValueError(f"window must be positive, got {self.window}")
        if self.attention in ("block_sparse", "linear") and self.window:
            raise ValueError(f"attention '{self.attention}' has its own pattern: unset window")
        if self.attention in ("sliding_window", "block_sparse", "linear") and self.position in (
            "alibi",
            "relative",
        ):
            raise ValueError(
                f"position '{self.position}' is an attention bias, which attention '{self.attention}' "
                "cannot add: use attention=sdpa or naive, or position=rope"
            )
        if self.rope_scaling is not None and self.position != "rope":
            raise ValueError("rope_scaling needs position=rope")
        if self.rope_scaling is not None and self.rope_factor < 1:
            raise ValueError(f"rope_factor must be >= 1, got {self.rope_factor}")
        if self.qk_norm not in (None, "head", "full"):
            raise ValueError(f"qk_norm must be 'head', 'full' or null, got {self.qk_norm!r}")
        if self.norm_position not in ("pre", "post", "output"):
            raise ValueError(f"norm_position must be 'pre', 'post' or 'output', got {self.norm_position!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def _check_shapes(self) -> None:
        """The divisibility the modules rely on: heads split d_model (when head_dim is derived from it), query
        heads share key/value heads in equal groups, rotations and sin/cos tables work on channel pairs."""
        if "head_dim" in self.derived_fields and self.d_model % self.n_head:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}): use e.g. "
                f"n_head={_nearest_divisor(self.d_model, self.n_head)} or "
                f"d_model={_nearest_multiple(self.d_model, self.n_head)} (or set head_dim explicitly)",
                "d_model",
            )
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}): use e.g. "
                f"n_kv_head={_nearest_divisor(self.n_head, self.n_kv_head)}",
                "n_kv_head",
            )
        if self.position == "rope" and self.head_dim % 2:
            if "head_dim" in self.derived_fields:
                fix = f"d_model / n_head = {self.head_dim}; use e.g. d_model={self.n_head * (self.head_dim + 1)}"
                key = "d_model"
            else:
                fix, key = f"use e.g. head_dim={self.head_dim + 1}", "head_dim"
            raise ConfigError(f"position=rope rotates channel pairs, so head_dim must be even ({fix})", key)
        if self.position == "rope" and self.rope_scaling == "dynamic" and self.head_dim <= 2:
            raise ConfigError(
                f"rope_scaling=dynamic needs head_dim > 2, got {self.head_dim}: use a larger d_model", "head_dim"
            )
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ConfigError(
                f"position=sinusoidal needs an even d_model, got {self.d_model}: use e.g. d_model={self.d_model + 1}",
                "d_model",
            )
        if self.linear_chunk <= 0:
            raise ConfigError(f"linear_chunk must be positive, got {self.linear_chunk}", "linear_chunk")
        if self.sparse_block is not None and self.sparse_block <= 0:
            raise ConfigError(
                f"sparse_block must be positive (or null for ≈ √max_seq_len), got {self.sparse_block}", "sparse_block"
            )
        if self.position == "relative" and self.relative_buckets < 2:
            raise ConfigError(f"relative_buckets must be at least 2, got {self.relative_buckets}", "relative_buckets")
        if self.position == "relative" and self.relative_max_distance <= self.relative_buckets // 2:
            # T5 buckets: exact below buckets/2, log-spaced from there up to max_distance
            raise ConfigError(
                f"relative_max_distance ({self.relative_max_distance}) must exceed relative_buckets / 2 "
                f"({self.relative_buckets // 2}): use e.g. relative_max_distance={4 * self.relative_buckets}",
                "relative_max_distance",
            )
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError(
                f"rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed rope_low_freq_factor "
                f"({self.rope_low_freq_factor})",
                "rope_high_freq_factor",
            )

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def block_sparse_size(self) -> int:
        """Block size of block_sparse attention: ≈ √T keeps both the local part and the strided summary
        part O(√T) keys per query (Child et al. 2019, Sparse Transformers)."""
        return self.sparse_block or max(1, round(math.sqrt(self.max_seq_len)))

    def param_counts(self) -> dict[str, int]:
        """Parameters by part. The LM head is counted once when it is tied to the token embedding."""
        d, b = self.d_model, int(self.bias)
        attn = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d + b * (self.q_dim + 2 * self.kv_dim + d)
        attn += (self.qkv_bias and not b) * (self.q_dim + 2 * self.kv_dim)
        attn += {None: 0, "head": 2 * self.head_dim, "full": self.q_dim + self.kv_dim}[self.qk_norm]
        n_mats = 3 if self.ffn == "swiglu" else 2
        ffn = n_mats * d * self.d_ff + b * ((n_mats - 1) * self.d_ff + d)
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        block = attn + ffn + 2 * norm
        final_norm = 0 if self.norm_position == "post" else norm
        counts = {
            "token_embedding": self.vocab_size * d,
            "position_embedding": self.max_seq_len * d if self.position == "learned" else 0,
            "relative_bias": self.relative_buckets * self.n_head if self.position == "relative" else 0,
            "blocks": self.n_layer * block + final_norm,
            "lm_head": 0 if self.tie_embeddings else self.vocab_size * d,
        }
        counts["total"] = sum(counts.values())
        counts["non_embedding"] = counts["total"] - counts["token_embedding"] - counts["position_embedding"]
        return counts

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token = 6·N + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022, App. B).

        N counts every weight a token is multiplied by: the blocks plus the LM head (vocab × d, whether or
        not it is tied); lookup tables (token and learned position embeddings) do no matmul and are left out.
        The second term is attention's QKᵀ and AV over a T-token context (full causal attention counted as
        full, as PaLM does)."""
        t = seq_len or self.max_seq_len
        c = self.param_counts()
        n = c["blocks"] + self.vocab_size * self.d_model
        return 6 * n + 12 * self.n_layer * self.q_dim * t

    def weight_bytes(self, dtype: str = "float32") -> int:
        return self.param_counts()["total"] * dtype_bytes(dtype)

    def kv_bytes_per_token(self, dtype: str = "float32") -> int:
        """K and V of every layer for one token: 2 · L · n_kv_head · head_dim · bytes."""
        if self.attention == "linear":
            return 0  # linear attention keeps a fixed-size state instead of a per-token cache
        return 2 * self.n_layer * self.kv_dim * dtype_bytes(dtype)

    def summary(self) -> str:
        c = self.param_counts()
        lines = [
            f"parameters      {c['total']:,} ({c['non_embedding']:,} without embeddings)",
            f"layers × d      {self.n_layer} × {self.d_model}, heads {self.n_head} (kv {self.n_kv_head}) "
            f"× {self.head_dim}, d_ff {self.d_ff}",
            f"choices         attention={self.attention} position={self.position} ffn={self.ffn} "
            f"norm={self.norm}/{self.norm_position}",
            f"train FLOPs/tok {self.flops_per_token():.3e} at T={self.max_seq_len}",
            f"weights         {self.weight_bytes() / 2**20:.1f} MiB fp32, "
            f"{self.weight_bytes('bf16') / 2**20:.1f} MiB bf16",
            f"KV cache        {self.kv_bytes_per_token() / 1024:.1f} KiB/token fp32",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain fields, derived ones as None (see `derived_fields`)."""
        d = asdict(self)
        d.update(dict.fromkeys(self.derived_fields))
        return d


def _nearest_divisor(n: int, near: int) -> int:
    """A divisor of `n` close to `near` (the smaller one on a tie), looking a bounded distance away."""
    for delta in range(min(near, 4096)):
        for d in (near - delta, near + delta):
            if 0 < d <= n and n % d == 0:
                return d
    return 1


def _nearest_multiple(n: int, of: int) -> int:
    """The multiple of `of` closest to `n`, at least `of` (in integers: no float overflow for a huge n)."""
    return max(of, of * ((n + of // 2) // of))
