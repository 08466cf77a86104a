"""CLI commands of the inference stage: `lmforge generate` (streaming to the terminal) and `lmforge bench`
(the inference benchmarks of a source checkout). Heavy imports stay inside the functions."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from lmforge.config import UserError
from lmforge.hardware import QUANT_SCHEMES
from lmforge.registry import add_model_argument, command, model_from_args

KV_CHOICES = ["contiguous", "int8", "paged", "paged-int8", "sliding"]
QUANT_CHOICES = list(QUANT_SCHEMES)  # lmforge.infer.quantize.SCHEMES is keyed by the same tuple


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape_stop(text: str) -> str:
    r"""A stop string as typed in a shell, made into the text it means: `--stop "\n\n"` (the README's blank line)
    reaches Python as backslash-n twice, because shells keep backslashes in quotes. \n, \t and \r become newline,
    tab and carriage return, \\ one backslash (so `\\n` stops at a backslash and an n); any other backslash stays
    as typed. `add_sampling_arguments` applies it to --stop; Python callers pass real characters."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


SAMPLING_DEFAULTS = dict(max_new_tokens=200, temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                         seed=0)  # fmt: skip


def add_sampling_arguments(p: argparse.ArgumentParser, **defaults) -> None:
    """The sampling options of every command that generates (`generate`, `sample`): --max-new-tokens,
    --temperature, --top-k, --top-p, --min-p, --repetition-penalty, --seed, --stop (read through `unescape_stop`).
    `defaults` overrides SAMPLING_DEFAULTS by field name (`sample` keeps top_k=50). Read them back with
    `sampling_params_from_args`."""
    d = {**SAMPLING_DEFAULTS, **defaults}
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"])
    p.add_argument("--temperature", type=float, default=d["temperature"], help="0 = greedy")
    p.add_argument("--top-k", type=int, default=d["top_k"], help="0 = off")
    p.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus sampling; 1 = off")
    p.add_argument("--min-p", type=float, default=d["min_p"], help="keep tokens with p ≥ min_p · p_max; 0 = off")
    p.add_argument("--repetition-penalty", type=float, default=d["repetition_penalty"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        type=unescape_stop,
        help=r"stop string (repeatable), \n \t \r \\ as escapes: --stop '\n\n'; the text ends before it",
    )


def sampling_params_from_args(args: argparse.Namespace, **fields):
    """The SamplingParams of `add_sampling_arguments`' options, plus `fields` (n=, logprobs=, stop_ids=). Call it
    before loading the model: a value out of range is a UserError naming its option ("--temperature must be
    ≥ 0 ..."), one line and exit 2 from the CLI. Options the parser lacks take SamplingParams' defaults."""
    from lmforge.infer.sampling import SamplingError, SamplingParams

    names = [*SAMPLING_DEFAULTS, "stop"]
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values["stop"] = tuple(values.get("stop", ()))
    try:
        return SamplingParams(**values, **fields)
    except SamplingError as e:
        raise UserError(f"--{e.field.replace('_', '-')} {e.requirement}") from None


def _generate_args(p: argparse.ArgumentParser) -> None:
    add_model_argument(p, alias="--ckpt")
    p.add_argument("--prompt", default="\n", help="text to continue (special-token strings in it are read as such)")
    p.add_argument("--chat", metavar="MESSAGE", help="a user message: print the reply the model's chat template asks")
    p.add_argument("--system", help="--chat: a system message before it")
    add_sampling_arguments(p)
    p.add_argument("--n", type=int, default=1, help="samples of the prompt (they share its KV blocks: --kv paged)")
    p.add_argument("--logprobs", type=int, default=None, metavar="K", help="print each token's log-prob and top K")
    p.add_argument("--quantize", choices=QUANT_CHOICES, help="weights: int8 weight-only, W8A8-dynamic, int4, bf16")
    p.add_argument("--kv", choices=KV_CHOICES, default="contiguous", help="KV cache (default contiguous)")
    p.add_argument("--window", type=int, default=256, help="--kv sliding: keys kept per layer")
    p.add_argument("--sinks", type=int, default=0, help="--kv sliding: first tokens always kept (StreamingLLM)")
    p.add_argument("--draft", help="speculative decoding with this draft run/checkpoint (same tokenizer)")
    p.add_argument("--lookup", type=int, metavar="N", help="speculative decoding by prompt lookup of N-grams")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per verify step")
    p.add_argument("--stats", action="store_true", help="print tokens/s (and acceptance when speculating)")


def _check_generate_args(args: argparse.Namespace) -> None:
    """The options of `generate` that SamplingParams does not see, checked before any model is loaded."""
    problems = [
        (args.gamma < 1, f"--gamma must be ≥ 1 (draft tokens per verify step), got {args.gamma}"),
        (args.lookup is not None and args.lookup < 1, f"--lookup must be ≥ 1 (longest n-gram), got {args.lookup}"),
        (args.window < 1, f"--window must be ≥ 1 (keys kept per layer), got {args.window}"),
        (not 0 <= args.sinks < args.window, f"--sinks must be in [0, --window), got {args.sinks}"),
        (bool(args.draft and args.lookup), "give --draft or --lookup, not both"),
        (args.system is not None and args.chat is None, "--system goes with --chat"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(message)
    if (args.kv.startswith("paged") or args.n > 1 or args.logprobs is not None) and (args.draft or args.lookup):
        raise UserError("speculative decoding runs on the batch-1 path: drop --n/--logprobs or use --kv contiguous")


@command("generate", help="stream a continuation from a model: caches, quantization, speculative decoding",
         arguments=_generate_args)  # fmt: skip
def generate(args: argparse.Namespace) -> None:
    import time

    from lmforge.infer.context import check_context
    from lmforge.infer.loading import load_for_inference
    from lmforge.infer.sampling import TextStream

    params = sampling_params_from_args(args, n=args.n, logprobs=args.logprobs)  # every check before the load
    _check_generate_args(args)
    model, tok = load_for_inference(model_from_args(args))
    params.stop_ids = tuple(tok.stop_ids)
    draft = None
    if args.draft:
        from lmforge.infer.speculative import check_same_tokenizer

        draft, draft_tok = load_for_inference(args.draft)
        check_same_tokenizer(tok, draft_tok, f"--draft {args.draft}")
    if args.quantize:
        from lmforge.infer.quantize import quantize_model

        quantize_model(model, args.quantize)
    if args.chat is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = tok.render_chat([*messages, {"role": "user", "content": args.chat}], add_generation_prompt=True)[0]
        args.prompt = ""  # the reply alone is printed
    else:
        prompt = tok.encode(args.prompt, allow_special=True)
    for m in (model, draft) if draft is not None else (model,):
        check_context(m.cfg, len(prompt), params.max_new_tokens, streaming=args.kv == "sliding")
    paged = args.kv.startswith("paged") or args.n > 1 or args.logprobs is not None
    print(args.prompt, end="", flush=True)
    start, count = time.perf_counter(), 0
    stats_line = ""
    if paged:
        from lmforge.infer.engine import Engine
        from lmforge.infer.fastpath import optimize_for_decode

        optimize_for_decode(model)  # steps of a few sequences in the GEMV kernel
        engine = Engine(model, tokenizer=tok, kv_dtype="int8" if args.kv == "paged-int8" else None,
                        kv_memory_gib=0.5, verbose=args.stats)  # fmt: skip
        texts: dict[int, list[str]] = {}
        for out in engine.stream(prompt, params):
            count += 1
            if args.n == 1:
                print(out.text, end="", flush=True)
            texts.setdefault(out.index, []).append(out.text)
            if out.logprobs is not None:
                alts = " ".join(f"{tok.decode([t])!r}:{lp:.2f}" for t, lp in out.logprobs.top)
                print(f"  [{out.logprobs.logprob:.3f}{' | ' + alts if alts else ''}]", flush=True)
        if args.n > 1:
            for i in sorted(texts):
                print(f"\n--- sample {i} ---\n{args.prompt}{''.join(texts[i])}")
        stats_line = f"prefix-cache hits {engine.stats.prefix_hit_tokens} tokens"
    else:
        stream = _batch1_stream(model, prompt, params, args, tok.vocab_size, draft)
        text = TextStream(tok, params.stop)
        for token in stream:
            count += 1
            if token in params.stop_ids:
                break
            print(text.feed(token), end="", flush=True)
            if text.stopped:
                break
        print(text.flush(), end="")
        if hasattr(stream, "stats"):
            s = stream.stats
            stats_line = f"acceptance α {s.alpha:.2f}, {s.tokens_per_step:.2f} tokens per target forward"
    print()
    if args.stats:
        seconds = time.perf_counter() - start
        extra = f"; {stats_line}" if stats_line else ""
        print(f"[{count} tokens in {seconds:.2f} s: {count / seconds:.1f} tok/s{extra}]")


def _batch1_stream(model, prompt, params, args, vocab_size, draft=None):
    from lmforge.infer.fastpath import optimize_for_decode
    from lmforge.infer.generate import generate_stream

    # One-row products of fp32 weights in lmforge's GEMV kernel (quantized modules have theirs), and batch-1 steps
    # with every layer in one C call (lmforge.infer.fastpath).
    optimize_for_decode(model)
    if args.draft or args.lookup:
        from lmforge.infer.speculative import speculative_generate

        draft = optimize_for_decode(draft) if draft is not None else None
        return speculative_generate(model, prompt, params, draft=draft, gamma=args.gamma, lookup_ngram=args.lookup,
                                    vocab_size=vocab_size)  # fmt: skip
    cache = None
    if args.kv == "sliding":
        from lmforge.infer.sliding import SlidingKVCache

        cache = SlidingKVCache(model.cfg, 1, window=args.window, sinks=args.sinks)
    elif args.kv == "int8":
        from lmforge.infer.kv_cache import ContiguousKVCache

        cache = ContiguousKVCache(model.cfg, 1, len(prompt) + params.max_new_tokens, kv_dtype="int8")
    return generate_stream(model, prompt, params, cache=cache, vocab_size=vocab_size)


def _chat_args(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--system", help="a system message at the start of every conversation")
    add_sampling_arguments(p, max_new_tokens=512, temperature=0.7)
    p.add_argument("--quantize", choices=QUANT_CHOICES, help="weights: int8 weight-only, W8A8-dynamic, int4, bf16")


@command("chat", help="chat with a model in the terminal: streaming, multi-turn, /reset, Ctrl-C stops a reply",
         arguments=_chat_args)  # fmt: skip
def chat(args: argparse.Namespace) -> None:
    from lmforge.infer.chat import chat_loop
    from lmforge.infer.fastpath import optimize_for_decode
    from lmforge.infer.loading import load_for_inference

    params = sampling_params_from_args(args)
    model, tok = load_for_inference(model_from_args(args))
    if args.quantize:
        from lmforge.infer.quantize import quantize_model

        quantize_model(model, args.quantize)
    chat_loop(optimize_for_decode(model), tok, params, system=args.system)


BENCHMARKS = {
    "decode": "decode",  # batch-1 decode vs HF, gemv roofline, bf16 / int8 / int4 weights
    "batch": "batching",  # continuous batching vs HF one-at-a-time and static batches
    "spec": "speculative",  # draft model and prompt lookup: measured vs predicted speed-up
    "quant": "inference_quality",  # Δperplexity and bytes of KV and weight quantization; KV eviction table
    "serve": "serving",  # lmforge serve over HTTP vs the in-process engine loop, and vs llama-server
    "route": "routing",  # router policies over 2 replicas: prefix-cache hits, TTFT; a replica killed
    "models": "models_in",  # a real GGUF model in: parity with HF and llama.cpp, load RSS
}


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=sorted(BENCHMARKS), help=" | ".join(BENCHMARKS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (--quick, --record, --help)")


@command("bench", help="inference benchmarks (decode, batch, spec, quant, serve, route, models), beside the peers",
         arguments=_bench_args)  # fmt: skip
def bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / f"{BENCHMARKS[args.which]}.py").is_file():
        raise FileNotFoundError(f"{root / 'benchmarks'} not found: `lmforge bench` runs from a source checkout")
    cmd = [sys.executable, "-m", f"benchmarks.{BENCHMARKS[args.which]}", *args.rest]
    return subprocess.call(cmd, cwd=root)
