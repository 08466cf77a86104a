"""CLI commands of the post-training stage: `lmforge sft`, `prefs collect|agreement`, `reward train|score`,
`dpo`, `grpo` and `ppo`. Heavy imports stay inside the functions, so `lmforge --help` does not load torch."""

from __future__ import annotations

import argparse

from lmforge.registry import add_config_arguments, command, config_from_args


def _sft_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run of the same name from its last checkpoint")


@command("sft", help="supervised fine-tuning on chats or a task: full or LoRA (configs/sft/*.yaml)",
         arguments=_sft_args)  # fmt: skip
def sft(args: argparse.Namespace) -> None:
    from lmforge.align.sft import SFTConfig, run

    cfg = config_from_args(SFTConfig, args)
    run_dir = run(cfg)
    print(f"run folder: {run_dir.path}")


def _prefs_args(p: argparse.ArgumentParser) -> None:
    from pathlib import Path

    sub = p.add_subparsers(dest="prefs_command", metavar="<subcommand>", title="subcommands", required=True)
    collect = sub.add_parser("collect", help="two answers per prompt, rated by human, program:TASK or judge:RUN|URL",
                             description="Collect preference pairs (resumable).")  # fmt: skip
    add_config_arguments(collect)
    agreement = sub.add_parser("agreement", help="pairwise Cohen's kappa of raters over the same pairs",
                               description="Agreement of preference files (pairs match by prompt, seeds).")  # fmt: skip
    agreement.add_argument("files", nargs="+", type=Path, metavar="FILE", help="JSONL written by prefs collect")


@command("prefs", help="preference pairs: collect them (human, program or AI judge) and measure rater agreement",
         arguments=_prefs_args)  # fmt: skip
def prefs(args: argparse.Namespace) -> None:
    if args.prefs_command == "collect":
        from lmforge.align.preferences import PrefsConfig, collect

        collect(config_from_args(PrefsConfig, args))
    else:
        from lmforge.align.agreement import agreement, format_agreement

        print(format_agreement(agreement(args.files)))


def _train_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run of the same name from its last checkpoint")


def _run_stage(module: str, config: str, args: argparse.Namespace) -> None:
    import importlib

    stage = importlib.import_module(f"lmforge.align.{module}")
    cfg = config_from_args(getattr(stage, config), args)
    run_dir = stage.run(cfg)  # a user's mistake found there is a UserError; any other exception is a bug
    print(f"run folder: {run_dir.path}")


def _reward_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="reward_command", metavar="<subcommand>", title="subcommands", required=True)
    _train_args(sub.add_parser("train", help="train a Bradley-Terry reward model on preference pairs"))
    score = sub.add_parser("score", help="score (prompt, response) pairs with a trained reward model")
    score.add_argument("run", help="a reward model's run folder")
    score.add_argument("--prompt", required=True)
    score.add_argument("--response", action="append", required=True, help="repeatable: each is scored")


@command("reward", help="reward model: train on preference pairs, or score responses", arguments=_reward_args)
def reward(args: argparse.Namespace) -> None:
    if args.reward_command == "train":
        _run_stage("reward", "RewardConfig", args)
        return
    from lmforge.align.reward import load_reward_model, score

    model, tok = load_reward_model(args.run)
    for response, r in zip(args.response, score(model, tok, [args.prompt] * len(args.response), args.response)):
        print(f"{r.item():+.4f}  {response}")


@command("dpo", help="direct preference optimisation (or IPO) from an SFT run on preference pairs",
         arguments=_train_args)  # fmt: skip
def dpo(args: argparse.Namespace) -> None:
    _run_stage("dpo", "DPOConfig", args)


@command("grpo", help="GRPO: group-normalised policy gradient with a program's reward", arguments=_train_args)
def grpo(args: argparse.Namespace) -> None:
    _run_stage("grpo", "GRPOConfig", args)


@command("ppo", help="PPO with a learned reward model and a per-token KL penalty", arguments=_train_args)
def ppo(args: argparse.Namespace) -> None:
    _run_stage("ppo", "PPOConfig", args)


def _cai_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="cai_command", metavar="<stage>", title="stages", required=True)
    add_config_arguments(sub.add_parser("supervised", help="critique → revise with the constitution, then SFT"))
    add_config_arguments(sub.add_parser("feedback", help="AI-feedback preference pairs, one principle each"))


@command("cai", help="Constitutional AI: critique-and-revise SFT, and AI-feedback pairs for a reward model",
         arguments=_cai_args)  # fmt: skip
def cai(args: argparse.Namespace) -> None:
    from lmforge.align.constitutional import CAIConfig, feedback, supervised

    cfg = config_from_args(CAIConfig, args)
    if args.cai_command == "supervised":
        run_dir = supervised(cfg)
        if run_dir is not None:
            print(f"run folder: {run_dir.path}")
    else:
        summary = feedback(cfg)
        print(f"pairs: {summary}")
