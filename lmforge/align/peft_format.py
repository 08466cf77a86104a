"""LoRA adapters in Hugging Face PEFT's format — `adapter_config.json` + `adapter_model.safetensors` — so adapters
trained here load with `peft.PeftModel.from_pretrained` onto the model's HF export (and into vLLM), and adapters
trained with PEFT load here.

    save_peft(model, "runs/sft-lora/adapter", lora_cfg, base="exports/base")   # after LoRA training
    load_peft(model, "path/to/peft-adapter")                                 # wraps model, loads A and B

Llama-family models only (Llama, Mistral, Qwen 2/3, OLMo 2: the HF layouts `lmforge export --to hf` writes with
one weight per projection); GPT-2's fused `c_attn` has no per-projection adapter, and is refused in one line.
PEFT's update is (lora_alpha / r)·B·A on y = W·x, the same as lmforge's: the tensors go across unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.config import UserError
from lmforge.runs import atomic_write_bytes, atomic_write_text

from .lora import LoRAConfig, _lora_modules, apply_lora

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# lmforge's target name -> the HF module name PEFT targets
HF_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj"}  # fmt: skip
OURS = {hf: ours for ours, hf in HF_TARGETS.items()}
PARENT = {"wq": "self_attn", "wk": "self_attn", "wv": "self_attn", "wo": "self_attn", "gate": "mlp", "up": "mlp",
          "down": "mlp"}  # fmt: skip


def _check_family(model: nn.Module) -> None:
    from lmforge.model.hf_export import _hf_family

    try:
        family = _hf_family(model.cfg)
    except ValueError as e:
        raise UserError(f"PEFT adapters need a model with an HF equivalent: {e}") from None
    if family == "gpt2":
        raise UserError("PEFT adapters: GPT-2's fused c_attn has no per-projection adapter; use a Llama-style "
                        "model (rope, swiglu, rmsnorm, no bias) or keep lmforge's adapters.safetensors")  # fmt: skip


def hf_module(name: str) -> str:
    """blocks.3.attn.wq -> base_model.model.model.layers.3.self_attn.q_proj (the key prefix PEFT saves)."""
    _, layer, _, target = name.split(".")
    return f"base_model.model.model.layers.{layer}.{PARENT[target]}.{HF_TARGETS[target]}"


def save_peft(model: nn.Module, folder: str | Path, cfg: LoRAConfig, *, base: str | None = None) -> Path:
    """Write the model's adapters as a PEFT folder (each file atomically); `base` names the HF model they fit."""
    from safetensors.torch import save

    _check_family(model)
    tensors = {}
    for name, module in _lora_modules(model):
        prefix = hf_module(name)
        tensors[f"{prefix}.lora_A.weight"] = module.lora_A.detach().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = module.lora_B.detach().contiguous()
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": sorted(HF_TARGETS[t] for t in cfg.targets),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
              "modules_to_save": None, "base_model_name_or_path": base, "inference_mode": True}  # fmt: skip
    atomic_write_bytes(folder / WEIGHTS, save(tensors, metadata={"format": "pt"}))
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def load_peft(model: nn.Module, folder: str | Path) -> LoRAConfig:
    """Wrap `model` with the adapters of a PEFT folder and load their weights; returns the LoRA config."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: it needs {CONFIG} and {WEIGHTS}")
    _check_family(model)
    config = json.loads((folder / CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise UserError(f"{folder}: peft_type {config.get('peft_type')!r}: only LORA adapters load here")
    for key, plain in (("use_rslora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key, plain) != plain:
            raise UserError(f"{folder}: {key}={config[key]!r} is not supported here (only {key}={plain!r})")
    targets = config.get("target_modules") or []
    targets = targets if isinstance(targets, list) else [targets]
    unknown = [t for t in targets if t not in OURS]
    if unknown:
        raise UserError(f"{folder}: target_modules {unknown} have no lmforge equivalent ({', '.join(OURS)} do)")
    dropout = float(config.get("lora_dropout", 0.0))
    cfg = LoRAConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=dropout,
                     targets=tuple(OURS[t] for t in targets))  # fmt: skip
    apply_lora(model, cfg)
    tensors = {k.replace(".default", ""): v for k, v in load_file(str(folder / WEIGHTS)).items()}
    with torch.no_grad():
        for name, module in _lora_modules(model):
            prefix = hf_module(name)
            for part in ("lora_A", "lora_B"):
                key = f"{prefix}.{part}.weight"
                if key not in tensors:
                    raise UserError(f"{folder} lacks {key}: the adapters belong to another model")
                getattr(module, part).copy_(tensors[key])
    return cfg
