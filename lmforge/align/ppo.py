"""PPO with a learned reward model and a per-token KL penalty (Ziegler et al. 2019; Stiennon et al. 2020;
Ouyang et al. 2022), through the one training loop: each rollout is sampled with the inference engine, scored by
the reward model, turned into advantages by GAE, and consumed in minibatch epochs.

    lmforge ppo --config configs/ppo/arith.yaml base=runs/arith-sft reward_model=runs/arith-rm task=add:digits=3

Reward per response token t: −β·(log π − log π_ref)_t (k1), plus the reward model's score on the last token,
normalised to mean 0 and std 1 over the starting policy's samples (Ziegler et al. 2019). The critic is a copy of
the reward model's trunk with a zero-initialised head (InstructGPT initialises the value function from the reward
model, Ouyang et al. 2022 §3.5), so value gradients never reach the policy; `critic=shared` puts a value head on
the policy's own trunk instead. β is fixed or adapted towards `target_kl` (Ziegler et al. 2019, §2.2). Logged:
reward (the model's score), KL (k1 summed per response; k3 beside it, Schulman 2020), entropy, clip fraction,
value loss, β, and the held-out accuracy from the task's true grader — used for evaluation only, never as a
reward. A finished run's last checkpoint holds the policy alone (no critic).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.runs import RunDir
from lmforge.train.loop import TrainConfig, Trainer, seed_everything

from .lora import LoRAConfig, apply_lora, finish_lora_run
from .losses import (
    gae,
    kl_k1,
    kl_k3,
    leave_one_out,
    masked_mean,
    masked_whiten,
    next_token_logprobs,
    ppo_policy_loss,
    ppo_value_loss,
)
from .rollout import prompt_pool, rl_train_config, rollout
from .stage import check_config, check_pool, config_examples, create_run, frozen_reference, load_base, one_process


class PolicyWithValue(nn.Module):
    """The policy's transformer and a value function: logits and values for every position that predicts a
    token (values[:, t] is the value of the state before token t + 1).

    With `critic` (a reward model: trunk + scalar head) the values come from its own trunk, so the policy's
    weights see policy gradients only. Without it a zero-initialised head reads the policy's hidden states:
    cheaper, but on a small model the value loss (returns on the reward model's scale, ~10) then dominates the
    shared trunk's gradient and drags the policy."""

    def __init__(self, policy: Transformer, critic: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        if critic is None:
            self.value_head = nn.Linear(policy.cfg.d_model, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.policy.hidden_states(rows[:, :-1])
        if self.critic is None:
            values = self.value_head(hidden)
        else:
            values = self.critic.head(self.critic.backbone.hidden_states(rows[:, :-1]))
        return self.policy.lm_head(hidden).float(), values.squeeze(-1).float()


@dataclass
class PPOConfig:
    base: str = "runs/arith-sft"  # the policy starts here; the reference stays here
    reward_model: str = "runs/arith-rm"  # a `lmforge reward train` run
    task: str = "add:digits=3"  # prompts (train split) and the true grader for held-out evaluation only
    name: str | None = None
    runs_dir: str = "runs"
    resume: bool = False
    prompts_per_rollout: int = 32
    # n samples of each prompt in a rollout (rows = prompts × n). With n > 1 each score is centred on the mean of
    # the other samples of its prompt (a leave-one-out baseline, Ahmadian et al. 2024), so the reward model's
    # prompt-to-prompt offsets do not reach the advantages (on benchmarks/rlhf.py with 2 heads: 16 × 4 gave 71.9%,
    # 32 × 2 71.5%, 64 × 1 72.5%: the critic already removed them there)
    samples_per_prompt: int = 1
    minibatch: int = 8
    ppo_epochs: int = 2
    temperature: float = 1.0
    max_new_tokens: int = 8
    # KL coefficient (initial, when adaptive), against the normalised reward: on benchmarks/rlhf.py 0.05 let PPO hack
    # the reward model (KL 1.9 nats, 78% held-out where 0.2 gave 89%), 0.5 and 1.0 kept it too near SFT (82%, 77%)
    beta: float = 0.2
    target_kl: float | None = None  # adapt β towards this KL per response (None: fixed β)
    kl_horizon: int = 10_000
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    # score → (score − μ)/σ, μ and σ measured once on the starting policy's samples (Ziegler et al. 2019, §2.2):
    # a Bradley–Terry score has no fixed scale, and β only means something against a reward of known scale
    normalize_reward: bool = True
    critic: str = "reward_model"  # reward_model: a separate critic initialised from it | shared: a head on the policy
    eval_n: int = 200
    seed: int = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=lambda: rl_train_config(eval_every=20))
    model: ModelConfig | None = None

    def validate(self) -> None:
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be ≥ 1, got {self.samples_per_prompt}")
        if self.rows_per_rollout % self.minibatch:
            raise ValueError(f"prompts_per_rollout × samples_per_prompt ({self.rows_per_rollout}) must be a multiple "
                             f"of minibatch ({self.minibatch})")  # fmt: skip
        if self.beta < 0:
            raise ValueError(f"beta must be ≥ 0, got {self.beta}")
        if self.critic not in ("reward_model", "shared"):
            raise ValueError(f"critic must be reward_model or shared, got {self.critic!r}")
        from lmforge.data.tasks import get_task

        get_task(self.task)  # a bad spec fails here, before any model loads

    @property
    def rows_per_rollout(self) -> int:
        return self.prompts_per_rollout * self.samples_per_prompt

    @property
    def steps_per_rollout(self) -> int:
        return self.ppo_epochs * self.rows_per_rollout // self.minibatch


class AdaptiveKL:
    """β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon) (Ziegler et al. 2019, §2.2); fixed when target is None."""

    def __init__(self, beta: float, target: float | None, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is not None:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + error * n / self.horizon

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


@dataclass
class PPOBatch:
    rows: torch.Tensor
    mask: torch.Tensor  # [B, L-1] response tokens
    old_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    metrics: dict


def ppo_loss(clip: float, value_clip: float, vf_coef: float, temperature: float = 1.0):
    """Clipped policy loss + vf_coef × clipped value loss; log-probs (and the entropy) at the sampling temperature."""

    def loss_fn(model: PolicyWithValue, b: PPOBatch):
        logits, values = model(b.rows)
        logp_all = F.log_softmax(logits.float() / temperature, -1)
        logp = torch.gather(logp_all, 2, b.rows[:, 1:, None]).squeeze(2)
        policy_loss, clip_fraction = ppo_policy_loss(logp, b.old_logp, b.advantages, b.mask, clip)
        value_loss = ppo_value_loss(values, b.old_values, b.returns, b.mask, value_clip)
        entropy = masked_mean(-(logp_all.exp() * logp_all).sum(-1), b.mask)
        metrics = {**b.metrics, "clip_fraction": clip_fraction.item(), "value_loss": value_loss.item(),
                   "entropy": entropy.item(), "policy_loss": policy_loss.item()}  # fmt: skip
        return policy_loss + vf_coef * value_loss, metrics

    return loss_fn


def critic_from(reward_model: nn.Module) -> nn.Module:
    """A trainable copy of the reward model's trunk with a head starting at zero: values start at the normalised
    reward's mean. (Its own head is trained on last tokens only: read at every position of a response it gave
    values σ apart from one token to the next, and GAE turned those into advantages that were mostly noise.)"""
    critic = copy.deepcopy(reward_model).requires_grad_(True)
    nn.init.zeros_(critic.head.weight)
    nn.init.zeros_(critic.head.bias)
    return critic


@torch.no_grad()
def reward_scale(policy, tokenizer, reward_model, pool: list, cfg: PPOConfig, n: int = 256) -> tuple[float, float]:
    """Mean and std of the reward model's score on the starting policy's samples for n train prompts (a fixed
    seed, so a resumed run measures the same numbers before its checkpoint is loaded)."""
    prompts = random.Random(cfg.seed).sample(pool, min(n, len(pool)))
    # seed 10⁶: the training rollouts are keyed by step, so theirs stay below it
    out = rollout(policy, tokenizer, [e.prompt_messages() for e in prompts], n=1, temperature=cfg.temperature,
                  max_new_tokens=cfg.max_new_tokens, seed=10**6)  # fmt: skip
    scores = reward_model(out.rows, out.last)
    mean, std = scores.mean().item(), scores.std().item() if len(scores) > 1 else 1.0
    print(f"reward model score on the starting policy's samples: mean {mean:.3f}, std {std:.3f} (normalised to 0, 1)")
    return mean, max(std, 1e-6)


def run(cfg: PPOConfig) -> RunDir:
    one_process("ppo")
    seed_everything(cfg.train.seed)  # before any weights are made: the same seed reproduces the run
    from lmforge.data.tasks import get_task
    from lmforge.train.checkpoint import save_checkpoint
    from lmforge.train.task_eval import greedy_replies

    from .reward import load_reward_model, score

    check_config(cfg)
    task = get_task(cfg.task)
    held = config_examples(task, "heldout", cfg.eval_n, cfg.seed, "eval_n")
    steps_per_rollout = cfg.steps_per_rollout
    n_rollouts = -(-cfg.train.steps // steps_per_rollout)
    pool = prompt_pool(task, max(cfg.prompts_per_rollout * n_rollouts, 1000), cfg.seed)
    check_pool(pool, cfg.prompts_per_rollout, "prompts_per_rollout", task)
    policy, tokenizer = load_base(cfg)
    reward_model, rm_tokenizer = load_reward_model(cfg.reward_model)
    if rm_tokenizer.fingerprint() != tokenizer.fingerprint():
        raise ConfigError(f"reward_model {cfg.reward_model}: its tokenizer ({rm_tokenizer.vocab_size} tokens) is not "
                          f"the policy's ({tokenizer.vocab_size}): train it from the same SFT run as base",
                          "reward_model")  # fmt: skip
    reward_model.requires_grad_(False)
    reference_logp = frozen_reference(policy, cfg.lora.enabled, cfg.temperature)
    if cfg.lora.enabled:
        apply_lora(policy, cfg.lora)  # the reference is the policy with its adapters off: no second copy
    critic = critic_from(reward_model) if cfg.critic == "reward_model" else None
    model = PolicyWithValue(policy, critic)
    kl_control = AdaptiveKL(cfg.beta, cfg.target_kl, cfg.kl_horizon)
    run_dir = create_run(cfg, tokenizer)
    cache: dict[int, tuple[PPOBatch, list[int]]] = {}

    score_mean, score_std = reward_scale(policy, tokenizer, reward_model, pool, cfg) if cfg.normalize_reward else (0, 1)

    @torch.no_grad()
    def make_rollout(key: int) -> PPOBatch:
        rng = random.Random(cfg.seed * 1_000_003 + key)
        chosen = rng.sample(pool, cfg.prompts_per_rollout)
        n = cfg.samples_per_prompt
        out = rollout(policy, tokenizer, [e.prompt_messages() for e in chosen], n=n, temperature=cfg.temperature,
                      max_new_tokens=cfg.max_new_tokens, seed=key)  # fmt: skip
        mask = out.mask[:, 1:].float()
        logits, values = model(out.rows)
        old_logp = next_token_logprobs(logits, out.rows, cfg.temperature)  # the sampler's distribution
        ref_logp = reference_logp(out.rows)
        scores = (reward_model(out.rows, out.last) - score_mean) / score_std
        logged_score = scores.mean().item()
        if n > 1:  # rows come prompt by prompt, n each
            scores = leave_one_out(scores.view(-1, n)).flatten()
        k1 = kl_k1(old_logp, ref_logp) * mask
        rewards = -kl_control.beta * k1  # the per-token KL penalty, as in InstructGPT
        rewards[torch.arange(len(out)), out.last - 1] += scores  # the score lands on the last response token
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values * mask, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
        kl_seq = k1.sum(1).mean().item()
        true = sum(task.grade(chosen[i], t) for i, t in zip(out.prompt_index, out.texts))  # logged, never a reward
        metrics = {"reward": logged_score, "kl": kl_seq,
                   "kl_k3": (kl_k3(old_logp, ref_logp) * mask).sum(1).mean().item(), "beta": kl_control.beta,
                   "response_len": mask.sum(1).mean().item(), "true_reward": true / len(out)}  # fmt: skip
        kl_control.update(kl_seq, len(out))
        return PPOBatch(out.rows, mask, old_logp, values * mask, advantages, returns, metrics)

    def batch_fn(step: int, micro: int, n_micro: int) -> PPOBatch:
        key, k = divmod(step, steps_per_rollout)
        if key not in cache:
            cache.clear()
            perms = [torch.randperm(cfg.rows_per_rollout, generator=torch.Generator().manual_seed(key * 31 + e))
                     for e in range(cfg.ppo_epochs)]  # fmt: skip
            cache[key] = (make_rollout(key), torch.cat(perms).tolist())
        full, order = cache[key]
        idx = order[k * cfg.minibatch : (k + 1) * cfg.minibatch]
        pick = {f: getattr(full, f)[idx] for f in ("rows", "mask", "old_logp", "old_values", "advantages", "returns")}
        return PPOBatch(**pick, metrics=full.metrics)

    held_ids = [tokenizer.render_chat(e.prompt_messages(), add_generation_prompt=True)[0] for e in held]

    @torch.no_grad()
    def eval_fn(m) -> dict[str, float]:
        """True accuracy (the grader) and the reward model's score of greedy held-out answers: the gap between
        the two over training is where reward hacking shows."""
        replies = greedy_replies(policy, tokenizer, held_ids, max_new_tokens=cfg.max_new_tokens)
        texts = [r.text for r in replies]
        m.train()
        return {
            "heldout_accuracy": sum(task.grade(e, t) for e, t in zip(held, texts)) / len(held),
            "heldout_rm_score": score(reward_model, tokenizer, [e.prompt for e in held], texts).mean().item(),
        }

    print(f"PPO on {task.spec()} with reward model {cfg.reward_model}: {cfg.prompts_per_rollout} prompts × "
          f"{cfg.samples_per_prompt} samples a rollout, "
          f"{cfg.ppo_epochs} epochs of minibatches of {cfg.minibatch}")  # fmt: skip
    loss_fn = ppo_loss(cfg.clip, cfg.value_clip, cfg.vf_coef, cfg.temperature)
    trainer = Trainer(model, cfg.train, run_dir, batch_fn=batch_fn, loss_fn=loss_fn, eval_fn=eval_fn,
                      tokens_fn=lambda b: int(b.mask.sum()), stateful={"kl_control": kl_control},
                      resume=cfg.resume)  # fmt: skip
    trainer.fit()  # a signal raises Stopped out of it, keeping the resumable checkpoint (value head too)
    # Later stages load the run like a pretraining run: the last checkpoint keeps the policy alone.
    if cfg.lora.enabled:
        finish_lora_run(policy, run_dir, trainer, cfg.lora)  # the adapters, merged, without the value head
    else:
        save_checkpoint(run_dir.checkpoints, trainer.step, policy, {"step": trainer.step},
                        keep=cfg.train.keep_checkpoints, info={"ppo": "policy only"})  # fmt: skip
    return run_dir
