"""The losses and estimators of post-training, as small pure functions over tensors (each checked against a
hand computation in tests/align/test_losses.py):

    bradley_terry_loss   reward model: −log σ(r_chosen − r_rejected − margin) (+ reward centering)
    dpo_loss             DPO, with conservative label smoothing, or IPO
    kl_k1, kl_k3         per-token KL estimators (Schulman 2020, "Approximating KL divergence")
    gae                  generalised advantage estimation (Schulman et al. 2016)
    ppo_policy_loss      the clipped surrogate (Schulman et al. 2017), and the clipped value loss
    group_advantages     GRPO's group-normalised advantages (Shao et al. 2024, DeepSeekMath)
    token_logprobs       log π(token) of each target under a model, for every method above

Masks are 1 on the tokens a loss covers (a response's tokens), 0 elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ---- helpers ----------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries (mean kept when `shift_mean` is False, as for rewards)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def next_token_logprobs(logits: torch.Tensor, rows: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, T-1] log-probability of rows[:, 1:] from the logits [B, T-1, V] of rows[:, :-1] (in fp32) at
    `temperature`: RL scores tokens under the distribution they were sampled from (softmax(logits / T)), or the
    importance ratio and the KL are those of another policy whenever T ≠ 1."""
    return torch.gather(F.log_softmax(logits.float() / temperature, -1), 2, rows[:, 1:, None]).squeeze(2)


def token_logprobs(model, rows: torch.Tensor, temperature: float = 1.0, **forward) -> torch.Tensor:
    """`next_token_logprobs` of `model`'s forward over rows[:, :-1]; `forward` goes to it (positions, attn_mask)."""
    return next_token_logprobs(model(rows[:, :-1], **forward), rows, temperature)


def masked_token_logprobs(model, rows: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`token_logprobs` where `mask` [B, T-1] is 1 (a response's tokens), 0 elsewhere: the LM head runs only there
    (`logits_at`), which on a real vocabulary is most of a scoring forward's cost when prompts are long."""
    where = mask.bool()
    logits = model(rows[:, :-1], logits_at=where)
    picked = torch.gather(F.log_softmax(logits.float() / temperature, -1), 1, rows[:, 1:][where][:, None])
    return torch.zeros(where.shape, dtype=picked.dtype, device=picked.device).masked_scatter(where, picked.squeeze(1))


def sequence_logprob(model, rows: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[B] summed log-probability of the masked target tokens (a response given its prompt)."""
    return (token_logprobs(model, rows) * masks[:, 1:].float()).sum(-1)


# ---- reward model -----------------------------------------------------------------------------------------


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0, center: float = 0.0
) -> torch.Tensor:
    """−log σ(r_c − r_r − margin), mean over pairs (Bradley & Terry 1952; the margin as in Llama 2, Touvron et
    al. 2023), plus `center`·mean((r_c + r_r)²), which pins the reward's mean near 0 (Eisenstein et al. 2023)
    so rewards of different runs are comparable."""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center:
        loss = loss + center * ((r_chosen + r_rejected) ** 2).mean()
    return loss


# ---- DPO / IPO --------------------------------------------------------------------------------------------


@dataclass
class DPOOutput:
    loss: torch.Tensor
    rewards_chosen: torch.Tensor  # β·(log π − log π_ref) of the chosen responses, [B], detached
    rewards_rejected: torch.Tensor

    def metrics(self) -> dict[str, float]:
        margin = self.rewards_chosen - self.rewards_rejected
        return {
            "rewards/chosen": self.rewards_chosen.mean().item(),
            "rewards/rejected": self.rewards_rejected.mean().item(),
            "rewards/accuracy": (margin > 0).float().mean().item(),
            "rewards/margin": margin.mean().item(),
        }


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> DPOOutput:
    """Sequence log-probs [B] in; the DPO loss −log σ(β·h) with h = (log π_c − log π_ref,c) − (log π_r − log
    π_ref,r) (Rafailov et al. 2023, eq. 7). `label_smoothing` ε assumes labels flip with probability ε:
    −(1−ε)·log σ(βh) − ε·log σ(−βh) (conservative DPO, Mitchell 2023). `loss_type="ipo"`: (h − 1/(2β))²
    (Azar et al. 2023, eq. 17), which does not push h to infinity on deterministic preferences."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    chosen = (beta * (policy_chosen - ref_chosen)).detach()
    rejected = (beta * (policy_rejected - ref_rejected)).detach()
    return DPOOutput(loss.mean(), chosen, rejected)


# ---- KL, GAE, PPO -----------------------------------------------------------------------------------------


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log π − log π_ref per sampled token: unbiased for KL(π‖π_ref), high variance, can be negative."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(r − 1) − log r with r = π_ref/π per sampled token: unbiased, always ≥ 0, low variance (Schulman 2020)."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns [B, T] (Schulman et al. 2016, eq. 16): δ_t = r_t + γ·V_{t+1} − V_t, A_t = δ_t +
    γλ·A_{t+1}, with V = 0 and A = 0 past a sequence's last masked token. Returns = A + V (the value target)."""
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # positions outside the mask pass nothing backwards
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, adv, next_adv)
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A), ρ = π/π_old (Schulman et al. 2017, eq. 7), as a
    masked mean; and the fraction of tokens where the clip was active."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped < unclipped).float(), mask)
    return loss, clip_fraction.detach()


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> torch.Tensor:
    """½·max((V − R)², (V_clipped − R)²), V_clipped = V_old + clip(V − V_old, −ε, ε), as a masked mean (the
    value clipping of OpenAI's baselines, kept by InstructGPT-style PPO)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, scale: str = "group") -> torch.Tensor:
    """[n_prompts, n_samples] rewards → (r − mean_group) / (std + eps) (GRPO, Shao et al. 2024): the group's own
    samples are the baseline, so no value model is needed. A group with equal rewards gets 0. `scale`: the std of
    the group ("group", GRPO's), of the whole batch ("batch"), or none ("none": Dr. GRPO, Liu et al. 2025, who
    show the group std over-weights easy and hard prompts). The std is the sample std (n − 1), as TRL's
    GRPOTrainer computes it."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if scale == "none":
        return centred
    if scale == "batch":
        return centred / (rewards.std() + eps)
    if scale != "group":
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return centred / (rewards.std(-1, keepdim=True) + eps)


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """[n_prompts, n_samples] rewards → each minus the mean of the *other* samples of its prompt (RLOO, Ahmadian et
    al. 2024; Kool et al. 2019): n/(n − 1)·(r − mean of all n). A prompt's offset cancels; unlike GRPO's, the scale
    is kept. Needs n ≥ 2."""
    n = rewards.shape[-1]
    return n / (n - 1) * (rewards - rewards.mean(-1, keepdim=True))
