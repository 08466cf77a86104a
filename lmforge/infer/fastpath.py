"""The batch-1 decode path for fp32 weights: a one-token step reads every weight once, so its speed is the GEMV
bandwidth. `optimize_for_decode` makes every `nn.Linear` of a model (LM head included) a `DecodeLinear`: the
same module, same weight tensor, whose products over a few rows (a decode step, a speculative verification of
up to `kernels.MAX_ROWS` tokens) run in lmforge's GEMV kernel (`lmforge.infer.kernels`, ~1.5x torch's 1-row
matmul on the 2-core AVX2 machine lmforge is developed on). Longer inputs (prefill, large batches) and any call
with autograd on go to `F.linear` as before.

    model = optimize_for_decode(model)        # in place; returns the model (unchanged where kernels are missing)

Each attention layer becomes a `FusedAttention`, which reads its q, k and v weights in one kernel call, with no
copy of them: one parallel region and one Python call instead of three, ~24 fewer per GPT-2 step.

A batch-1 step of a few tokens (a decode step, a speculative verification) goes further: the model's `Blocks`
become `FusedBlocks`, whose `FusedDecode` runs every layer in one C call (`kernels/layer.c`): norms, q/k/v,
rotary, the cache write, attention, the feed-forward and the residual adds run between the GEMVs without
returning to Python. The GEMVs are most of a step's time; the ~40 torch ops a layer runs around them cost ~20%
more on a 2-core CPU. The blocks run one by one as usual wherever it does not apply. It applies when:

- the step is batch 1, 1 to `kernels.MAX_ROWS` new tokens at the positions after the cached ones, fp32
  activations, autograd off, the model in eval mode;
- the cache hands out its buffers (`ContiguousKVCache.decode_buffers`: fp32 storage, no padding);
- the model is pre-norm with LayerNorm or RMSNorm, dense causal sdpa attention (no window, no ALiBi or relative
  bias, no QK-norm), learned, sinusoidal, rotary or no positions, and a ReLU, GELU, tanh-GELU or SwiGLU feed-forward;
- every projection is an fp32 `nn.Linear` (or `DecodeLinear`), a `BF16Linear` or an `Int8Linear` (q, k and v
  of one dtype; gate and up of one dtype), with d_model, d_ff and head_dim multiples of 8.

Anything else (a LoRA-wrapped or W8A8 layer, a paged cache, a batch) takes the module-by-module path. Each swap
is a subclass of the model's module holding the same children and parameters: the model itself has no hooks
and knows nothing of this file. The layer
descriptions hold addresses, remade whenever a weight's or the cache's storage changes (`.to()`, a new layer).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.infer import kernels
from lmforge.infer.kv_cache import ContiguousKVCache
from lmforge.infer.quantize import BF16Linear, Int8Linear
from lmforge.model.attention import Attention, AttentionContext
from lmforge.model.layers import MLP, RMSNorm, SwiGLU
from lmforge.model.transformer import Blocks


class DecodeLinear(nn.Linear):
    """nn.Linear whose calls on a few rows run in the GEMV kernel (same weight, same state dict)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DecodeLinear:
        fast = cls.__new__(cls)
        fast.__dict__.update(linear.__dict__)  # the same parameters, hooks and flags: nothing is copied
        fast.plan = None
        return fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self._parameters  # read directly: nn.Module's attribute lookup costs µs, ~70 times a step
        weight, bias = params["weight"], params["bias"]
        if kernels.gemv_applies(x, self.in_features):
            self.plan = kernels.current_plan(self.plan, [(weight, None, bias)])
            return self.plan(x)
        return F.linear(x, weight, bias)


class FusedAttention(Attention):
    """An `Attention` whose q, k and v come from one GEMV call over its wq, wk, wv, outputs side by side: one
    parallel region and one Python call instead of three. It reads its children at every call, so a projection
    replaced later (quantized, LoRA-wrapped) is never read stale: when any of them is no longer a plain
    `DecodeLinear`, or the input does not suit the kernel, the three projections run one by one."""

    @classmethod
    def from_attention(cls, attention: Attention) -> FusedAttention:
        fused = cls.__new__(cls)
        fused.__dict__.update(attention.__dict__)  # the same children, parameters and hooks: nothing is copied
        fused.kernel = getattr(fused, attention.kernel.__name__)  # the bound kernel method, rebound to `fused`
        fused.qkv_plan = None
        return fused

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        children = self._modules["wq"], self._modules["wk"], self._modules["wv"]
        if any(type(c) is not DecodeLinear for c in children) or not kernels.gemv_applies(x, x.shape[-1]):
            return super().project_qkv(x)
        self.qkv_plan = kernels.current_plan(self.qkv_plan, [(c._parameters["weight"], None, c._parameters["bias"])
                                                             for c in children])  # fmt: skip
        cfg = self.cfg
        return self.qkv_plan(x).split((cfg.q_dim, cfg.kv_dim, cfg.kv_dim), -1)


