"""Estimators for planning a run: training FLOPs and the compute-optimal size, time and cost on a given
accelerator, training memory per rank, serving memory (weights + KV cache) and what fits. Pure arithmetic on a
`ModelConfig` and a few numbers; `lmforge plan` (plan.py) prints them, tests/scaling/test_estimate.py checks
them, and `python -m benchmarks.scaling_memory` compares the training-memory estimate with measured steps.

    from lmforge.scaling.estimate import compute_optimal, training_memory
    n, d = compute_optimal(1e20)                   # 0.91e9 parameters, 18.3e9 tokens (20 tokens/parameter)
    training_memory(cfg, micro_batch=8, seq_len=256, precision="bf16").total

Conventions. N counts every parameter, embeddings included, as Chinchilla does (Hoffmann et al. 2022); D is
training tokens; C = 6·N·D FLOPs for the budget arithmetic (Kaplan et al. 2020, §2.1). The per-token count of
one config is `ModelConfig.flops_per_token` (PaLM's 6N' + 12·L·H·Q·T, which leaves lookup tables out and adds
attention). Bytes are bytes; "GiB" is 2^30 bytes and accelerator memory is the datasheet's figure in GiB.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from lmforge.config import UserError
from lmforge.hardware import COMPUTE_DTYPES, DTYPES, NOMINAL_PEAKS, OTHER_PEAKS, QUANT_SCHEMES, dtype_bytes
from lmforge.model.config import ModelConfig

TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022: ~20 tokens per parameter on their compute-optimal frontier
GiB = 2**30


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number, got {value!r}")


# ---- FLOPs and the compute-optimal size --------------------------------------------------------------------


def flops_6nd(params: float, tokens: float) -> float:
    """Training FLOPs C = 6·N·D: 2 per parameter per token forward, 4 backward (Kaplan et al. 2020, §2.1)."""
    _positive(params=params, tokens=tokens)
    return 6.0 * params * tokens


def training_flops(cfg: ModelConfig, tokens: float, seq_len: int | None = None) -> float:
    """FLOPs to train `cfg` on `tokens` tokens at context `seq_len`: tokens × `cfg.flops_per_token(seq_len)`
    (6N + 12·L·H·Q·T, Chowdhery et al. 2022, PaLM App. B)."""
    _positive(tokens=tokens)
    return tokens * cfg.flops_per_token(seq_len)


def compute_optimal(compute: float, tokens_per_param: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) for a budget of `compute` FLOPs with C = 6·N·D and D = r·N: N = √(C / 6r), D = r·N. With r = 20
    this is the rule of thumb read off Hoffmann et al. 2022 (Table 3 runs at 20-22 tokens per parameter); the fitted
    frontier is `ChinchillaLaw.optimal` (their eq. 4)."""
    _positive(compute=compute, tokens_per_param=tokens_per_param)
    n = math.sqrt(compute / (6.0 * tokens_per_param))
    return n, tokens_per_param * n


# ---- accelerators, time and cost ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense FLOP/s in the training dtype
    memory_bytes: float
    source: str


def _accelerator_table() -> dict[str, dict]:
    return {**NOMINAL_PEAKS, **OTHER_PEAKS}  # one table of datasheet figures (lmforge.hardware), shared with MFU


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


ALIASES = {"h100": "H100 SXM", "a10080gb": "A100", "tpu": "TPU v4"}


def accelerator(
    name: str, *, dtype: str = "bf16", peak_tflops: float | None = None, memory_gib: float | None = None
) -> Accelerator:
    """An accelerator from the datasheet table (`lmforge.hardware.NOMINAL_PEAKS` and `OTHER_PEAKS`): "h100",
    "H100 PCIe", "a100-40gb", "tpu-v4", ... `peak_tflops` / `memory_gib` override the datasheet (or describe an
    accelerator not in it: name "custom" with both given)."""
    table = _accelerator_table()
    labels = {_key(label): label for label in table} | {_key(a): label for a, label in ALIASES.items()}
    label = labels.get(_key(name))
    if label is None and not (peak_tflops and memory_gib):
        raise UserError(
            f"unknown accelerator {name!r}: use one of {', '.join(sorted(table))} (case and dashes do not "
            "matter), or give both --peak-tflops and --memory-gib"
        )
    entry = table.get(label, {})
    if peak_tflops is None and entry.get(dtype) is None:
        raise UserError(f"{label} has no datasheet {dtype} peak: give --peak-tflops")
    peak = peak_tflops if peak_tflops is not None else entry[dtype]
    memory = memory_gib if memory_gib is not None else entry["memory_gib"]
    _positive(peak_tflops=peak, memory_gib=memory)
    source = entry.get("source", "user figures")
    if label is not None and (peak_tflops is not None or memory_gib is not None):
        source += " (overridden)"
    return Accelerator(label or name, peak * 1e12, memory * GiB, source)


