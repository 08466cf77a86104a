"""CLI commands of the data stage: `lmforge prepare` and `lmforge tokenizer train`.

    lmforge prepare                                          # stdlib, BPE-4096 -> data/python-stdlib
    lmforge prepare --source text:notes/ --vocab-size 8192 --split-digits --out data/notes
    lmforge prepare --config configs/data/stdlib.yaml vocab_size=8192 seed=1
    lmforge tokenizer train --source python-stdlib --vocab-size 4096 --out tokenizers/stdlib-4096

Registered through lmforge.registry (lmforge.cli.COMMAND_MODULES lists this module), so it imports nothing heavy at
the top: `lmforge --help` must not load numpy, torch or tokenizers.
"""

from __future__ import annotations

import argparse
import json

from lmforge.registry import add_config_arguments, command, config_from_args

_SOURCE_HELP = "python-stdlib (default), text:PATH (a file or folder) or jsonl:PATH[:FIELD]"


def _prepare_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    flags = parser.add_argument_group("shortcuts for config fields (they win over --config and key=value)")
    flags.add_argument("--source", help=_SOURCE_HELP)
    flags.add_argument("--out", metavar="DIR", help="output folder (default: data/<slug of source>)")
    flags.add_argument("--tokenizer", metavar="PATH", help="use this tokenizer.json instead of training one")
    flags.add_argument("--vocab-size", type=int, metavar="N", help="BPE vocabulary size (default 4096)")
    flags.add_argument("--split-digits", action="store_true", default=None, help="one token per digit")
    flags.add_argument("--char", action="store_true", default=None, help="a char tokenizer instead of BPE")
    flags.add_argument("--val-fraction", type=float, metavar="F", help="share of bytes for val (0.05)")
    flags.add_argument("--seed", type=int, help="picks the val groups (0)")
    flags.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output")


@command("prepare", help="tokenize a corpus into train/val token files", arguments=_prepare_arguments)
def prepare(args: argparse.Namespace) -> None:
    from lmforge.data.prepare import PrepareConfig, run

    shortcuts = {
        "source": args.source,
        "out": args.out,
        "tokenizer": args.tokenizer,
        "vocab_size": args.vocab_size,
        "split_digits": args.split_digits,
        "tokenizer_kind": "char" if args.char else None,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "overwrite": args.overwrite,
    }
    # Shortcuts become overrides (JSON is valid YAML, so a path like "yes" or "1e3" stays a string) and go
    # through the same loading and validation as a config file.
    args.overrides = [
        *args.overrides,
        *(f"{k}={json.dumps(v)}" for k, v in shortcuts.items() if v is not None),
    ]
    run(config_from_args(PrepareConfig, args))


def _tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="<action>", title="actions", required=True)
    train = actions.add_parser(
        "train",
        help="train a tokenizer on a corpus's train split",
        description="Train a tokenizer on the train split of a corpus (the split `lmforge prepare` makes "
        "with the same --val-fraction and --seed) and save tokenizer.json + tokenizer_config.json.",
    )
    train.add_argument("--source", default="python-stdlib", help=_SOURCE_HELP)
    train.add_argument("--vocab-size", type=int, default=4096, metavar="N", help="BPE vocabulary size (4096)")
    train.add_argument("--out", required=True, metavar="PATH", help="a folder, or a path ending in .json")
    train.add_argument("--split-digits", action="store_true", help="one token per digit")
    train.add_argument("--char", action="store_true", help="a char tokenizer instead of BPE")
    train.add_argument("--val-fraction", type=float, default=0.05, metavar="F", help="held out (0.05)")
    train.add_argument("--seed", type=int, default=0, help="picks the held-out groups (0)")
    train.add_argument(
        "--overwrite", action="store_true", help="replace the tokenizer files of a --out that already holds files"
    )


@command("tokenizer", help="train a tokenizer (`lmforge tokenizer train`)", arguments=_tokenizer_arguments)
def tokenizer(args: argparse.Namespace) -> None:
    from lmforge.data.prepare import train_tokenizer

    if args.action == "train":
        train_tokenizer(
            args.source,
            args.vocab_size,
            args.out,
            kind="char" if args.char else "bpe",
            split_digits=args.split_digits,
            val_fraction=args.val_fraction,
            seed=args.seed,
            overwrite=args.overwrite,
        )
