"""CLI commands of the post-training stage: `lmforge sft`. Heavy imports stay inside the functions, so
`lmforge --help` does not load torch."""

from __future__ import annotations

import argparse

from lmforge.cli import add_config_arguments, command, config_from_args


def _sft_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run of the same name from its last checkpoint")


@command("sft", help="supervised fine-tuning on chats or a task: full or LoRA (configs/sft/*.yaml)",
         arguments=_sft_args)  # fmt: skip
def sft(args: argparse.Namespace) -> None:
    from lmforge.align.sft import SFTConfig, run

    cfg = config_from_args(SFTConfig, args)
    cfg.resume = cfg.resume or args.resume
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
