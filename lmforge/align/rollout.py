"""Rollouts for RL fine-tuning: sample responses to chat prompts with the inference engine (continuous
batching, `n` samples per prompt sharing the prompt's KV blocks), then lay prompt + response out as training
rows with the response mask.

    batch = rollout(policy, tokenizer, prompts, n=8, temperature=1.0, max_new_tokens=8, seed=step)
    batch.rows, batch.mask, batch.texts            # [B·n, L] ids, [B·n, L] 1 on response tokens, decoded texts
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.infer.replies import generate_replies
from lmforge.infer.sampling import SamplingParams
from lmforge.train.loop import TrainConfig

from .pairs import pad


@dataclass
class Rollout:
    rows: torch.Tensor  # [B, L] prompt + response, right-padded
    mask: torch.Tensor  # [B, L] 1 on response tokens (those sampled, incl. the closing <|end|>)
    last: torch.Tensor  # [B] index of each row's last token
    texts: list[str]  # decoded responses, without specials
    prompt_index: list[int]  # which prompt each row answers

    def __len__(self) -> int:
        return self.rows.shape[0]


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[list[dict]], *, n: int = 1, temperature: float = 1.0,
            max_new_tokens: int = 16, seed: int = 0, top_p: float = 1.0) -> Rollout:  # fmt: skip
    """`n` sampled responses to each chat prompt (a list of messages ending with the user's turn)."""
    stops = tokenizer.stop_ids
    params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                             seed=seed * 100_003 + i, stop_ids=stops) for i in range(len(prompts))]  # fmt: skip
    replies = generate_replies(model, tokenizer, prompts, params)
    seqs = [(c.prompt + c.ids, [0] * len(c.prompt) + [1] * len(c.ids)) for c in replies]
    rows, mask, last = pad(seqs, tokenizer.pad_id, max_len=10**9)
    return Rollout(rows, mask, last, [c.text for c in replies], [c.prompt_index for c in replies])


def prompt_pool(task, n: int, seed: int) -> list:
    """Up to `n` distinct train-split examples of `task` (all of them when the task has fewer)."""
    from lmforge.data.tasks import HELDOUT_FRACTION, examples

    # the split is decided by a hash, so its exact size is unknown: ask for at most 90% of its expected size
    return examples(task, "train", min(n, int(task.size() * (1 - HELDOUT_FRACTION) * 0.9)), seed=seed)


def rl_train_config(eval_every: int) -> TrainConfig:
    """The loop settings PPO and GRPO share: a step's batch is its rollout (the stage sizes it, so batch_size is
    1), a small rate decaying tenfold, no weight decay (decay would drift the policy off the SFT weights it
    starts from)."""
    return TrainConfig(steps=100, batch_size=1, lr=1e-5, min_lr=1e-6, warmup_steps=5, eval_every=eval_every,
                       checkpoint_every=50, weight_decay=0.0)  # fmt: skip