@dataclass(frozen=True)
class TrainingTime:
    flops: float
    accelerator_hours: float  # GPU-hours (chip-hours for a TPU)
    wall_hours: float
    n_accelerators: int
    mfu: float
    cost: float | None  # accelerator_hours × price per hour, when a price is given


def training_time(
    flops: float, acc: Accelerator, *, mfu: float = 0.4, n_accelerators: int = 1, price_per_hour: float | None = None
) -> TrainingTime:
    """GPU-hours = FLOPs / (peak × MFU × 3600); wall-clock hours = GPU-hours / k accelerators (perfect scaling:
    MFU is the measured or assumed utilisation *at* that scale); cost = GPU-hours × price per GPU-hour. MFU as
    Chowdhery et al. 2022 define it (PaLM, §4.1: 540B trained at 46%); measure yours with `lmforge.train.mfu`."""
    _positive(flops=flops, mfu=mfu, n_accelerators=n_accelerators)
    if price_per_hour is not None:
        _positive(price_per_hour=price_per_hour)
    if mfu > 1:
        raise ValueError(f"mfu is a fraction of peak (0.4 = 40%), got {mfu}")
    hours = flops / (acc.peak_flops * mfu * 3600)
    cost = None if price_per_hour is None else hours * price_per_hour
    return TrainingTime(flops, hours, hours / n_accelerators, n_accelerators, mfu, cost)


# ---- training memory ---------------------------------------------------------------------------------------


def korthikanti_activation_bytes(
    seq_len: int, micro_batch: int, d_model: int, n_head: int, n_layer: int, recompute: str = "none"
) -> float:
    """Activation bytes of a Megatron GPT in 16-bit with dropout (Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models", eq. 1 and §5): per layer s·b·h·(34 + 5·a·s/h) with nothing
    recomputed, 34·s·b·h with selective recomputation of attention, 2·s·b·h with full recomputation (the layer
    input alone). A reference point: `training_memory` derives lmforge's own tensors instead."""
    sbh = seq_len * micro_batch * d_model
    per_layer = {"none": sbh * (34 + 5 * n_head * seq_len / d_model), "selective": 34 * sbh, "full": 2 * sbh}
    if recompute not in per_layer:
        raise ValueError(f"recompute must be none, selective or full, got {recompute!r}")
    return n_layer * per_layer[recompute]


def _matmul_params(cfg: ModelConfig) -> int:
    """Weights of one block's linear layers (what autocast casts to 16-bit, once per forward)."""
    n_mats = 3 if cfg.ffn == "swiglu" else 2
    return 2 * cfg.d_model * (cfg.q_dim + cfg.kv_dim) + n_mats * cfg.d_model * cfg.d_ff


