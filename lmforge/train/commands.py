"""CLI commands of the training stage: pretrain, sample, eval, export. Heavy imports stay inside the functions
so `lmforge --help` does not load torch."""

from __future__ import annotations

import argparse
import json

from lmforge.registry import add_config_arguments, add_model_argument, command, config_from_args


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run of the same name from its last checkpoint")


@command("pretrain", help="train a language model from a recipe (configs/pretrain/*.yaml)", arguments=_pretrain_args)
def pretrain(args: argparse.Namespace) -> None:
    from lmforge.train.pretrain import PretrainConfig, run

    run_dir = run(config_from_args(PretrainConfig, args))
    print(f"run folder: {run_dir.path}")


def _count(text: str) -> int:
    """argparse type of a count that may be 0: a negative one is refused with the option's name."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def _sample_args(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--prompt", default="", help="text to continue (default: empty, i.e. from <|bos|>-less start)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)


@command("sample", help="continue a prompt with a model (run, checkpoint, HF folder, .gguf), streaming",
         arguments=_sample_args)  # fmt: skip
def sample(args: argparse.Namespace) -> None:
    from lmforge.infer.commands import sampling_params_from_args
    from lmforge.train.artifacts import sample as sample_run

    sampling_params_from_args(args)  # a value out of range is one line, before the model loads
    print(args.prompt, end="", flush=True)
    sample_run(args.model, args.prompt or "\n", max_new_tokens=args.max_new_tokens, temperature=args.temperature,
               top_k=args.top_k, seed=args.seed)  # fmt: skip


def _eval_args(p: argparse.ArgumentParser) -> None:
    from lmforge.data.tasks import available_tasks

    add_model_argument(p)
    p.add_argument("--data", default=None, help="prepared data folder (default: the run's own)")
    p.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="perplexity on a text file, in windows of --ctx tokens, with the model's own tokenizer",
    )
    p.add_argument("--ctx", type=int, default=None, help="--text: tokens a window (default: the model's context)")
    p.add_argument("--batches", type=_count, default=0, help="val batches to use (default 0: the whole split)")
    p.add_argument("--tasks", default=None, metavar="SPECS",
                   help="exact match on verifiable tasks instead of val loss, comma-separated specs, e.g. "
                        f"add:digits=3,reverse; tasks: {', '.join(available_tasks())}")  # fmt: skip
    p.add_argument("--n", type=int, default=1000, help="--tasks: prompts per task (default 1000)")
    p.add_argument("--split", default="heldout", choices=["heldout", "train"], help="--tasks: prompt split")
    p.add_argument("--seed", type=int, default=0, help="--tasks: which prompts of the split are drawn")
    p.add_argument("--batch", type=int, default=64, help="--tasks: prompts generated at once (default 64)")
    p.add_argument("--json", action="store_true", help="print JSON")


@command("eval", help="val loss and bits per byte, perplexity on a text (--text), or exact match on tasks (--tasks)",
         arguments=_eval_args)  # fmt: skip
def evaluate(args: argparse.Namespace) -> None:
    if args.tasks is not None:
        return _evaluate_tasks(args)
    if args.text is not None:
        return _evaluate_text(args)
    from lmforge.train.artifacts import evaluate as evaluate_run

    if args.data is not None:
        _check_same_tokenizer(args.model, args.data)
    result = evaluate_run(args.model, args.data, batches=args.batches)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"val loss {result['val_loss']:.4f} nats/token, {result['val_bpb']:.4f} bits/byte")


def _evaluate_text(args: argparse.Namespace) -> None:
    from lmforge.config import ConfigError
    from lmforge.train.artifacts import evaluate_text

    if args.data is not None or args.batches:
        raise ConfigError("--data and --batches belong to the val-split evaluation; drop them with --text")
    result = evaluate_text(args.model, args.text, ctx=args.ctx)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"perplexity {result['perplexity']:.4f} ({result['nll']:.5f} nats/token) over {result['tokens']:,} "
            f"predicted tokens in {result['windows']} windows of ≤ {result['ctx']}"
        )


def _check_same_tokenizer(run: str, data: str) -> None:
    """Refuse, before the model loads, val data whose token ids mean other tokens than the run's tokenizer
    gives them: its loss would be about other text, a meaningless figure."""
    from pathlib import Path

    from lmforge.config import ConfigError
    from lmforge.tokenizer import load_tokenizer

    ours, theirs = Path(run) / "tokenizer.json", Path(data) / "tokenizer.json"
    if not (ours.is_file() and theirs.is_file()):
        return  # a missing file is the loaders' error to report, with their message
    if load_tokenizer(ours).fingerprint() != load_tokenizer(theirs).fingerprint():  # an imported model's too
        raise ConfigError(
            f"--data {data} was tokenized with another tokenizer than {run}; prepare it with the run's "
            f"(lmforge prepare --tokenizer {ours}) or drop --data to use the run's own val split"
        )


def _evaluate_tasks(args: argparse.Namespace) -> None:
    from lmforge.config import ConfigError
    from lmforge.data.tasks import examples, get_task, parse_task_list

    if args.data is not None or args.batches:
        raise ConfigError("--data and --batches belong to the val-loss evaluation; drop them with --tasks")
    if args.n < 1 or args.batch < 1:
        raise ConfigError(f"--n and --batch must be >= 1, got {args.n} and {args.batch}")
    try:  # every spec, and that its split holds --n prompts, before the model is loaded
        tasks = [get_task(spec) for spec in parse_task_list(args.tasks)]
        for task in tasks:
            examples(task, args.split, args.n, args.seed)
    except ValueError as e:
        raise ConfigError(f"--tasks: {e}") from None

    import torch

    from lmforge.infer.loading import load_for_inference
    from lmforge.train.task_eval import evaluate_tasks, format_result

    model, tok = load_for_inference(args.model)
    if torch.cuda.is_available():
        model = model.cuda()
    results = {}
    for task in tasks:
        result = evaluate_tasks(model, tok, task, n=args.n, split=args.split, seed=args.seed, batch_size=args.batch,
                                progress=not args.json)  # fmt: skip
        results[result["task"]] = result
        if not args.json:
            print(format_result(result), flush=True)
    if args.json:
        print(json.dumps({"run": str(args.model), "tasks": results}))


def _export_args(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--to", default="hf", choices=["hf", "gguf"], help="a Hugging Face folder, or a llama.cpp file")
    p.add_argument(
        "--out",
        required=True,
        help="output folder (hf; refused if it holds anything, unless --overwrite) "
        "or file (gguf; refused if it exists, unless --overwrite)",
    )
    p.add_argument("--quantize", choices=["f32", "f16", "q8_0"], default="f32", help="gguf weights (norms stay f32)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files export writes in a non-empty --out (other files there are kept)",
    )


@command("export", help="export a model as a Hugging Face folder or a GGUF file (weights, tokenizer, chat template)",
         arguments=_export_args)  # fmt: skip
def export(args: argparse.Namespace) -> None:
    from lmforge.train.artifacts import export as export_run

    print(f"exported to {export_run(args.model, args.to, args.out, overwrite=args.overwrite, quantize=args.quantize)}")
