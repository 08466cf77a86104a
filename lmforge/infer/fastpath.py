"""The batch-1 decode path for fp32 weights: a one-token step reads every weight once, so its speed is the GEMV
bandwidth. `optimize_for_decode` makes every `nn.Linear` of a model (LM head included) a `DecodeLinear`: the
same module, same weight tensor, whose products over a few rows (a decode step, a speculative verification of
up to `kernels.MAX_ROWS` tokens) run in lmforge's GEMV kernel (`lmforge.infer.kernels`, ~1.5x torch's 1-row
matmul on the 2-core AVX2 machine lmforge is developed on). Longer inputs (prefill, large batches) and any call
with autograd on go to `F.linear` as before.

    model = optimize_for_decode(model)        # in place; returns the model (unchanged where kernels are missing)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.infer import kernels


class DecodeLinear(nn.Linear):
    """nn.Linear whose calls on a few rows run in the GEMV kernel (same weight, same state dict)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DecodeLinear:
        fast = cls.__new__(cls)
        fast.__dict__.update(linear.__dict__)  # the same parameters, hooks and flags: nothing is copied
        return fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self._parameters  # read directly: nn.Module's attribute lookup costs µs, ~70 times a step
        if kernels.gemv_applies(x, self.in_features):
            return kernels.gemv(params["weight"], x, bias=params["bias"])
        return F.linear(x, params["weight"], params["bias"])


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
    return model
