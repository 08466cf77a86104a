"""The `lmforge` command: `lmforge <command> [options]`, also `python -m lmforge`.

The CLI is thin: a command parses its arguments, calls one function of a stage, and prints. Stages register
their commands in their own `commands.py` with `lmforge.registry.command`; this file imports the modules listed
in COMMAND_MODULES to build the parser, and holds the error policy.

Errors a user can fix (a bad config, a missing file, an existing run folder) print one line,
`lmforge: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lmforge import __version__, registry
from lmforge.config import UserError
from lmforge.registry import add_config_arguments, command, config_from_args
from lmforge.runs import Stopped

# Modules (besides this one) whose @command functions join the CLI. Add a stage's command module here.
COMMAND_MODULES: list[str] = [
    "lmforge.data.commands",
    "lmforge.train.commands",
    "lmforge.infer.commands",
    "lmforge.scaling.commands",
    "lmforge.align.commands",
    "lmforge.serve.commands",
    "lmforge.demo",
]

# The error policy, in one place: these exceptions mean "the user asked for something impossible" and are
# shown as one line, `lmforge: error: ...`, exit status 2. Stages raise `UserError` (lmforge/config.py) for
# every mistake a user can fix; a missing or existing path is the OS's own error for the same thing.
# Everything else -- a bare ValueError, a RuntimeError from torch, a KeyError -- is a bug in lmforge and keeps
# its traceback, so that it gets reported and fixed instead of being hidden behind a vague line.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)  # runs its @command decorators
    parser = argparse.ArgumentParser(prog="lmforge", description="From raw text to an aligned, served language model.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for cmd in sorted(registry.COMMANDS.values(), key=lambda c: c.name):
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
