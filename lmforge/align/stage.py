"""What every post-training stage does first: load the earlier run it starts from, and open its own run folder.

model, tokenizer = load_base(cfg)                # cfg.base: any MODEL (run, checkpoint, HF folder, .gguf)
run_dir = create_run(cfg, tokenizer)             # runs/<name>/ with config.yaml and the tokenizer
check_config(cfg)                                # cfg.validate() for a config built in Python: a ConfigError
held = config_examples(task, "heldout", cfg.eval_n, cfg.seed, "eval_n")   # too few prompts: a ConfigError
"""

from __future__ import annotations

import os

from lmforge.config import ConfigError, UserError
from lmforge.runs import RunDir


def one_process(stage: str) -> None:
    """RL stages roll out on one process: under torchrun every rank would sample and train on the same prompts."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"lmforge {stage} runs on one process (its rollouts are not sharded over ranks yet, so "
                        "every rank would train on the same samples): run it without torchrun")  # fmt: skip


def check_config(cfg) -> None:
    """`cfg.validate()`, for a config a caller built in Python (`load_config` has run it already): its ValueError
    is the config's fault, so a one-line ConfigError."""
    try:
        cfg.validate()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def config_examples(task, split: str, n: int, seed: int, key: str) -> list:
    """`n` examples of a task's split for a count the config sets at `key`: a split with fewer prompts than
    that is a ConfigError naming the key (its other ValueErrors, a bad split or n < 0, cannot come from a
    validated config)."""
    from lmforge.data.tasks import examples

    assert split in ("train", "heldout") and n >= 0, (split, n)  # so the only ValueError left is "too few"
    try:
        return examples(task, split, n, seed=seed)
    except ValueError as e:
        raise ConfigError(f"{key}={n}: {e}", key) from None


def load_base(cfg):
    """(model, tokenizer) of `cfg.base`: a run, a checkpoint, an HF folder or a .gguf file
    (`lmforge.train.resolve.resolve_model`). `cfg.model` becomes the base's model config, so the stage's
    config.yaml loads like a pretraining run's."""
    from lmforge.train.resolve import resolve_model

    model, tokenizer, base_cfg = resolve_model(cfg.base)
    cfg.model = base_cfg.model
    return model, tokenizer


def check_pool(pool: list, per_step: int, key: str, task) -> None:
    """A rollout samples `per_step` distinct prompts of the pool: a task with fewer is the config's fault."""
    if per_step > len(pool):
        raise ConfigError(f"{key}={per_step}: the train split of {task.spec()} has only {len(pool)} prompts to "
                          f"sample from: lower {key} or widen the task", key)  # fmt: skip


def create_run(cfg, tokenizer) -> RunDir:
    """The stage's run folder (resumed when `cfg.resume`), carrying its tokenizer — lmforge's or the imported
    model's own, with its chat template — for the stages after it. Under torchrun rank 0 creates (and locks) it
    and the other ranks open the folder rank 0 named; only rank 0 writes into it."""
    from lmforge.train.distributed import environment, gather_objects

    env = environment()
    run_dir = None
    if env.rank == 0:
        run_dir = RunDir.create(cfg.runs_dir, cfg.name, cfg, resume=cfg.resume)
        tokenizer.save(run_dir.path)
    path, resumed = gather_objects((str(run_dir.path), run_dir.resumed) if run_dir else None, env)[0]
    return run_dir or RunDir(path, resumed)


def frozen_reference(policy, lora: bool, temperature: float = 1.0):
    """`rows -> log π_ref(tokens)` of the policy as it is now. Call it before LoRA wraps the policy: without
    LoRA the reference is a frozen copy; with LoRA it is the policy with its adapters off, so no second copy of
    the weights is kept (the base weights never change). Log-probs at the rollouts' sampling `temperature`."""
    import copy

    import torch

    from .lora import adapters_disabled
    from .losses import token_logprobs

    reference = None if lora else copy.deepcopy(policy).eval().requires_grad_(False)

    @torch.no_grad()
    def logprobs(rows):
        if reference is not None:
            return token_logprobs(reference, rows, temperature)
        with adapters_disabled(policy):
            return token_logprobs(policy, rows, temperature)

    return logprobs