class FusedBlocks(Blocks):
    """The model's `Blocks`, whose batch-1 steps of a few tokens run every layer in one C call (`FusedDecode`)
    where that applies, and block by block otherwise."""

    @classmethod
    def from_blocks(cls, blocks: Blocks) -> FusedBlocks:
        fused = cls.__new__(cls)
        fused.__dict__.update(blocks.__dict__)  # the same blocks (state dict keys unchanged)
        fused.fused_step = FusedDecode()
        return fused

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        out = self.fused_step(self, x, ctx)
        return out if out is not None else super().forward(x, ctx)


@torch.no_grad()
def optimize_for_decode(model: nn.Module) -> nn.Module:
    """Make every plain fp32 `nn.Linear` of the model a `DecodeLinear`, every `Attention` a `FusedAttention` and
    every `Blocks` a `FusedBlocks`, in place: child modules are swapped for subclasses sharing their parameters,
    nothing else of the model changes. A tied LM head stays tied (the module keeps its weight Parameter).
    Without the kernels (no AVX2 or no C compiler) the model is unchanged."""
    if not kernels.available():
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.is_contiguous():
                setattr(parent, name, DecodeLinear.from_linear(child))
            elif type(child) is Attention:
                setattr(parent, name, FusedAttention.from_attention(child))
            elif type(child) is Blocks:
                setattr(parent, name, FusedBlocks.from_blocks(child))
    return model


# ---- every layer of a step in one C call -------------------------------------------------------------------

F32, BF16, I8 = 0, 1, 2  # layer.c's enums
NORMS = {nn.LayerNorm: 0, RMSNorm: 1}
ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "swiglu": 3}


class _Matrix(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_long), ("out", ctypes.c_long), ("weight", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p)]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = (
        [(name, ctypes.c_long) for name in ("d", "n_head", "n_kv_head", "head_dim", "d_ff", "norm", "act")]
        + [("eps", ctypes.c_float)]
        + [(name, ctypes.c_void_p) for name in ("norm1_w", "norm1_b", "norm2_w", "norm2_b")]
        + [(name, _Matrix) for name in ("q", "k", "v", "o", "up", "gate", "down")]
    )


def _matrix(module: nn.Module) -> tuple | None:
    """(dtype code, weight, scale, bias) of a projection layer.c can read, else None."""
    kind = type(module)
    if kind in (nn.Linear, DecodeLinear):  # (not a subclass with its own forward, such as a LoRA layer)
        w, b = module._parameters["weight"], module._parameters["bias"]
        return (F32, w, None, b) if w.dtype == torch.float32 and w.is_contiguous() else None
    if kind is BF16Linear:
        return BF16, module._buffers["weight"], None, module._buffers["bias"]
    if kind is Int8Linear:
        return I8, module._buffers["weight"], module._buffers["scale"], module._buffers["bias"]
    return None


def _block_modules(block: nn.Module) -> tuple:
    """(norm1, norm2, wq, wk, wv, wo, up, gate, down) of a block: what a fused step reads (gate None without one)."""
    blocks, attn, ffn = block._modules, block._modules["attn"]._modules, block._modules["ffn"]._modules
    return (blocks["norm1"], blocks["norm2"], attn["wq"], attn["wk"], attn["wv"], attn["wo"], ffn.get("up"),
            ffn.get("gate"), ffn.get("down"))  # fmt: skip


