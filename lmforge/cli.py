"""The `lmforge` command: `lmforge <command> [options]`, also `python -m lmforge`.

The CLI is thin: a command parses its arguments, calls one function of a stage, and prints. Commands
register themselves with a decorator:

    @command("pretrain", help="train a model from a recipe", arguments=add_config_arguments)
    def pretrain(args):
        from lmforge.train.pretrain import PretrainConfig, run   # imported only when the command runs

        run(config_from_args(PretrainConfig, args))

A command lives in this file or in a module listed in COMMAND_MODULES. Those modules are imported to
build the parser, so they must not import torch (or anything slow) at module level: keep heavy imports
inside the command function, and `lmforge --help` stays instant.

Errors a user can fix (a bad config, a missing file, an existing run folder) print one line,
`lmforge: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lmforge import __version__
from lmforge.config import UserError, load_config
from lmforge.runs import Stopped

T = TypeVar("T")

# Modules (besides this one) whose @command functions join the CLI. Add a stage's command module here.
COMMAND_MODULES: list[str] = [
    "lmforge.data.commands",
    "lmforge.train.commands",
    "lmforge.infer.commands",
    "lmforge.scaling.commands",
    "lmforge.align.commands",
]

# The error policy, in one place: these exceptions mean "the user asked for something impossible" and are
# shown as one line, `lmforge: error: ...`, exit status 2. Stages raise `UserError` (lmforge/config.py) for
# every mistake a user can fix; a missing or existing path is the OS's own error for the same thing.
# Everything else -- a bare ValueError, a RuntimeError from torch, a KeyError -- is a bug in lmforge and keeps
# its traceback, so that it gets reported and fixed instead of being hidden behind a vague line.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int | None]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


_COMMANDS: dict[str, Command] = {}


def command(
    name: str, *, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> Callable[[Callable[[argparse.Namespace], int | None]], Callable[[argparse.Namespace], int | None]]:
    """Register the decorated `fn(args) -> exit code | None` as `lmforge <name>`.

    `arguments(parser)` adds the command's options; `help` is the one line shown by `lmforge --help`.
    """

    def register(
        fn: Callable[[argparse.Namespace], int | None],
    ) -> Callable[[argparse.Namespace], int | None]:
        if name in _COMMANDS and _COMMANDS[name].run is not fn:
            raise ValueError(f"lmforge command {name!r} is registered twice")
        _COMMANDS[name] = Command(name, help, fn, arguments)
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


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)  # runs its @command decorators
    parser = argparse.ArgumentParser(prog="lmforge", description="From raw text to an aligned, served language model.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for cmd in sorted(_COMMANDS.values(), key=lambda c: c.name):
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.arguments is not None:
            cmd.arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `lmforge` with `argv` (default: sys.argv[1:]) and return the exit status."""
    parser = build_parser()
    # parse_known_args so overrides may also follow options (`--config x.yaml lr=1 --seed 2 n_layer=4`):
    # argparse hands back the ones after the first option as unknown, and they are put back here.
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if unknown:
        stray = [u for u in unknown if u.startswith("-") or "=" not in u or not hasattr(args, "overrides")]
        if stray:
            hint = " (overrides take no dashes: key=value)" if any("=" in s for s in stray) else ""
            parser.error(f"unrecognized arguments: {' '.join(stray)}{hint}")
        args.overrides = [*args.overrides, *unknown]
    try:
        status = args._command.run(args)
    except USER_ERRORS as e:
        message = " ".join(str(e).splitlines()) or type(e).__name__
        print(f"lmforge: error: {message}", file=sys.stderr)
        return 2
    except Stopped as e:  # a run checkpointed and stopped on a signal: the shell's code for that signal
        print(f"lmforge: stopped: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else int(status)


# ---------------------------------------------------------------------------------------------- commands


@command(
    "model-info",
    help="print a model's size, FLOPs and memory from a model config",
    arguments=add_config_arguments,
)
def model_info(args: argparse.Namespace) -> None:
    from lmforge.model import ModelConfig

    print(config_from_args(ModelConfig, args).summary())