def layer_activations(
    cfg: ModelConfig, seq_len: int, precision: str = "bf16", device: str = "cuda"
) -> dict[str, float]:
    """Bytes per token that one lmforge block saves for backward, by tensor group: what autograd keeps, read
    off the code (model/transformer.py, attention.py, layers.py) and checked tensor by tensor with
    `saved_tensors_hooks`. Differences from Korthikanti et al.'s GPT count: the residual stream stays fp32 under
    autocast (fp32 embeddings, fp32 + bf16 adds), norms run in fp32 and each linear saves its own bf16 cast of
    the norm output (3 for q, k, v); sdpa (flash / memory-efficient kernels) keeps only a log-sum-exp per head,
    no s×s scores; dropout 0 keeps no masks. precision: "fp32" (no autocast) or "bf16"/"fp16" autocast.
    device "cuda": a dropout mask is one bool per element (the fused kernel), and sdpa's flash kernel handles
    attention dropout itself; elsewhere (CPU) a mask is kept in its input's dtype and sdpa with dropout falls
    back to the math kernel, which saves the scores as the naive one does. Sliding-window, block-sparse and
    linear attention are counted as sdpa (their chunked buffers are not modelled)."""
    if precision not in COMPUTE_DTYPES:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    a, d, mixed = dtype_bytes(precision), cfg.d_model, precision != "fp32"  # a matmul output's bytes
    dropout = cfg.dropout > 0
    mask = 1 if device == "cuda" else a  # bytes per element of a dropout mask
    stats = 4 if cfg.norm == "rmsnorm" else 8  # rstd (and mean): fp32 per token
    normed = 4 * d if cfg.norm == "rmsnorm" else 0  # RMSNorm's weight·normed is a separate mul: normed is saved

    def linear_inputs(readers: int) -> float:  # fp32: one tensor all readers share; autocast: one cast each
        return readers * 2 * d if mixed else 4 * d

    ffn_readers, ffn = (2, 4) if cfg.ffn == "swiglu" else (1, 2 if cfg.ffn.startswith("gelu") else 1)
    # Pre-norm: the block input (saved by norm 1) and x + attn (saved by norm 2); post-norm: the two sums, which
    # its norms save, while the block input and norm 1's output reach the linears only: the same count.
    out = {"residual": 2 * 4 * d, "norms": 2 * (stats + normed)}
    out["attention inputs"], out["ffn inputs"] = linear_inputs(3), linear_inputs(ffn_readers)
    out["q k v, output"] = a * (2 * cfg.q_dim + 2 * cfg.kv_dim) + 4 * cfg.n_head  # + log-sum-exp per head
    if cfg.attention == "naive" or (dropout and device != "cuda" and cfg.attention == "sdpa"):
        # q·kᵀ saves k and v repeated to every query head and the output is copied to [B, T, H·hd]; then the
        # fp32 softmax output, and its 16-bit cast or its dropout (mask + output) for the matmul with v
        out["q k v, output"] = a * 4 * cfg.q_dim
        out["scores"] = cfg.n_head * seq_len * (4 + (mask + a if dropout else 2 if mixed else 0))
    out["ffn hidden"] = ffn * a * cfg.d_ff
    if dropout:
        out["dropout masks"] = 2 * mask * d  # of the attention and ffn outputs
    return out  # plus, per block rather than per token, the 16-bit weight casts (training_memory)


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per rank at the estimated peak, by the category torch's MemTracker uses, and where it occurs."""

    weights: float
    gradients: float  # alive at the peak (all of them from the end of backward on, or with accumulation)
    optimizer: float
    activations: float  # saved for backward (and autocast's weight casts) at the peak
    temporary: float  # backward's transient gradients at the peak
    total: float
    phase: str  # when the peak occurs
    per_layer: float  # activation bytes one block saves (micro-batch × seq_len tokens)
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def training_memory(
    cfg: ModelConfig,
    *,
    micro_batch: int,
    seq_len: int | None = None,
    precision: str = "bf16",
    checkpointing: bool = False,
    ranks: int = 1,
    sharding: str = "ddp",
    grad_accumulation: int = 1,
    device: str = "cuda",
) -> TrainingMemory:
    """Peak memory of one lmforge training step per rank: AdamW on fp32 weights (autocast keeps the fp32
    weights as the master copy: 4 + 4 grads + 8 Adam moments = 16 bytes/parameter, the same 16 as ZeRO's
    2 + 2 + 12 for mixed precision, Rajbhandari et al. 2020), plus activations. The peak is the largest of:

    - forward end (autocast on): everything saved, logits being turned into log-probs, with checkpointing the
      autocast cache of every block's 16-bit weights;
    - loss backward: everything saved + two fp32 b·s·V gradients of the log-softmax;
    - backward of block l (each l): what blocks ≤ l saved (with checkpointing: their inputs + block l recomputed)
      + gradients of the head and the blocks above + block l's transient gradients;
    - optimizer step: all gradients (+ the unfused CPU AdamW's parameter-sized temporaries).

    sharding "ddp": weights, gradients and Adam replicated (DDP adds bucket copies of the gradients when
    ranks > 1); "fsdp" (FSDP2 / ZeRO-3): all three divided by ranks, plus the gathered root (embedding, head)
    and two gathered blocks (current + prefetched). grad_accumulation > 1 keeps gradients alive through later
    micro-batches. device "cuda": lmforge's fused AdamW, bool dropout masks (see `layer_activations`); "cpu":
    the for-loop AdamW, masks in the activation dtype."""
    seq_len = seq_len or cfg.max_seq_len
    _positive(micro_batch=micro_batch, seq_len=seq_len, ranks=ranks, grad_accumulation=grad_accumulation)
    if sharding not in ("ddp", "fsdp"):
        raise ValueError(f"sharding must be ddp or fsdp, got {sharding!r}")
    mixed = precision != "fp32"
    per_token = layer_activations(cfg, seq_len, precision, device)
    a, d, V, L = dtype_bytes(precision), cfg.d_model, cfg.vocab_size, cfg.n_layer
    tokens = micro_batch * seq_len
    counts = cfg.param_counts()
    n_params, block_params = counts["total"], counts["blocks"] / L
    casts_block = 2 * _matmul_params(cfg) if mixed else 0  # bf16 weights saved by each linear's backward
    head_cast = 2 * V * d if mixed else 0
    block_saved = sum(per_token.values()) * tokens + casts_block  # block input included (residual)

    # Saved once per forward and kept to the end of backward: token ids and targets (int64), rope's cos/sin, the
    # naive kernel's [B, 1, s, s] mask, the embedding dropout's mask.
    persistent = 16 * tokens
    if cfg.position == "rope":
        persistent += 2 * 4 * cfg.head_dim * tokens
    if cfg.attention == "naive":
        persistent += micro_batch * seq_len * seq_len
    if cfg.dropout > 0:
        persistent += (1 if device == "cuda" else 4) * d * tokens
    # The head, freed once its backward is done: the last hidden state and the final norm (pre-norm), the head's
    # input (fp32, or its 16-bit cast) and 16-bit weight, the fp32 log-softmax the loss saves.
    head_in = (2 * d if mixed else 4 * d) * tokens
    norm_f = 4 * d + (4 + 4 * d if cfg.norm == "rmsnorm" else 8) if cfg.norm_position != "post" else 0
    head = head_in + norm_f * tokens + head_cast + 4 * V * tokens
    block_input = 4 * d * tokens
    if checkpointing:  # only each block's input survives the forward (transformer.py: Block.checkpoint)
        saved_all = persistent + head + L * block_input
    else:
        saved_all = persistent + head + L * block_saved

    grads_all = 4 * n_params
    weights, optimizer = 4 * n_params, 8 * n_params
    gathered = 0.0
    if sharding == "fsdp":
        weights, optimizer, grads_all = weights / ranks, optimizer / ranks, grads_all / ranks
        gathered = 4 * (n_params - counts["blocks"]) + 2 * 4 * block_params
    ddp_buckets = 4 * n_params if sharding == "ddp" and ranks > 1 else 0  # gradient_as_bucket_view=False
    head_grad = 4 * V * d / (ranks if sharding == "fsdp" else 1)
    block_grad = 4 * block_params / (ranks if sharding == "fsdp" else 1)
    held = grads_all if grad_accumulation > 1 else 0.0  # earlier micro-batches' gradients

    logits = (4 * V if not mixed else (2 + 4) * V) * tokens  # bf16 logits and their fp32 copy
    phases: dict[str, tuple[float, float, float]] = {}  # phase -> (activations, temporary, gradients)
    cache = L * casts_block if checkpointing else 0  # autocast caches the casts until the forward ends
    phases["forward end"] = (saved_all + cache, logits, held)
    phases["loss backward"] = (saved_all, 2 * 4 * V * tokens, held)
    # A block's backward peaks in its FFN: the fp32 gradient of the block output, the down-projection's weight
    # gradient, and two hidden-sized gradients beyond what the block saved: the activation's input and output
    # gradients while ReLU still holds its output, or SwiGLU's two factor gradients (three, less the product it
    # freed); GELU frees its output before its backward, so one.
    hidden_grads = 1 if cfg.ffn.startswith("gelu") else 2
    transient = (4 * d + hidden_grads * a * cfg.d_ff) * tokens + (6 if mixed else 4) * d * cfg.d_ff
    for layer in range(L - 1, -1, -1):
        below = (layer + 1) * block_input + block_saved - block_input if checkpointing else (layer + 1) * block_saved
        grads = max(held, head_grad + (L - 1 - layer) * block_grad)
        phases[f"backward, block {layer}"] = (persistent + below, transient, grads)
    # The unfused (CPU) AdamW makes two parameter-sized temporaries for the denominator, one parameter at a time.
    opt_temp = 0 if device == "cuda" else 2 * 4 * max(V * d, cfg.d_model * cfg.d_ff, cfg.d_model * cfg.q_dim)
    phases["optimizer step"] = (0.0, opt_temp, grads_all)

    fixed = weights + optimizer + ddp_buckets + gathered
    phase = max(phases, key=lambda p: sum(phases[p]))
    acts, temp, grads = phases[phase]
    return TrainingMemory(
        weights=weights + gathered,
        gradients=grads + ddp_buckets,
        optimizer=optimizer,
        activations=acts,
        temporary=temp,
        total=fixed + acts + temp + grads,
        phase=phase,
        per_layer=block_saved,
        detail={
            "tokens": tokens,
            "per_token_per_layer": per_token,
            "weight_casts_per_layer": casts_block,
            "checkpointed_inputs": L * block_input if checkpointing else 0,
            "persistent": persistent,
            "head": head,
            "fsdp_gathered": gathered,
            "ddp_buckets": ddp_buckets,
            "phases": {p: sum(v) + fixed for p, v in phases.items()},
        },
    )


