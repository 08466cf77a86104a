"""LoRA against its definition: W' = W + (α/r)·B·A; B = 0 starts at the base model; only adapters train;
adapters off = the base model; save/load and merge round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lmforge.align.lora import (
    LoRAConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    load_adapters,
    merge_lora,
    save_adapters,
)
from lmforge.model import ModelConfig, Transformer


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=50, max_seq_len=16, n_layer=2, d_model=32, n_head=4, position="rope",
                                   ffn="swiglu", norm="rmsnorm", bias=False)).eval()  # fmt: skip


def randomise(model):
    """Nonzero B so the update is not trivially zero."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)


def test_merge_equals_base_plus_scaled_BA():
    base = nn.Linear(6, 5, bias=True)
    lora = LoRALinear(base, rank=3, alpha=12.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    W, A, B = base.weight.clone(), lora.lora_A.clone(), lora.lora_B.clone()
    merged = lora.merged()
    torch.testing.assert_close(merged.weight, W + (12.0 / 3) * B @ A)  # hand formula, α/r = 4
    torch.testing.assert_close(merged.bias, base.bias)
    x = torch.randn(7, 6)
    torch.testing.assert_close(lora(x), merged(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lora(x), x @ (W + 4.0 * B @ A).T + base.bias, rtol=1e-5, atol=1e-6)


def test_fresh_adapters_leave_the_model_unchanged_and_train_alone():
    model, reference = tiny(), tiny()
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("wq", "wv", "down")))
    assert len(names) == 2 * 3 and all(n.rpartition(".")[2] in ("wq", "wv", "down") for n in names)
    idx = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(model(idx), reference(idx))  # B = 0
    model.train()
    model(idx).logsumexp(-1).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(model.get_parameter(n).grad is not None for n in trainable if n.endswith("lora_B"))


def test_adapters_disabled_is_the_base_model_and_merge_keeps_outputs():
    model, reference = tiny(), tiny()
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    randomise(model)
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        adapted = model(idx)
        assert not torch.allclose(adapted, reference(idx), atol=1e-4)
        with adapters_disabled(model):
            torch.testing.assert_close(model(idx), reference(idx))
        torch.testing.assert_close(model(idx), adapted)  # re-enabled on exit
        assert merge_lora(model) == 8
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(idx), adapted, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(reference.state_dict())  # plain keys again: exportable


def test_adapters_save_alone_and_load_into_a_fresh_model(tmp_path):
    model = tiny()
    cfg = LoRAConfig(rank=2, alpha=4, targets=("wk", "up"))
    apply_lora(model, cfg)
    randomise(model)
    path = save_adapters(model, tmp_path / "adapters.safetensors", cfg)
    assert path.stat().st_size < 20_000  # A and B only
    fresh = tiny()
    assert load_adapters(fresh, path) == cfg
    idx = torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), model(idx))
    with pytest.raises(ValueError, match="another model"):
        other = tiny()
        apply_lora(other, LoRAConfig(rank=2, alpha=4, targets=("wq",)))
        load_adapters(other, path)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="not among"):
        LoRAConfig(targets=("qkv",)).validate()
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0).validate()


def test_targets_the_model_lacks_and_foreign_adapter_files_are_user_errors(tmp_path):
    from safetensors.torch import save_file

    from lmforge.config import UserError

    torch.manual_seed(0)
    gelu = Transformer(ModelConfig(vocab_size=32, max_seq_len=16, n_layer=1, d_model=16, n_head=2, ffn="gelu"))
    with pytest.raises(UserError, match=r"lora.targets \['gate'\] name no linear layer of this model: choose among"):
        apply_lora(gelu, LoRAConfig(targets=("gate",)))
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(UserError, match="has no LoRA metadata: give an adapters.safetensors written by a LoRA run"):
        load_adapters(tiny(), plain)
    bare = tiny()
    with pytest.raises(ValueError, match="no LoRA adapters") as bug:  # only our code saves a run's adapters
        save_adapters(bare, tmp_path / "none.safetensors", LoRAConfig())
    assert not isinstance(bug.value, UserError)
