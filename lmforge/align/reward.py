"""Reward model: the SFT transformer with a scalar head on the last token, trained on preference pairs with
the Bradley–Terry loss (Ouyang et al. 2022, §3.5), through the one training loop.

    lmforge reward train --config configs/reward/arith.yaml base=runs/arith-sft data=prefs.jsonl
    lmforge reward train --config configs/reward/arith.yaml init=runs/arith-rm data=more.jsonl  # continue it
    lmforge reward score runs/arith-rm --prompt "What is 2 + 2?" --response 4 --response 5

Held-out pairwise accuracy and the mean margin r_chosen − r_rejected are logged at every eval.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lmforge.config import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.runs import RunDir
from lmforge.train.loop import TrainConfig, Trainer, seed_everything

from .losses import bradley_terry_loss
from .pairs import PairBatch, collate, load_pairs, pad, render
from .stage import check_config, create_run, load_base


class RewardModel(nn.Module):
    """r(prompt, response) = head(h_last): the final normed hidden state of the response's last token (its
    <|end|>), through a linear layer to one number."""

    def __init__(self, backbone: Transformer):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.cfg.d_model, 1)
        nn.init.normal_(self.head.weight, std=1 / (backbone.cfg.d_model + 1) ** 0.5)  # as TRL's value head
        nn.init.zeros_(self.head.bias)

    @property
    def cfg(self) -> ModelConfig:
        return self.backbone.cfg

    def forward(self, rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.hidden_states(rows)
        return self.head(hidden[torch.arange(rows.shape[0]), last]).squeeze(-1).float()


@dataclass
class RewardConfig:
    base: str = "runs/arith-sft"  # the SFT run the reward model starts from
    # a `lmforge reward train` run to continue from instead (its trunk and head; `base` is then not read): a reward
    # model trained further on comparisons of a newer policy's samples (iterated online RLHF, Bai et al. 2022 §4.5)
    init: str | None = None
    data: str = "prefs.jsonl"  # pairs: `lmforge prefs collect` output or {"prompt","chosen","rejected"} lines
    name: str | None = None
    runs_dir: str = "runs"
    resume: bool = False
    val_fraction: float = 0.1  # pairs held out (split by prompt, so no held-out prompt is trained on)
    max_len: int | None = None  # None: the base model's max_seq_len
    margin: float = 0.0  # a fixed margin in the Bradley–Terry loss, added to each pair's own "margin" column
    center: float = 0.0  # reward centering coefficient (Eisenstein et al. 2023); 0 = off
    seed: int = 0
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=300,
            batch_size=16,
            lr=3e-4,
            min_lr=3e-5,
            warmup_steps=20,
            eval_every=100,
            checkpoint_every=100,
            weight_decay=0.0,
        )  # fmt: skip
    )
    model: ModelConfig | None = None  # copied from the base run

    def validate(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction is the share of prompts held out, in [0, 1); got {self.val_fraction}")


def split_by_prompt(pairs: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs, a `val_fraction` of the prompts held out; refuses a split that leaves nothing to
    train on (val_fraction 1, or too few prompts for it)."""
    prompts = sorted({p["prompt"] for p in pairs})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: round(len(prompts) * val_fraction)])
    train = [p for p in pairs if p["prompt"] not in held]
    if not train:
        raise ConfigError(f"val_fraction={val_fraction:g} holds out all {len(prompts)} prompts of the pairs: lower "
                          "val_fraction or collect pairs for more prompts", "val_fraction")  # fmt: skip
    return train, [p for p in pairs if p["prompt"] in held]


def pair_loss(margin: float, center: float):
    def loss_fn(model: RewardModel, batch: PairBatch):
        r_c = model(batch.chosen, batch.chosen_last)
        r_r = model(batch.rejected, batch.rejected_last)
        pair_margins = margin if batch.margin is None else margin + batch.margin  # the data's column adds to it
        loss = bradley_terry_loss(r_c, r_r, pair_margins, center)
        return loss, {"accuracy": (r_c > r_r).float().mean().item(), "margin": (r_c - r_r).mean().item()}

    return loss_fn


