"""Models without a second copy of their weights, for the importers (`hf.py`, `gguf.py`): the Transformer is built
on the meta device — no memory, no initialisation — and then takes tensors that already hold the weights.

    model = empty_transformer(cfg)     # parameters on meta, uninitialised; RoPE / ALiBi tables real
    attach(model, state_dict)          # every parameter assigned, the tied head tied again; eval mode

Peak memory of an import is then the weights once (plus the reader's scratch), not a random initialisation and a
copy (benchmarks/models_in.py measures it).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .transformer import Transformer

# Initialising a tensor that is about to be replaced is wasted work (and, on meta, normal_ runs through torch._refs,
# whose first use imports torch's compiler stack: ~80 MB and ~1.4 s here). Skipped while building, as transformers'
# no_init_weights does.
INIT_FUNCTIONS = ("normal_", "uniform_", "zeros_", "ones_", "constant_", "kaiming_uniform_", "trunc_normal_",
                  "xavier_uniform_", "xavier_normal_")  # fmt: skip


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered while inside goes to the meta device, uninitialised; buffers (RoPE frequencies,
    ALiBi slopes: tables no state dict carries) are computed for real. The CPU tensor a layer allocates before
    registering its parameter is never written, so it costs no resident memory."""
    saved = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS}
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    try:
        for name in INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        nn.Module.register_parameter = register_on_meta
        yield
    finally:
        nn.Module.register_parameter = register
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def empty_transformer(cfg) -> Transformer:
    """A Transformer whose parameters are on the meta device, ready for `attach`."""
    with _parameters_on_meta():
        return Transformer(cfg)


def attach(model: Transformer, state_dict: dict[str, torch.Tensor]) -> Transformer:
    """Give `model` (from `empty_transformer`) the tensors of `state_dict` themselves, not copies."""
    model.load_state_dict(state_dict, strict=True, assign=True)
    if model.cfg.tie_embeddings:  # assign wraps each entry in its own Parameter: tie the two names again
        model.lm_head.weight = model.tok_emb.weight
    left = [n for n, x in [*model.named_parameters(), *model.named_buffers()] if x.is_meta]
    if left:
        raise RuntimeError(f"{left[:4]} are still on the meta device")  # a buffer the model gained: build it above
    return model.eval()
