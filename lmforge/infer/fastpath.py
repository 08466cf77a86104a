"""The batch-1 decode path for fp32 weights: a one-token step reads every weight once, so its speed is the GEMV
bandwidth. `optimize_for_decode` makes every `nn.Linear` of a model (LM head included) a `DecodeLinear`: the
same module, same weight tensor, whose products over a few rows (a decode step, a speculative verification of
up to `kernels.MAX_ROWS` tokens) run in lmforge's GEMV kernel (`lmforge.infer.kernels`, ~1.5x torch's 1-row
matmul on the 2-core AVX2 machine lmforge is developed on). Longer inputs (prefill, large batches) and any call
with autograd on go to `F.linear` as before.

    model = optimize_for_decode(model)        # in place; returns the model (unchanged where kernels are missing)

Each attention layer also reads its q, k and v weights in one kernel call (`FusedProjections`), with no copy of
them: one parallel region and one Python call instead of three, ~24 fewer per GPT-2 step.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.infer import kernels
from lmforge.model.attention import Attention


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


class FusedProjections:
    """Several `DecodeLinear` children of one module that read the same input (an attention layer's wq, wk, wv),
    multiplied in one GEMV call with their outputs side by side. It holds child names, not modules: the children
    are looked up at every call, so a layer replaced later (quantized, LoRA-wrapped) is never read stale; when
    any child is no longer a plain `DecodeLinear`, or the input does not suit the kernel, it returns None and
    the caller runs the projections one by one."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.plan = None

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        children = [module._modules[name] for name in self.names]
        if any(type(c) is not DecodeLinear for c in children) or not kernels.gemv_applies(x, x.shape[-1]):
            return None
        self.plan = kernels.current_plan(self.plan, [(c._parameters["weight"], None, c._parameters["bias"])
                                                     for c in children])  # fmt: skip
        return self.plan(x)


@torch.no_grad()
def optimize_for_decode(model: nn.Module) -> nn.Module:
    """Make every plain fp32 `nn.Linear` of the model a `DecodeLinear`, in place. A tied LM head stays tied (the
    module keeps its weight Parameter). Without the kernels (no AVX2 or no C compiler) the model is unchanged."""
    if not kernels.available():
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.is_contiguous():
                setattr(parent, name, DecodeLinear.from_linear(child))
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_qkv = FusedProjections(("wq", "wk", "wv"))
    return model