@torch.no_grad()
def pairwise_accuracy(model: RewardModel, tokenizer, pairs: list[dict], max_len: int, batch: int = 32) -> dict:
    """Fraction of pairs where r(chosen) > r(rejected), and the mean margin."""
    model.eval()
    correct, margins = 0, []
    for i in range(0, len(pairs), batch):
        b = collate(tokenizer, pairs[i : i + batch], max_len)
        d = model(b.chosen, b.chosen_last) - model(b.rejected, b.rejected_last)
        correct += int((d > 0).sum())
        margins += d.tolist()
    model.train()
    return {"val_accuracy": correct / max(len(pairs), 1), "val_margin": sum(margins) / max(len(margins), 1)}


def run(cfg: RewardConfig) -> RunDir:
    seed_everything(cfg.train.seed)  # before any weights are made: the same seed reproduces the run
    check_config(cfg)
    if cfg.init:
        model, tokenizer = load_reward_model(cfg.init)
        cfg.model = model.cfg
    else:
        backbone, tokenizer = load_base(cfg)
        model = RewardModel(backbone)
    max_len = cfg.max_len or cfg.model.max_seq_len
    train_pairs, val_pairs = split_by_prompt(load_pairs(cfg.data), cfg.val_fraction, cfg.seed)
    run_dir = create_run(cfg, tokenizer)
    tcfg = cfg.train

    def batch_fn(step: int, part: int, n_parts: int) -> PairBatch:
        rng = random.Random(cfg.seed * 1_000_003 + step)  # a step's batch depends on the step only: exact resume
        chosen = rng.sample(range(len(train_pairs)), min(tcfg.batch_size, len(train_pairs)))
        per = len(chosen) // n_parts  # this part's share: the loop's parts span ranks and micro-batches
        return collate(tokenizer, [train_pairs[i] for i in chosen[part * per : (part + 1) * per]], max_len)

    print(f"reward model on {len(train_pairs):,} pairs ({len(val_pairs):,} held out by prompt); base {cfg.base}")
    trainer = Trainer(model, tcfg, run_dir, batch_fn=batch_fn, loss_fn=pair_loss(cfg.margin, cfg.center),
                      eval_fn=lambda m: pairwise_accuracy(m, tokenizer, val_pairs, max_len) if val_pairs else {},
                      tokens_fn=lambda b: b.chosen.numel() + b.rejected.numel(), resume=cfg.resume)  # fmt: skip
    trainer.fit()
    return run_dir


def load_reward_model(run) -> tuple[RewardModel, object]:
    """(RewardModel in eval mode, tokenizer) of a `lmforge reward train` run."""
    from lmforge.train.resolve import resolve_model

    model, tokenizer, _ = resolve_model(run, build=lambda c: RewardModel(Transformer(c)))
    return model, tokenizer


@torch.no_grad()
def score(model: RewardModel, tokenizer, prompts: list[str], responses: list[str], max_len: int | None = None):
    """[B] rewards of (prompt, response) pairs."""
    rows, _, last = pad([render(tokenizer, p, r) for p, r in zip(prompts, responses)], tokenizer.pad_id,
                        max_len or model.cfg.max_seq_len)  # fmt: skip
    return model(rows, last)


@torch.no_grad()
def best_of_n(policy, tokenizer, reward_model: RewardModel, prompts: list[str], *, n: int = 8,
              temperature: float = 1.0, max_new_tokens: int = 8, seed: int = 0) -> list[str]:  # fmt: skip
    """For each prompt, `n` samples from the policy and the one the reward model scores highest (Nakano et al.
    2021; Stiennon et al. 2020): the inference-time baseline that RL must beat."""
    from .rollout import rollout

    out = rollout(policy, tokenizer, [[{"role": "user", "content": p}] for p in prompts], n=n,
                  temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)  # fmt: skip
    scores = score(reward_model, tokenizer, [prompts[i] for i in out.prompt_index], out.texts).view(len(prompts), n)
    best = scores.argmax(-1)
    return [out.texts[i * n + int(best[i])] for i in range(len(prompts))]