def _layer_parts(block: nn.Module, act: int) -> list | None:
    """[(norm code, eps), norm tensors, matrices] of one block in layer.c's order, or None when it has a part
    layer.c cannot run."""
    norm1, norm2, *projections = _block_modules(block)
    gated = act == ACTIVATIONS["swiglu"]
    if type(norm1) not in NORMS or type(norm2) is not type(norm1) or type(block.ffn) is not (SwiGLU if gated else MLP):
        return None
    matrices = [None if m is None else _matrix(m) for m in projections]
    if any(matrix is None for m, matrix in zip(projections, matrices) if m is not None):
        return None
    q, k, v, o, up, gate, down = matrices
    if len({q[0], k[0], v[0]}) != 1 or (gate is not None and gate[0] != up[0]):
        return None
    norms = [norm1.weight, getattr(norm1, "bias", None), norm2.weight, getattr(norm2, "bias", None)]
    return [(NORMS[type(norm1)], norm1.eps), *norms, *matrices]


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _fingerprint(blocks: Blocks) -> tuple:
    """The modules a fused step reads and the addresses of their tensors: equal between two steps exactly when the
    layer descriptions still hold (a replaced layer is a new module; `.to()` or `param.data = ...` a new address).
    Cheap (~0.1 ms for GPT-2's 12 layers): building and checking the descriptions anew took ~0.5 ms."""
    modules = tuple(m for block in blocks for m in _block_modules(block))
    tensors = (t for m in modules if m is not None for t in (*m._parameters.values(), *m._buffers.values()))
    return modules, tuple(t.data_ptr() for t in tensors if t is not None)


class FusedDecode:
    """`FusedBlocks`' step: (blocks, x [1, m, d], ctx) -> x after every block, or None (then the blocks run one by
    one). m ≤ kernels.MAX_ROWS new tokens right after what the cache holds: a decode step, a speculative
    verification."""

    def __init__(self):
        self.fingerprint = None  # `_fingerprint` of the model the layer descriptions were made for
        self.layers = None  # the descriptions, or None where a layer cannot run fused

    def __call__(self, blocks: Blocks, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        cfg = blocks.cfg
        if (
            x.shape[0] != 1
            or x.shape[1] > kernels.MAX_ROWS
            or x.dtype != torch.float32
            or blocks.training
            or torch.is_grad_enabled()
            or not ctx.follows_cache
            or ctx.bias is not None
            or cfg.norm_position != "pre"
            or cfg.attention != "sdpa"
            or cfg.window
            or cfg.qk_norm  # (layer.c has no per-head norm)
            or cfg.ffn not in ACTIVATIONS
            or cfg.d_model % 8
            or cfg.d_ff % 8
            or cfg.head_dim % 8
            or cfg.head_dim > kernels.MAX_HEAD_DIM
            or not kernels.available()
        ):
            return None
        buffers = ctx.cache.decode_buffers() if isinstance(ctx.cache, ContiguousKVCache) else None
        if buffers is None:
            return None
        k_cache, v_cache, slot = buffers
        if k_cache.shape[2:] != (cfg.n_kv_head, k_cache.shape[3], cfg.head_dim) or len(k_cache) != cfg.n_layer:
            return None
        fingerprint = _fingerprint(blocks)
        if fingerprint != self.fingerprint:
            act = ACTIVATIONS[cfg.ffn]
            parts = [_layer_parts(block, act) for block in blocks]
            self.layers = None if any(p is None for p in parts) else self._describe(cfg, parts, act)
            self.fingerprint = fingerprint
        if self.layers is None:
            return None
        if ctx.rope is not None:
            cos, sin = (t.contiguous() for t in ctx.rope)  # [1, 1, m, head_dim]
            rope = cos.data_ptr(), sin.data_ptr()
        else:
            rope = None, None
        m = x.shape[1]
        x = x.clone(memory_format=torch.contiguous_format)  # the kernel writes the residual stream in place
        work = torch.empty(m * (cfg.d_model + 3 * cfg.q_dim + 2 * cfg.kv_dim + 3 * cfg.d_ff))
        kernels._library().decode_layers(cfg.n_layer, ctypes.byref(self.layers), x.data_ptr(), m, k_cache.data_ptr(),
                                         v_cache.data_ptr(), k_cache.shape[3], slot, *rope,
                                         work.data_ptr())  # fmt: skip
        return x

    @staticmethod
    def _describe(cfg, parts: list, act: int) -> ctypes.Array:
        layers = (_Layer * cfg.n_layer)()
        for layer, ((norm, eps), w1, b1, w2, b2, *matrices) in zip(layers, parts):
            layer.d, layer.n_head, layer.n_kv_head = cfg.d_model, cfg.n_head, cfg.n_kv_head
            layer.head_dim, layer.d_ff, layer.norm, layer.act, layer.eps = cfg.head_dim, cfg.d_ff, norm, act, eps
            layer.norm1_w, layer.norm1_b, layer.norm2_w, layer.norm2_b = map(_address, (w1, b1, w2, b2))
            for name, m in zip(("q", "k", "v", "o", "up", "gate", "down"), matrices):
                if m is not None:
                    dtype, w, scale, bias = m
                    setattr(layer, name, _Matrix(dtype, w.shape[0], w.data_ptr(), _address(scale), _address(bias)))
        return layers
