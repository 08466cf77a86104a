"""LoRA adapters in PEFT's format (lmforge/align/peft_format.py), checked by `peft` itself: adapters saved here,
loaded by `peft.PeftModel` onto the model's HF export, give the logits of lmforge's model with its adapters; and
the same folder loaded back here gives them too."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lmforge.align.lora import LoRAConfig, apply_lora  # noqa: E402
from lmforge.align.peft_format import load_peft, save_peft  # noqa: E402
from lmforge.config import UserError  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402
from lmforge.model.hf_export import save_hf  # noqa: E402

CFG = dict(vocab_size=64, max_seq_len=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2, position="rope",
           ffn="swiglu", norm="rmsnorm", bias=False, init_std=0.2)  # fmt: skip


def base_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**CFG)).eval()


def with_adapters(model, targets=("wq", "wv", "down")) -> LoRAConfig:
    cfg = LoRAConfig(rank=4, alpha=8, targets=targets)
    apply_lora(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # B ≠ 0: the adapters change the logits
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.2)
    return cfg


def test_adapters_saved_here_load_in_peft_with_the_same_logits(tmp_path):
    ours = base_model()
    export = save_hf(ours, tmp_path / "hf")  # the base, before any adapter
    cfg = with_adapters(ours)
    folder = save_peft(ours, tmp_path / "adapter", cfg, base=str(export))
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours(idx).float()
        hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
        plain = hf(idx).logits
        tuned = peft.PeftModel.from_pretrained(hf, folder).eval()
        got = tuned(idx).logits
    assert (expected - plain).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    back = base_model()
    assert load_peft(back, folder) == LoRAConfig(rank=4, alpha=8, targets=("down", "wq", "wv"))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).float(), expected, atol=1e-6, rtol=0)


def test_adapters_made_by_peft_load_here(tmp_path):
    ours = base_model()
    export = save_hf(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    config = peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["k_proj", "o_proj", "gate_proj"], lora_dropout=0.0, init_lora_weights=False
    )  # fmt: skip  (random B: not a no-op)
    tuned = peft.get_peft_model(hf, config).eval()
    tuned.save_pretrained(tmp_path / "theirs")
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = tuned(idx).logits
        load_peft(ours, tmp_path / "theirs")
        torch.testing.assert_close(ours(idx).float(), expected, atol=1e-4, rtol=0)


def test_gpt2_and_other_adapters_are_refused_in_one_line(tmp_path):
    gpt2 = Transformer(ModelConfig(vocab_size=64, max_seq_len=32, n_layer=1, d_model=32, n_head=4))
    cfg = LoRAConfig(rank=2, alpha=4, targets=("wq",))
    apply_lora(gpt2, cfg)
    with pytest.raises(UserError, match="c_attn"):
        save_peft(gpt2, tmp_path / "a", cfg)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        load_peft(base_model(), tmp_path / "nothing")
