"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen linear layer W plus a
trainable low-rank update (α/r)·B·A, B initialised to zero so training starts from the base model exactly.

    cfg = LoRAConfig(rank=8, alpha=16, targets=("wq", "wv"))
    names = apply_lora(model, cfg)              # replaces those nn.Linear modules; freezes everything else
    save_adapters(model, "runs/x/adapters.safetensors", cfg)   # A and B alone, a few hundred KB
    with adapters_disabled(model): ref_logits = model(idx)      # the base model, no second copy (PPO's reference)
    merge_lora(model)                           # W ← W + (α/r)·B·A, plain nn.Linear again: export as usual

Targets name the last component of a module path: attention `wq wk wv wo`, feed-forward `up down gate`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.config import UserError
from lmforge.runs import atomic_write_bytes

TARGET_CHOICES = ("wq", "wk", "wv", "wo", "gate", "up", "down")


@dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank, so changing rank keeps the step size
    dropout: float = 0.0  # on the adapter's input only
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")

    def validate(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"lora.rank must be positive, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(TARGET_CHOICES))
        if unknown or not self.targets:
            raise ValueError(f"lora.targets {unknown or '[]'} not among {', '.join(TARGET_CHOICES)}")


class LoRALinear(nn.Module):
    """y = W·x + b + (α/r)·B·A·dropout(x), with W and b frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear; B = 0 makes the update 0 at start
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:  # the base weight, for code that reads module.weight (dtype, device)
        return self.base.weight

    def delta(self) -> torch.Tensor:
        """(α/r)·B·A, the [out, in] update the adapter adds to W."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (α/r)·B·A."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)  # fmt: skip
        with torch.no_grad():
            out.weight.copy_(base.weight + self.delta())
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out


def _lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every nn.Linear whose name ends in one of `cfg.targets` and freeze all other parameters. Returns
    the wrapped module names. A tied LM head is never wrapped (it is the embedding)."""
    cfg.validate()
    targets = set(cfg.targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets]
    if not names:
        linears = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        have = sorted(linears & set(TARGET_CHOICES))
        raise UserError(f"lora.targets {sorted(targets)} name no linear layer of this model: choose among "
                        f"{', '.join(have) or 'none'}")  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, cfg.dropout))
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its weight (W ← W + (α/r)·B·A) and unwrap it; returns how many were merged."""
    merged = list(_lora_modules(model))
    for name, module in merged:
        _replace(model, name, module.merged())
    return len(merged)


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model: the frozen reference of PPO/DPO without keeping a second copy of the weights."""
    modules = [m for _, m in _lora_modules(model)]
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, previous):
            m.enabled = state


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{p}": getattr(m, p).detach().contiguous() for name, m in _lora_modules(model)
            for p in ("lora_A", "lora_B")}  # fmt: skip


def save_adapters(model: nn.Module, path: str | Path, cfg: LoRAConfig) -> Path:
    """The adapters alone as safetensors, with the LoRA config in its metadata (written atomically)."""
    from safetensors.torch import save

    tensors = lora_state_dict(model)
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    meta = {"lora": json.dumps({**asdict(cfg), "targets": list(cfg.targets)})}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def load_adapters(model: nn.Module, path: str | Path) -> LoRAConfig:
    """Wrap `model` as the saved adapters were (config from the file's metadata) and load their weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file {path}")
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora", "null") or "null")
    if meta is None:
        raise UserError(f"{path} has no LoRA metadata: give an adapters.safetensors written by a LoRA run")
    cfg = LoRAConfig(**{**meta, "targets": tuple(meta["targets"])})
    if not any(True for _ in _lora_modules(model)):
        apply_lora(model, cfg)
    tensors = load_file(str(path))
    own = lora_state_dict(model)
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise UserError(f"{path} lacks adapters for {missing[:3]}: it belongs to another model or targets; give "
                        "the adapters of a LoRA run of this base model")  # fmt: skip
    with torch.no_grad():
        for name, module in _lora_modules(model):
            module.lora_A.copy_(tensors[f"{name}.lora_A"])
            module.lora_B.copy_(tensors[f"{name}.lora_B"])
    return cfg


def finish_lora_run(model: nn.Module, run_dir, trainer, cfg: LoRAConfig) -> None:
    """End of a finished LoRA training run: the adapters alone to `adapters.safetensors` (and, for Llama-family
    models, in PEFT's format to `adapter/`), then the merged model
    as the last checkpoint, so later stages load the run like any other (W + (α/r)·B·A, plain keys). (A run
    stopped by a signal never gets here: Trainer.fit raises Stopped, keeping its resumable checkpoint.)"""
    from lmforge.train.checkpoint import save_checkpoint

    from .peft_format import save_peft  # it imports this module

    save_adapters(model, run_dir.path / "adapters.safetensors", cfg)
    try:  # the same adapters in PEFT's format, for peft and vLLM on the HF export of the base
        save_peft(model, run_dir.path / "adapter", cfg)
    except UserError as e:
        print(f"no PEFT adapter folder: {e}")
    merge_lora(model)
    save_checkpoint(run_dir.checkpoints, trainer.step, model, {"step": trainer.step}, keep=trainer.cfg.keep_checkpoints,
                    info={"lora": "merged"})  # fmt: skip
