"""`train.seed` reproduces every post-training stage bit for bit: the seed is set before any weights are made
(a reward head, a PPO critic, LoRA adapters), not only before the first step."""

from __future__ import annotations

import pytest

from lmforge.config import load_config

STAGES = {  # every stage that initialises weights of its own: a head, a critic, LoRA adapters
    "sft-lora": ("sft", ["lora.rank=4"]),
    "reward": ("reward", []),
    "dpo-lora": ("dpo", ["beta=0.2", "lora.rank=4"]),
    "grpo": ("grpo", ["task=add:digits=1", "n=2", "prompts_per_step=2", "max_new_tokens=2", "eval_n=2"]),
    "ppo": ("ppo", ["task=add:digits=1", "prompts_per_rollout=2", "minibatch=2", "ppo_epochs=1",
                    "max_new_tokens=2", "eval_n=2"]),
}  # fmt: skip


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_post_training_stage_reproduces_with_one_seed(stage, base_run, tmp_path):
    import importlib

    import torch

    root, base, chats, pairs = base_run
    module, extra = STAGES[stage]
    mod = importlib.import_module(f"lmforge.align.{module}")
    config_cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("Config") and n.lower().startswith(module))
    args = [f"base={base}", f"runs_dir={tmp_path}", "train.steps=2", "train.batch_size=2", "train.warmup_steps=1",
            "train.eval_every=100", "train.progress=false", "train.precision=fp32", "train.seed=3", *extra]  # fmt: skip
    if module in ("sft",):
        args.append(f"data={chats}")
    if module in ("reward", "dpo"):
        args.append(f"data={pairs}")
    if module == "ppo":
        rm = tmp_path / "rm"
        if not rm.exists():
            from lmforge.align.reward import RewardConfig
            from lmforge.align.reward import run as reward_run

            rm_args = [f"base={base}", f"data={pairs}", f"runs_dir={tmp_path}", "name=rm", "train.steps=1",
                       "train.progress=false"]  # fmt: skip
            reward_run(load_config(RewardConfig, None, rm_args))
        args.append(f"reward_model={rm}")
    results = []
    for name in ("one", "two"):
        torch.manual_seed(ord(name[1]))  # a different global state before each run
        run = mod.run(load_config(config_cls, None, [*args, f"name={name}"]))
        results.append([(r["step"], r.get("loss")) for r in run.read_metrics() if "loss" in r])
    assert results[0] and results[0] == results[1]