# ---- serving: weights, KV cache, what fits -----------------------------------------------------------------


def _linears(cfg: ModelConfig) -> list[tuple[int, int, bool]]:
    """(in, out, bias) of every layer `quantize_model` replaces: each block's linears, then the LM head."""
    d, b = cfg.d_model, cfg.bias
    attn = [(d, cfg.q_dim, b), (d, cfg.kv_dim, b), (d, cfg.kv_dim, b), (cfg.q_dim, d, b)]
    ffn = [(d, cfg.d_ff, b)] * (2 if cfg.ffn == "swiglu" else 1) + [(cfg.d_ff, d, b)]
    return (attn + ffn) * cfg.n_layer + [(d, cfg.vocab_size, False)]


def quantized_linear_bytes(fan_in: int, fan_out: int, bias: bool, scheme: str, group_size: int = 64) -> int:
    """Bytes of one layer as lmforge.infer.quantize stores it (its `nbytes`): int8 / w8a8 one int8 per weight +
    an fp32 scale per output channel; int4 two weights a byte over inputs padded to whole groups + per group an
    fp32 scale and a uint8 zero point; bf16 two bytes a weight. Biases stay fp32."""
    out = 4 * fan_out if bias else 0
    if scheme in ("int8", "w8a8"):
        return out + fan_out * (fan_in + 4)
    if scheme == "int4":
        groups = math.ceil(fan_in / group_size)
        return out + fan_out * (groups * group_size // 2) + fan_out * groups * (4 + 1)
    if scheme == "bf16":
        return out + 2 * fan_out * fan_in
    raise ValueError(f"unknown quantization scheme {scheme!r}: use one of {', '.join(QUANT_SCHEMES)}")


def weight_bytes(cfg: ModelConfig, dtype: str = "bf16", quantize: str | None = None, group_size: int = 64) -> int:
    """Bytes of the weights for serving: every parameter in `dtype`; or, with `quantize`, lmforge's layout
    (`quantize_model`): the blocks' linears and the LM head quantized (a tied head becomes an untied quantized
    copy), embeddings and norms left in `dtype` — what `quantization_report(...)["model_bytes"]` reports."""
    counts = cfg.param_counts()
    if quantize is None:
        return counts["total"] * dtype_bytes(dtype)
    linears = _linears(cfg)
    replaced = sum(i * o + (o if b else 0) for i, o, b in linears[:-1])
    replaced += 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model  # a tied head's weight stays as embedding
    rest = (counts["total"] - replaced) * dtype_bytes(dtype)
    return rest + sum(quantized_linear_bytes(i, o, b, quantize, group_size) for i, o, b in linears)


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str = "bf16", model_dtype: str = "bf16") -> float:
    """K and V of every layer for one token of one sequence: 2 · L · n_kv_head · head_dim · bytes — MHA, GQA and
    MQA differ only in n_kv_head. int8 adds what lmforge's KVStore keeps: one scale per token and head for K and
    for V, in the model's dtype. fp8 is 1 byte with a per-tensor scale (engines such as vLLM; lmforge's caches
    store fp32, bf16, fp16 or int8). Linear attention keeps a fixed-size state instead: 0 per token."""
    if cfg.attention == "linear":
        return 0.0
    per_value = 2 * cfg.n_layer * cfg.n_kv_head
    scales = per_value * dtype_bytes(model_dtype) if kv_dtype == "int8" else 0
    return per_value * cfg.head_dim * dtype_bytes(kv_dtype) + scales


