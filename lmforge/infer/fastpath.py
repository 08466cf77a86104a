"""Weight layouts for batch-1 decoding: a one-row matmul reads every weight once, so its speed is the GEMV
bandwidth, and on CPUs that depends on the layout. `nn.Linear` computes x·Wᵀ from W [out, in]; for many
shapes x·Wt from a contiguous Wt [in, out] streams memory faster (measured here, AVX2 EPYC, fp32: GPT-2's
50257×768 LM head 13 → 20 GB/s, its 3072×768 MLP input 26 → 39 GB/s; its 768×3072 MLP output is faster
as is). `optimize_for_decode` times both layouts for each distinct weight shape on this machine and stores
each weight the faster way. The math is unchanged (same products, another summation order).

    model = optimize_for_decode(model)        # in place; returns the model
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class TransposedLinear(nn.Module):
    """y = x · Wt + b with Wt [in, out] contiguous: the layout some GEMV shapes read fastest."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # [out, in] view, for code that reads nn.Linear's weight
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout=[in, out]"


class TiedEmbedding(nn.Module):
    """Embedding lookups from a transposed LM head's Wt [d, vocab]: a tied head stays one tensor."""

    def __init__(self, head: TransposedLinear):
        super().__init__()
        self.head = [head]  # a list: not registered twice as a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self.head[0].weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head[0].weight_t.t()[idx]


def _median_seconds(fn, repeats: int = 9) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def transposed_is_faster(weight: torch.Tensor, margin: float = 0.05) -> bool:
    """Whether a one-row x·Wt beats x·Wᵀ for this weight by more than `margin`, timed on a copy of it."""
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    w = weight.detach().clone()
    wt = w.t().contiguous()
    as_is = _median_seconds(lambda: F.linear(x, w))
    transposed = _median_seconds(lambda: x @ wt)
    return transposed < (1 - margin) * as_is


@torch.no_grad()
def optimize_for_decode(model: nn.Module) -> nn.Module:
    """Store every plain `nn.Linear` of the model (LM head included) in its faster GEMV layout, in place."""
    choice: dict[tuple, bool] = {}  # one timing per distinct shape and dtype
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is model.tok_emb.weight
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            key = (tuple(child.weight.shape), child.weight.dtype)
            if key not in choice:
                choice[key] = transposed_is_faster(child.weight)
            if choice[key]:
                setattr(parent, name, TransposedLinear(child))
    if tied and isinstance(model.lm_head, TransposedLinear):
        model.tok_emb = TiedEmbedding(model.lm_head)
    return model
