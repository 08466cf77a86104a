"""Direct Preference Optimisation (Rafailov et al. 2023): fine-tune the policy on preference pairs against a
frozen reference, with no reward model and no sampling. IPO, conservative label smoothing and an NLL term on the
chosen responses (`rpo_alpha`, Pang et al. 2024) are options.

    lmforge dpo --config configs/dpo/arith.yaml base=runs/arith-sft data=prefs.jsonl beta=0.1
    lmforge dpo ... lora.enabled=true            # the reference is the policy with its adapters off

The reference's log-probabilities are computed once, before training (they never change), so a step costs
two policy forwards. Logged: rewards/chosen, rewards/rejected (β·log π/π_ref), rewards/accuracy and
rewards/margin, on training batches and on held-out pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from lmforge.model import ModelConfig
from lmforge.runs import RunDir
from lmforge.train.loop import TrainConfig, Trainer, seed_everything

from .lora import LoRAConfig, apply_lora, finish_lora_run
from .losses import dpo_loss, sequence_logprob
from .pairs import collate, load_pairs
from .reward import split_by_prompt
from .stage import check_config, create_run, load_base


@dataclass
class DPOConfig:
    base: str = "runs/arith-sft"  # the SFT run: the policy starts here and the reference stays here
    data: str = "prefs.jsonl"
    name: str | None = None
    runs_dir: str = "runs"
    resume: bool = False
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO's ε
    # sigmoid (DPO) | ipo (Azar et al. 2023, on per-token averaged log-ratios, as its authors and TRL compute it)
    # | ipo_sum (the same loss on summed log-ratios: it grows with the answers' length, so β means less)
    loss_type: str = "sigmoid"
    # α·NLL per token of the chosen response, added to the loss (Pang et al. 2024, "Iterative Reasoning Preference
    # Optimization"; TRL's rpo_alpha): plain DPO can lower the chosen answers' likelihood along with the rejected
    # ones, which on tasks with one right answer costs greedy accuracy; 0 = plain DPO
    rpo_alpha: float = 0.0
    val_fraction: float = 0.1
    max_len: int | None = None
    seed: int = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=200,
            batch_size=16,
            lr=5e-5,
            min_lr=5e-6,
            warmup_steps=10,
            eval_every=50,
            checkpoint_every=100,
            weight_decay=0.0,
        )  # fmt: skip
    )
    model: ModelConfig | None = None  # copied from the base run

    def validate(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be ≥ 0, got {self.rpo_alpha}")
        if self.loss_type not in ("sigmoid", "ipo", "ipo_sum"):
            raise ValueError(f"loss_type must be sigmoid, ipo or ipo_sum, got {self.loss_type!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction is the share of prompts held out, in [0, 1); got {self.val_fraction}")


@torch.no_grad()
def reference_logprobs(model, tokenizer, pairs: list[dict], max_len: int, batch: int = 32) -> torch.Tensor:
    """[N, 2] log π_ref(chosen), log π_ref(rejected) of every pair."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(pairs), batch):
        b = collate(tokenizer, pairs[i : i + batch], max_len)
        out.append(torch.stack([sequence_logprob(model, b.chosen, b.chosen_mask),
                                sequence_logprob(model, b.rejected, b.rejected_mask)], -1))  # fmt: skip
    model.train(was_training)
    return torch.cat(out)


def dpo_batch_loss(cfg: DPOConfig, tokenizer, max_len: int):
    def loss_fn(model, batch):
        b, ref = batch
        chosen = sequence_logprob(model, b.chosen, b.chosen_mask)
        rejected = sequence_logprob(model, b.rejected, b.rejected_mask)
        n_chosen = b.chosen_mask[:, 1:].sum(-1).clamp(min=1)
        logps = (chosen, rejected, ref[:, 0], ref[:, 1])
        if cfg.loss_type == "ipo":  # per-token averages of each answer's log-probs
            n_rejected = b.rejected_mask[:, 1:].sum(-1).clamp(min=1)
            logps = tuple(lp / n for lp, n in zip(logps, (n_chosen, n_rejected, n_chosen, n_rejected)))
        out = dpo_loss(*logps, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                       loss_type="ipo" if cfg.loss_type.startswith("ipo") else cfg.loss_type)  # fmt: skip
        metrics = out.metrics()
        if not cfg.rpo_alpha:
            return out.loss, metrics
        nll = -(chosen / n_chosen).mean()
        metrics["nll_chosen"] = nll.item()
        return out.loss + cfg.rpo_alpha * nll, metrics

    return loss_fn


def run(cfg: DPOConfig) -> RunDir:
    seed_everything(cfg.train.seed)  # before any weights are made: the same seed reproduces the run
    check_config(cfg)
    policy, tokenizer = load_base(cfg)
    max_len = cfg.max_len or cfg.model.max_seq_len
    train_pairs, val_pairs = split_by_prompt(load_pairs(cfg.data), cfg.val_fraction, cfg.seed)
    # The reference is the base model: computed before training (with LoRA, the policy with adapters off).
    ref_train = reference_logprobs(policy, tokenizer, train_pairs, max_len)
    ref_val = reference_logprobs(policy, tokenizer, val_pairs, max_len) if val_pairs else None
    if cfg.lora.enabled:
        apply_lora(policy, cfg.lora)
    run_dir = create_run(cfg, tokenizer)
    tcfg = cfg.train
    loss_fn = dpo_batch_loss(cfg, tokenizer, max_len)

    def batch_fn(step: int, part: int, n_parts: int):
        rng = random.Random(cfg.seed * 1_000_003 + step)
        idx = rng.sample(range(len(train_pairs)), min(tcfg.batch_size, len(train_pairs)))
        per = len(idx) // n_parts  # this part's share: the loop's parts span ranks and micro-batches
        idx = idx[part * per : (part + 1) * per]
        return collate(tokenizer, [train_pairs[i] for i in idx], max_len), ref_train[idx]

    @torch.no_grad()
    def eval_fn(m) -> dict[str, float]:
        if not val_pairs:
            return {}
        m.eval()
        sums: dict[str, float] = {}
        for i in range(0, len(val_pairs), 32):
            _, metrics = loss_fn(m, (collate(tokenizer, val_pairs[i : i + 32], max_len), ref_val[i : i + 32]))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * len(val_pairs[i : i + 32])
        m.train()
        return {f"val_{k}": v / len(val_pairs) for k, v in sums.items()}

    print(f"DPO (β={cfg.beta}, {cfg.loss_type}) on {len(train_pairs):,} pairs, {len(val_pairs):,} held out")
    trainer = Trainer(policy, tcfg, run_dir, batch_fn=batch_fn, loss_fn=loss_fn, eval_fn=eval_fn,
                      tokens_fn=lambda b: b[0].chosen.numel() + b[0].rejected.numel(), resume=cfg.resume)  # fmt: skip
    trainer.fit()
    if cfg.lora.enabled:
        finish_lora_run(policy, run_dir, trainer, cfg.lora)
    return run_dir