def kv_cache_bytes(
    cfg: ModelConfig, context: int, batch: int = 1, kv_dtype: str = "bf16", model_dtype: str = "bf16"
) -> float:
    """KV cache of `batch` sequences of `context` tokens (linear attention: its S, z state per layer and head)."""
    _positive(context=context, batch=batch)
    if cfg.attention == "linear":
        return cfg.n_layer * batch * cfg.n_head * (cfg.head_dim**2 + cfg.head_dim) * dtype_bytes(model_dtype)
    return context * batch * kv_bytes_per_token(cfg, kv_dtype, model_dtype)


@dataclass(frozen=True)
class ServingMemory:
    weights: float  # per accelerator
    kv_per_token: float  # per accelerator
    kv_cache: float  # at context × batch, per accelerator
    usable: float  # memory × (1 - reserve)
    fits: bool
    max_batch: int | None  # at `context` (None: the cache does not grow with tokens)
    max_context: int | None  # at `batch`

    def to_dict(self) -> dict:
        return asdict(self)


def serving_memory(
    cfg: ModelConfig,
    memory_bytes: float,
    *,
    context: int,
    batch: int = 1,
    dtype: str = "bf16",
    quantize: str | None = None,
    kv_dtype: str | None = None,
    group_size: int = 64,
    reserve: float = 0.1,
    shards: int = 1,
) -> ServingMemory:
    """Weights + KV cache against an accelerator's memory, keeping `reserve` (a fraction) back for activations,
    the allocator's fragmentation and the runtime; `shards` accelerators split weights and cache evenly (tensor
    parallel). The largest batch at `context` and the longest context at `batch` that fit."""
    _positive(memory_bytes=memory_bytes, shards=shards)
    if not 0 <= reserve < 1:
        raise ValueError(f"reserve is a fraction of memory in [0, 1), got {reserve}")
    kv_dtype = kv_dtype or dtype
    weights = weight_bytes(cfg, dtype, quantize, group_size) / shards
    per_token = kv_bytes_per_token(cfg, kv_dtype, dtype) / shards
    cache = kv_cache_bytes(cfg, context, batch, kv_dtype, dtype) / shards
    usable = memory_bytes * (1 - reserve)
    free = usable - weights
    if per_token == 0:
        max_batch = max_context = None
    else:
        max_batch, max_context = max(0, int(free // (per_token * context))), max(0, int(free // (per_token * batch)))
    return ServingMemory(weights, per_token, cache, usable, weights + cache <= usable, max_batch, max_context)


@dataclass(frozen=True)
class KVExample:
    """A KV-cache product such as "128K context × 1024 × 40 layers × 2", read as elements."""

    context: int
    kv_dim: int
    n_layer: int
    batch: int
    elements: int
    bytes: dict[str, int]

    def lines(self) -> list[str]:
        e, gb = self.elements, lambda n: f"{n / 1e9:.1f} GB ({n / GiB:.1f} GiB)"
        batch = f" × batch {self.batch}" if self.batch > 1 else ""
        return [
            f"{self.context:,} tokens × kv_dim {self.kv_dim} × {self.n_layer} layers × 2 (K and V){batch} "
            f"= {e:,} elements ({e / 1e9:.1f}e9)",
            "that product counts elements, not bytes: read as bytes it assumes 1 byte per element (int8 / fp8 KV)",
            *(f"  {k:<5} {DTYPES[k].bytes} B/element → {gb(self.bytes[k])}" for k in ("fp32", "bf16", "int8")),
            f"bf16/fp16 (2 bytes) is the usual cache: {gb(self.bytes['bf16'])} per "
            f"{'batch' if self.batch > 1 else 'sequence'}; a batch of B sequences needs B times that",
            "if the ×2 is read as fp16's 2 bytes instead, K alone is counted: V doubles it",
        ]


def kv_worked_example(context: int = 128 * 1024, kv_dim: int = 1024, n_layer: int = 40, batch: int = 1) -> KVExample:
    """The KV cache of `batch` sequences of `context` tokens for a model with `n_layer` layers and K/V width
    `kv_dim` (= n_kv_head · head_dim, e.g. 8 KV heads × 128): context · kv_dim · n_layer · 2 (K and V) elements,
    times bytes per element (see `kv_bytes_per_token` for one config)."""
    _positive(context=context, kv_dim=kv_dim, n_layer=n_layer, batch=batch)
    elements = context * kv_dim * n_layer * 2 * batch
    return KVExample(context, kv_dim, n_layer, batch, elements, {k: elements * d.bytes for k, d in DTYPES.items()})
