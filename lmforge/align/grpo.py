"""GRPO (Shao et al. 2024, DeepSeekMath §4.1): sample a group of `n` responses per prompt, reward each with a
program (the task's grader), and push up the responses that beat their group's mean — the group is the
baseline, so there is no value model. Optional KL to the reference (k3, per token) and PPO clipping when a
rollout is reused for several updates.

    lmforge grpo --config configs/grpo/arith.yaml base=runs/arith-sft task=add:digits=3 n=8

Each training step samples `prompts_per_step` prompts from the task's train split (the held-out split is
only evaluated), rolls out with the inference engine, then updates (`iterations` optimizer steps per rollout).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from lmforge.model import ModelConfig
from lmforge.runs import RunDir
from lmforge.train.loop import TrainConfig, Trainer, seed_everything

from .lora import LoRAConfig, apply_lora, finish_lora_run
from .losses import group_advantages, kl_k3, masked_mean, masked_token_logprobs, token_logprobs
from .rollout import prompt_pool, rl_train_config, rollout
from .stage import check_config, check_pool, config_examples, create_run, frozen_reference, load_base, one_process

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


@dataclass
class GRPOConfig:
    base: str = "runs/arith-sft"
    task: str = "add:digits=3"
    name: str | None = None
    runs_dir: str = "runs"
    resume: bool = False
    n: int = 8  # responses per prompt (the group)
    prompts_per_step: int = 8
    iterations: int = 1  # optimizer steps per rollout (> 1: PPO-clipped reuse)
    temperature: float = 1.0
    max_new_tokens: int = 8
    beta: float = 0.0  # KL(π‖π_ref) coefficient, k3 per token; 0 = no reference kept
    clip: float = 0.2
    # how token terms become the loss: grpo (the paper's: each response's mean, then their mean — a token of a
    # short answer weighs more), dapo (Yu et al. 2025: the mean over every token of the batch), dr_grpo (Liu et al.
    # 2025: the sum over tokens ÷ (responses × max_new_tokens), a constant). grpo stays the default: it is the
    # published algorithm and the one lmforge's recorded RLHF figures used (TRL defaults to dapo).
    loss_type: str = "grpo"
    scale_rewards: str = "group"  # advantages ÷ the group's reward std | batch | none (Dr. GRPO)
    # k3 × ρ (ρ = π/π_old, differentiable): the KL term's gradient becomes the unbiased reverse-KL gradient
    # (DeepSeek-V3.2, 2025, eq. 7; TRL's use_bias_correction_kl, on by default there). It changes the gradient even
    # on-policy, where ρ = 1; off here so the recorded GRPO figures stay reproducible.
    kl_ratio_correction: bool = False
    eval_n: int = 200  # held-out prompts, greedy, at every eval
    seed: int = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=lambda: rl_train_config(eval_every=25))
    model: ModelConfig | None = None

    def validate(self) -> None:
        if self.n < 2:
            raise ValueError(f"a group needs n ≥ 2 samples, got {self.n}")
        if self.iterations < 1 or self.prompts_per_step < 1:
            raise ValueError("iterations and prompts_per_step must be ≥ 1")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        from lmforge.data.tasks import get_task

        get_task(self.task)  # a bad spec fails here, before the base model loads


@dataclass
class GroupBatch:
    rows: torch.Tensor
    mask: torch.Tensor  # [B, L-1] response tokens, aligned with token_logprobs
    advantages: torch.Tensor  # [B] one per response, spread over its tokens
    old_logp: torch.Tensor | None  # [B, L-1]; None: the rollout's policy is the one being trained (ratio 1)
    ref_logp: torch.Tensor | None
    metrics: dict


def grpo_loss(beta: float, clip: float, temperature: float = 1.0, loss_type: str = "grpo",
              max_new_tokens: int | None = None, kl_ratio_correction: bool = False):  # fmt: skip
    """−(1/G)Σ_i (1/|o_i|) Σ_t [min(ρ·Â_i, clip(ρ)·Â_i) − β·k3_t] (Shao et al. 2024, eq. 3) for loss_type="grpo";
    "dapo" averages the token terms over every token of the batch, "dr_grpo" sums them and divides by
    responses × max_new_tokens. `kl_ratio_correction`: β·ρ·k3_t instead of β·k3_t. Every log-prob at the rollouts'
    sampling temperature. The clip fraction counts the tokens where the clip binds: ρ > 1 + ε with Â > 0, or
    ρ < 1 − ε with Â < 0."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")

    def loss_fn(model, b: GroupBatch):
        logp = masked_token_logprobs(model, b.rows, b.mask, temperature)  # 0 off the responses
        off = ~b.mask.bool()  # there π_old and π_ref are 0 too: a ratio of 1 and a KL of 0, never exp(−log π) = inf
        old = logp.detach() if b.old_logp is None else b.old_logp.masked_fill(off, 0.0)
        ratio = torch.exp(logp - old)
        adv = b.advantages[:, None]
        objective = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
        metrics = dict(b.metrics)
        if b.ref_logp is not None:
            kl = kl_k3(logp, b.ref_logp.masked_fill(off, 0.0))
            objective = objective - beta * (kl * ratio if kl_ratio_correction else kl)
            metrics["kl"] = masked_mean(kl, b.mask).item()
        if loss_type == "grpo":
            loss = -masked_mean(objective, b.mask, dim=1).mean()
        elif loss_type == "dapo":
            loss = -masked_mean(objective, b.mask)
        else:  # dr_grpo
            loss = -(objective * b.mask).sum() / (b.mask.shape[0] * (max_new_tokens or b.mask.shape[1]))
        binds = ((ratio > 1 + clip) & (adv > 0)) | ((ratio < 1 - clip) & (adv < 0))
        metrics["clip_fraction"] = masked_mean(binds.float(), b.mask).item()
        return loss, metrics

    return loss_fn


