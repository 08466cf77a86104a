"""The seam between the model and the decode fast path (lmforge/infer/fastpath.py): installing it only swaps
child modules for subclasses that hold the same children and parameters, and lmforge/model/ names nothing of it
(no hooks the model checks). The numerical equality of the fast path is tested in test_kernels.py and
test_fused_decode.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lmforge.model
from lmforge.infer import fastpath, kernels
from lmforge.infer.quantize import quantize_model
from lmforge.model import ModelConfig, Transformer

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no AVX2 CPU or no C compiler")

SWAPS = (fastpath.DecodeLinear, fastpath.FusedAttention, fastpath.FusedBlocks)


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    settings = dict(vocab_size=96, max_seq_len=32, n_layer=2, d_model=64, n_head=4, position="rope", norm="rmsnorm",
                    ffn="swiglu", bias=False, n_kv_head=2)  # fmt: skip
    return Transformer(ModelConfig(**{**settings, **overrides})).eval()


@pytest.mark.parametrize("scheme", [None, "int8"])
def test_installing_the_fast_path_only_replaces_child_modules(scheme):
    model = tiny() if scheme is None else quantize_model(tiny(), scheme)
    modules = dict(model.named_modules())
    attributes = {name: {k: v for k, v in vars(m).items() if k != "_modules"} for name, m in modules.items()}
    tensors = {name: t.data_ptr() for name, t in model.state_dict(keep_vars=True).items()}
    parameters = dict(model.named_parameters())

    assert fastpath.optimize_for_decode(model) is model
    after = dict(model.named_modules())
    assert after.keys() == modules.keys()  # the same tree: no module added, removed or moved
    assert type(model) is Transformer and attributes[""] == {k: v for k, v in vars(model).items() if k != "_modules"}
    swapped = [name for name in after if after[name] is not modules[name]]
    assert swapped  # the fast path did install something
    for name in swapped:
        old, new = modules[name], after[name]
        assert type(new) in SWAPS and type(new).__mro__[1] is type(old), name  # a subclass of exactly that module
        added = {k: v for k, v in vars(new).items() if k != "_modules" and k not in attributes[name]}
        kept = {k: v for k, v in vars(new).items() if k in attributes[name]}
        assert kept.keys() == attributes[name].keys(), name  # nothing of the module dropped
        for key, value in kept.items():  # and nothing changed, but the kernel method rebound to the new module
            same = value is attributes[name][key] or (
                key == "kernel" and value.__func__ is attributes[name][key].__func__
            )
            assert same, (name, key)
        assert not any(isinstance(v, torch.Tensor) for v in added.values()), name  # no copy of a weight
    assert {n: t.data_ptr() for n, t in model.state_dict(keep_vars=True).items()} == tensors
    assert all(p is parameters[n] for n, p in model.named_parameters())


def fast_path_names() -> set[str]:
    """Every attribute the fast path defines on its modules or sets on them, and every name it exports."""
    model = tiny()
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    fastpath.optimize_for_decode(model)
    names = {k for name, m in model.named_modules() for k in set(vars(m)) - before[name]}
    for cls in SWAPS:
        base = cls.__mro__[1]
        names |= {k for k in vars(cls) if not k.startswith("__") and not hasattr(base, k)}
    names |= {
        k
        for k in vars(fastpath)
        if not k.startswith("_") and getattr(getattr(fastpath, k), "__module__", None) == fastpath.__name__
    }
    names |= {"decode_buffers", "fused_decode", "fused_qkv"}  # what the fast path reads of caches; its old hooks
    return names


def test_the_model_package_names_nothing_of_the_fast_path():
    names = fast_path_names()
    assert {"qkv_plan", "fused_step", "FusedDecode", "optimize_for_decode"} <= names  # the set is not empty
    source = "\n".join(p.read_text() for p in sorted(Path(lmforge.model.__file__).parent.glob("*.py")))
    named = sorted(n for n in names if re.search(rf"\b{re.escape(n)}\b", source))
    assert not named, f"lmforge/model/ names the fast path's {named}"
