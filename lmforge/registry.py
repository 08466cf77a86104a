"""The command registry: how a stage's `commands.py` adds a command to `lmforge` without importing the CLI.

    from lmforge.registry import add_config_arguments, command, config_from_args

    @command("pretrain", help="train a model from a recipe", arguments=add_config_arguments)
    def pretrain(args):
        from lmforge.train.pretrain import PretrainConfig, run   # imported only when the command runs

        run(config_from_args(PretrainConfig, args))

`lmforge/cli.py` imports the modules it lists (COMMAND_MODULES) to build the parser, so those modules must not
import torch (or anything slow) at module level: heavy imports stay inside the command function, and
`lmforge --help` stays instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lmforge.config import load_config

T = TypeVar("T")
Run = Callable[[argparse.Namespace], int | None]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Run
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS: dict[str, Command] = {}


def command(name: str, *, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None
            ) -> Callable[[Run], Run]:  # fmt: skip
    """Register the decorated `fn(args) -> exit code | None` as `lmforge <name>`.

    `arguments(parser)` adds the command's options; `help` is the one line shown by `lmforge --help`.
    """

    def register(fn: Run) -> Run:
        if name in COMMANDS and COMMANDS[name].run is not fn:
            raise ValueError(f"lmforge command {name!r} is registered twice")
        COMMANDS[name] = Command(name, help, fn, arguments)
        return fn

    return register


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """The arguments every stage command shares: `--config PATH` and trailing `key=value` overrides."""
    parser.add_argument("--config", type=Path, metavar="PATH", required=required, help="YAML recipe (see configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="set a config field, dotted for nested fields, value in YAML: model.n_layer=4 lr=1e-3",
    )


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Load `cls` from the `--config` file and overrides that `add_config_arguments` declared.

    With `--resume` (or resume=true) the run's own config.yaml is the base instead, and only the overrides
    given now are applied to it (lmforge.runs.resume_config): a resumed run trains the model it started with.
    """
    cfg = load_config(cls, args.config, args.overrides)
    writes_a_run = hasattr(cfg, "runs_dir") and hasattr(cfg, "name")  # (prefs' resume continues a file instead)
    if writes_a_run and (getattr(args, "resume", False) or getattr(cfg, "resume", False)):
        from lmforge.runs import resume_config

        cfg = resume_config(cls, cfg, args.overrides)
    return cfg


MODEL_HELP = "a run folder (runs/tiny), one of its checkpoints, a Hugging Face folder or a .gguf file"


def add_model_argument(parser: argparse.ArgumentParser, *, alias: str | None = None) -> None:
    """The positional MODEL of every command that takes one (`lmforge.train.resolve.resolve_model` reads it).
    `alias` keeps an older option spelling working (`generate --ckpt`); read the value with `model_from_args`."""
    parser.add_argument("model", nargs="?" if alias else None, metavar="MODEL", help=MODEL_HELP)
    if alias:
        parser.add_argument(alias, dest="model_alias", metavar="MODEL", help="the same as MODEL (kept for scripts)")


def model_from_args(args: argparse.Namespace) -> str:
    from lmforge.config import UserError

    given = [m for m in (args.model, getattr(args, "model_alias", None)) if m]
    if len(given) != 1:
        raise UserError(f"give one MODEL: {MODEL_HELP}" if not given else "give MODEL or --ckpt, not both")
    return given[0]
