"""Weight quantization for `lmforge.model.Transformer`: every nn.Linear of the blocks, and the LM head, becomes a
smaller module; embeddings, norms and biases stay fp32.

    from lmforge.infer.quantize import load_quantized, quantization_report, quantize_model, save_quantized
    model = quantize_model(model, "w8a8")              # in place; or "int8", "int4" (group_size=64), "bf16"
    print(quantization_report(model.cfg, model))      # bytes of the quantized layers before and after
    save_quantized(model, "runs/tiny/model-w8a8.safetensors")
    model = load_quantized("runs/tiny/model-w8a8.safetensors")

Schemes (bytes per weight, scales included, against 4 for fp32):
    int8  weight-only int8, one symmetric scale per output channel (~1). Decode steps (one row) run in lmforge's
          GEMV kernel, which widens the int8 weights to fp32 in registers: the fastest path on AVX2 CPUs
          (`lmforge.infer.kernels`); longer inputs dequantize and multiply in fp32.
    w8a8  int8 weights and int8 activations quantized per token at run time, multiplied in fbgemm (~1). Fast
          where the CPU has VNNI (AVX-512); on AVX2 slower than int8's kernel.
    int4  weight-only int4 per group of `group_size` inputs, scale + zero point, two values a byte (~0.58 at
          g=64). Dequantized on every call: for memory, not speed.
    bf16  weights in bf16 (2). Decode steps widen them to fp32 in the GEMV kernel (half fp32's bytes to read);
          longer inputs multiply in bf16, slow on CPUs without native bf16 (AVX2).
A tied LM head becomes an untied quantized copy (it is 31% of GPT-2's weight bytes); the embedding stays fp32.
Quantize a model in the dtype it will run in: `.to(dtype)` afterwards would also cast the fp32 scales.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from lmforge.config import UserError, from_dict, to_dict
from lmforge.hardware import QUANT_SCHEMES
from lmforge.infer import kernels
from lmforge.model import ModelConfig, Transformer
from lmforge.runs import atomic_write_bytes

FORMAT = "lmforge.quantized"

__all__ = [
    "SCHEMES",
    "QuantizedLinear",
    "load_quantized",
    "quantization_report",
    "quantize_model",
    "save_quantized",
]


# ---- quantize / dequantize one weight matrix [out, in] ------------------------------------------------------
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w ≈ q · scale[row], q in [-127, 127]. -128 is left out so the grid is
    symmetric and the largest weight of each row lands exactly on ±127."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))  # an all-zero row: any scale works
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15], last dim even -> half as many bytes: the first half of the last dim in the low
    nibbles, the second half in the high ones. Halves rather than neighbours, so unpacking is one `cat` of two
    contiguous blocks; interleaving neighbours back (`stack`) measured ~5x slower here."""
    half = q.shape[-1] // 2
    return q[..., :half] | (q[..., half:] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.cat((packed & 15, packed >> 4), dim=-1)


def quantize_int4(weight: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` consecutive inputs of a row: w ≈ (q - zero) · scale, q in [0, 15].

    Asymmetric because a group's 16 levels then span its own [min, max] (step (max-min)/15) instead of a
    symmetric [-absmax, absmax] (step ≥ 2·absmax/15): finer for every group whose values are not balanced around
    zero, for one extra byte per group (GPTQ's and AWQ's default, llama.cpp's Q4_1). The range is widened to
    include 0 so the integer zero point lies in [0, 15] and rounding error stays within scale/2.
    Returns packed uint8 [out, in_padded/2], scale fp32 [out, groups], zero uint8 [out, groups]; inputs are
    zero-padded to a whole number of groups."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    groups = F.pad(w, (0, -in_features % group_size)).view(out_features, -1, group_size)
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp_(0, 15)
    q = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q).view(out_features, -1), scale, zero.to(torch.uint8)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int) -> torch.Tensor:
    out_features, n_groups = scale.shape
    q = unpack_int4(packed.view(out_features, n_groups, -1)).float()
    return q.sub_(zero[..., None]).mul_(scale[..., None]).view(out_features, -1)[:, :in_features]


# ---- the modules that replace nn.Linear ---------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """What every scheme shares: the replaced layer's shape and its bias, kept fp32. Subclasses hold the weight
    as buffers (so `state_dict` is the file format) and implement `set_weight`, `dequantize` and `forward`."""

    scheme = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 64):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.plan = None  # the GEMV kernel's view of the weights, made on the first decode step

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64) -> QuantizedLinear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        module.set_weight(linear.weight)
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        return module

    def set_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight as fp32 [out, in], as the forward pass sees it."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes held: weight, scales, zero points and bias."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def fp32_bytes(self) -> int:
        """Bytes of the fp32 nn.Linear this replaces."""
        return 4 * (self.in_features * self.out_features + (self.out_features if self.bias is not None else 0))

    def _gemv(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """A decode step's product in lmforge's GEMV kernel (call only where `kernels.gemv_applies`)."""
        buffers = self._buffers
        self.plan = kernels.current_plan(self.plan, [(buffers["weight"], scale, buffers["bias"])])
        return self.plan(x)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    scheme = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 64):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))

    def set_weight(self, weight: torch.Tensor) -> None:
        self.weight, self.scale = quantize_int8(weight)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.gemv_applies(x, self.in_features):  # a decode step: int8 rows widened in registers
            return self._gemv(x, self.scale)
        # More rows (or no kernel): dequantize, then matmul, with the per-channel scale applied to the output
        # ([.., out], not [out, in]). torch has no faster path: on an AVX2 CPU (2 cores, a 1-row input, 768x768 /
        # 3072x768 weights) torch._weight_int8pack_mm took 575 / 2400-2500 µs, this 117 / 460-1380 µs.
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale  # the fp32 scale, even for bf16 inputs
        return self._add_bias(y.to(x.dtype))


def _check_fbgemm() -> None:
    engine = torch.backends.quantized.engine
    if engine not in ("fbgemm", "x86"):
        raise UserError(
            f"w8a8 runs on fbgemm, but torch.backends.quantized.engine is {engine!r}: set it to 'x86' "
            f"(this build has {torch.backends.quantized.supported_engines}), or use scheme 'int8'"
        )


class W8A8Linear(QuantizedLinear):
    """int8 weights (per channel) x int8 activations (per token, at run time), multiplied by fbgemm's
    `quantized::linear_dynamic`. Memory holds only fbgemm's packed weight; `state_dict` holds the int8 weight and
    scales (`weight`, `scale`), which are packed again on load, as the packed blob is not a portable format.
    CPU only, as fbgemm is."""

    scheme = "w8a8"

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 64):
        super().__init__(in_features, out_features, bias)
        _check_fbgemm()
        self._pack(torch.zeros(out_features, in_features, dtype=torch.int8), torch.ones(out_features))

    def _pack(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        # linear_prepack takes only a qint8 per-channel tensor, whose creation warns that quantized dtypes are
        # deprecated (pytorch/pytorch#184982); there is no other way in, so that one warning is silenced here.
        zero_points = torch.zeros(q.shape[0], dtype=torch.long)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            qweight = torch._make_per_channel_quantized_tensor(q.cpu(), scale.cpu().double(), zero_points, 0)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)  # bias added by us, after rescaling

    def set_weight(self, weight: torch.Tensor) -> None:
        self._pack(*quantize_int8(weight))

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.int_repr(), qweight.q_per_channel_scales().float()

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(*self.int8_weight())

    def nbytes(self) -> int:
        return self.out_features * (self.in_features + 4) + (4 * self.out_features if self.bias is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1]).float()
        # reduce_range=True (7-bit activations): AVX2's u8·s8 pair multiply-add (vpmaddubsw) saturates int16 with
        # full 8-bit ones; measured here, a 32->64 layer's max error was 7.0 with reduce_range=False, 0.2 with it.
        if x.shape[0] == 1:  # one token (a decode step): fbgemm's one grid per input is already per token
            y = torch.ops.quantized.linear_dynamic(x, self._packed, True)
        else:
            # fbgemm quantizes its whole input with one scale and zero point. Dividing each token by its own
            # absmax first makes that one grid fit every token, i.e. per-token scales, so an outlier token in a
            # prompt does not coarsen all the others.
            amax = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-30)
            y = torch.ops.quantized.linear_dynamic(x / amax, self._packed, True).mul_(amax)
        return self._add_bias(y.to(dtype).view(*shape[:-1], self.out_features))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        destination[prefix + "weight"], destination[prefix + "scale"] = self.int8_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        keys = {prefix + "weight", prefix + "scale"}
        if missing := sorted(keys - state_dict.keys()):
            missing_keys.extend(missing)
        else:
            q, scale = state_dict[prefix + "weight"], state_dict[prefix + "scale"]
            if q.shape != (self.out_features, self.in_features) or q.dtype != torch.int8:
                errors.append(f"{prefix}weight: expected int8 {(self.out_features, self.in_features)}, got "
                              f"{q.dtype} {tuple(q.shape)}")  # fmt: skip
            else:
                self._pack(q, scale.float())
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k not in keys}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)


class Int4Linear(QuantizedLinear):
    scheme = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 64):
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        n_groups = math.ceil(in_features / group_size)
        self.register_buffer("weight", torch.zeros(out_features, n_groups * group_size // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, n_groups))
        self.register_buffer("zero", torch.zeros(out_features, n_groups, dtype=torch.uint8))

    def set_weight(self, weight: torch.Tensor) -> None:
        self.weight, self.scale, self.zero = quantize_int4(weight, self.group_size)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.weight, self.scale, self.zero, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch 2.13 has no int4 CPU kernel that beats this at batch 1: torch._weight_int4pack_mm_for_cpu (g=32)
        # measured 2.8x slower than fp32 on an AVX-512 machine and ~8x on this AVX2 one; this is ~7-9x here.
        return self._add_bias(F.linear(x, self.dequantize().to(x.dtype)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class BF16Linear(QuantizedLinear):
    scheme = "bf16"

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 64):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.bfloat16))

    def set_weight(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach().to(torch.bfloat16, copy=True)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.gemv_applies(x, self.in_features):  # a decode step: bf16 widened to fp32 in registers
            return self._gemv(x)
        return self._add_bias(F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype))


# One module class per scheme name of lmforge.hardware.QUANT_SCHEMES (the CLI's choices, the planner's bytes): a
# name without a class fails here, at import, rather than when a user picks it.
_CLASSES = {cls.scheme: cls for cls in (Int8Linear, W8A8Linear, Int4Linear, BF16Linear)}
SCHEMES: dict[str, type[QuantizedLinear]] = {name: _CLASSES[name] for name in QUANT_SCHEMES}


def _scheme(scheme: str) -> type[QuantizedLinear]:
    if scheme not in SCHEMES:
        raise UserError(f"unknown quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    return SCHEMES[scheme]


# ---- whole models -------------------------------------------------------------------------------------------
def _linears(model: Transformer, include_lm_head: bool) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every nn.Linear of the blocks, then the LM head."""
    found = [
        (parent, name, child)
        for parent in model.blocks.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    if include_lm_head and isinstance(model.lm_head, nn.Linear):
        found.append((model, "lm_head", model.lm_head))
    return found


@torch.no_grad()
def quantize_model(
    model: Transformer, scheme: str, *, group_size: int = 64, include_lm_head: bool = True
) -> Transformer:
    """Replace every nn.Linear of `model`'s blocks, and its LM head, with a `scheme` module, in place; return
    `model`, with `model.quantization` recording what was done. A head tied to the token embedding becomes an
    untied quantized copy; the embedding itself stays fp32. `group_size` is int4's group (even, > 0)."""
    cls = _scheme(scheme)
    if group_size <= 0 or group_size % 2:
        raise UserError(f"group_size must be even and positive (two int4 values share a byte), got {group_size}")
    if getattr(model, "quantization", None):
        raise ValueError(f"model is already quantized ({model.quantization['scheme']}): quantize an fp32 model")
    for parent, name, linear in _linears(model, include_lm_head):
        setattr(parent, name, cls.from_linear(linear, group_size))
    model.quantization = {
        "scheme": scheme,
        "group_size": group_size if scheme == "int4" else None,
        "include_lm_head": include_lm_head,
    }
    return model


def _state_bytes(model: nn.Module) -> int:
    """Bytes of everything `state_dict` holds, each shared tensor (a tied head) counted once."""
    seen: dict[tuple[int, int], int] = {}
    for t in model.state_dict().values():
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


def quantization_report(reference: nn.Module | ModelConfig, quantized: nn.Module) -> dict:
    """Bytes of the quantized layers as fp32 and as stored now (scales, zero points and biases included), and of
    the whole model. `reference` is the fp32 model or its ModelConfig (a tied embedding/head counted once)."""
    layers = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        raise ValueError("the model has no quantized layers: call quantize_model(model, scheme) first")
    if getattr(reference, "quantization", None):  # the quantized model itself: fall back on its config
        reference = reference.cfg
    before = sum(m.fp32_bytes() for m in layers)
    after = sum(m.nbytes() for m in layers)
    model_before = reference.weight_bytes("float32") if isinstance(reference, ModelConfig) else _state_bytes(reference)
    model_after = _state_bytes(quantized)
    return {
        **getattr(quantized, "quantization", {}),
        "layers": len(layers),
        "fp32_bytes": before,
        "quantized_bytes": after,
        "ratio": after / before,
        "model_fp32_bytes": model_before,
        "model_bytes": model_after,
        "model_ratio": model_after / model_before,
    }


def save_quantized(model: Transformer, path: str | Path) -> Path:
    """Write `model` as one safetensors file, atomically; the metadata holds the scheme, the group size and the
    ModelConfig (JSON), so `load_quantized(path)` needs nothing else."""
    info = getattr(model, "quantization", None)
    if not info:
        raise ValueError("the model is not quantized: call quantize_model(model, scheme) first")
    state = model.state_dict()
    if isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.tok_emb.weight:
        del state["lm_head.weight"]  # a head left tied (include_lm_head=False): safetensors refuses shared tensors
    metadata = {
        "format": FORMAT,
        "scheme": info["scheme"],
        "group_size": json.dumps(info["group_size"]),
        "include_lm_head": json.dumps(info["include_lm_head"]),
        "model_config": json.dumps(to_dict(model.cfg)),
    }
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def load_quantized(path: str | Path) -> Transformer:
    """The model `save_quantized` wrote, in eval mode, with `model.quantization` set."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a quantized lmforge model (no format={FORMAT!r} in its metadata): give a "
                        "file written by save_quantized")  # fmt: skip
    cls = _scheme(meta["scheme"])
    group_size, include_lm_head = json.loads(meta["group_size"]), json.loads(meta["include_lm_head"])
    model = Transformer(from_dict(ModelConfig, json.loads(meta["model_config"])))
    for parent, name, linear in _linears(model, include_lm_head):
        setattr(parent, name, cls(linear.in_features, linear.out_features, linear.bias is not None, group_size or 64))
    state = load_file(str(path))
    if isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.tok_emb.weight:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state)
    model.quantization = {"scheme": cls.scheme, "group_size": group_size, "include_lm_head": include_lm_head}
    return model.eval()