def run(cfg: GRPOConfig) -> RunDir:
    one_process("grpo")
    seed_everything(cfg.train.seed)  # before any weights are made: the same seed reproduces the run
    from lmforge.data.tasks import get_task
    from lmforge.train.task_eval import evaluate_tasks

    check_config(cfg)
    task = get_task(cfg.task)
    config_examples(task, "heldout", cfg.eval_n, cfg.seed, "eval_n")  # what every eval draws: fail now if too few
    pool = prompt_pool(task, max(cfg.prompts_per_step * cfg.train.steps, 1000), cfg.seed)
    check_pool(pool, cfg.prompts_per_step, "prompts_per_step", task)
    policy, tokenizer = load_base(cfg)
    reference_logp = frozen_reference(policy, cfg.lora.enabled, cfg.temperature) if cfg.beta > 0 else None
    if cfg.lora.enabled:
        apply_lora(policy, cfg.lora)
    run_dir = create_run(cfg, tokenizer)
    cache: dict[int, GroupBatch] = {}

    def batch_fn(step: int, micro: int, n_micro: int) -> GroupBatch:
        key = step // cfg.iterations
        if key not in cache:
            cache.clear()
            rng = random.Random(cfg.seed * 1_000_003 + key)
            chosen = rng.sample(pool, cfg.prompts_per_step)
            out = rollout(policy, tokenizer, [e.prompt_messages() for e in chosen], n=cfg.n,
                          temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=key)  # fmt: skip
            rewards = torch.tensor([float(task.grade(chosen[i], text)) for i, text in zip(out.prompt_index, out.texts)])
            adv = group_advantages(rewards.view(cfg.prompts_per_step, cfg.n), scale=cfg.scale_rewards).view(-1)
            old = None
            if cfg.iterations > 1:  # reused for several updates: keep π_old; with one update it is π itself
                with torch.no_grad():
                    old = token_logprobs(policy, out.rows, cfg.temperature)
            signal = rewards.view(cfg.prompts_per_step, cfg.n).std(-1) > 0  # groups not all right or all wrong
            metrics = {"reward": rewards.mean().item(), "response_len": out.mask.sum(1).float().mean().item(),
                       "groups_with_signal": signal.float().mean().item()}  # fmt: skip
            ref = reference_logp(out.rows) if reference_logp else None
            cache[key] = GroupBatch(out.rows, out.mask[:, 1:], adv, old, ref, metrics)
        return cache[key]

    def eval_fn(m) -> dict[str, float]:
        result = evaluate_tasks(m, tokenizer, task, n=cfg.eval_n, split="heldout", seed=cfg.seed, progress=False)
        m.train()
        return {"heldout_accuracy": result["accuracy"]}

    print(f"GRPO on {task.spec()}: {cfg.prompts_per_step} prompts × {cfg.n} samples a rollout; base {cfg.base}")
    loss_fn = grpo_loss(cfg.beta, cfg.clip, cfg.temperature, cfg.loss_type, cfg.max_new_tokens, cfg.kl_ratio_correction)
    trainer = Trainer(policy, cfg.train, run_dir, batch_fn=batch_fn, loss_fn=loss_fn, eval_fn=eval_fn,
                      tokens_fn=lambda b: int(b.mask.sum()), resume=cfg.resume)  # fmt: skip
    trainer.fit()
    if cfg.lora.enabled:
        finish_lora_run(policy, run_dir, trainer, cfg.lora)
    return run_dir
