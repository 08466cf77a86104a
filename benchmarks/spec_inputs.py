"""Inputs of `benchmarks/speculative.py`: the target/draft pair (trained runs, or random models with a warning)
and the prompts — held-out text, and the copy task for prompt lookup (a held-out function, then a cue to repeat
it)."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.config import load_config
from lmforge.model import ModelConfig, Transformer

GPT2_YAML = Path(__file__).resolve().parents[1] / "configs" / "model" / "gpt2-124m.yaml"
LOOKUP_CUE = "\n\n\n# The same function again, copied exactly:\n"


@dataclass
class Models:
    target: Transformer
    draft: Transformer
    vocab_size: int  # the tokenizer's vocabulary (≤ the models'): embedding padding past it is never sampled
    trained: bool  # target and draft are trained runs, so α means something
    lookup_target: Transformer  # what prompt lookup runs on: a trained run when there is one
    lookup_vocab: int
    lookup_trained: bool
    tokenizer: object | None = None
    docs: list[str] | None = None  # held-out documents
    notes: list[str] = field(default_factory=list)


# ---- models and prompts ------------------------------------------------------------------------------------


def random_pair(quick: bool) -> tuple[Transformer, Transformer]:
    """Random target and a ~4x-smaller draft of the same vocabulary: GPT-2-124M and 6 layers × d=384 (30M
    parameters, half of them the embedding); 2 × d=128 and 1 × d=64 with --quick."""
    if quick:
        common = dict(vocab_size=512, max_seq_len=512, ffn="gelu_tanh", position="learned", norm="layernorm")
        target = ModelConfig(n_layer=2, d_model=128, n_head=4, **common)
        draft = ModelConfig(n_layer=1, d_model=64, n_head=2, **common)
    else:
        target = load_config(ModelConfig, GPT2_YAML)
        draft = load_config(ModelConfig, GPT2_YAML, ["n_layer=6", "d_model=384", "n_head=6"])
    torch.manual_seed(0)
    return Transformer(target).eval(), Transformer(draft).eval()


def try_load_run(run: str | None):
    """(model, tokenizer, config) of a run folder, or None when it is missing or has no checkpoint."""
    if run is None or not Path(run).is_dir():
        return None
    from lmforge.train.resolve import resolve_model

    try:
        return resolve_model(run)
    except FileNotFoundError:
        return None


def read_docs(data_dir: str | Path) -> list[str] | None:
    path = Path(data_dir) / "val_docs.jsonl"
    if not path.is_file():
        return None
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_models(target_run: str | None, draft_run: str | None, quick: bool) -> Models:
    """Trained target and draft when both runs load; else a random pair (and a warning), with prompt lookup on
    whichever trained run did load. --quick without runs named: tiny random models."""

    if not quick:
        target_run, draft_run = target_run or "runs/medium", draft_run or "runs/tiny"
    t, d = try_load_run(target_run), try_load_run(draft_run)
    if t and d:
        tok = t[1]
        vocab = min(tok.vocab_size, t[0].cfg.vocab_size, d[0].cfg.vocab_size)
        docs = read_docs(t[2].data)
        notes = [] if docs else [f"no {Path(t[2].data) / 'val_docs.jsonl'}: prompts are random token ids"]
        return Models(t[0], d[0], vocab, True, t[0], vocab, True, tok, docs, notes)

    target, draft = random_pair(quick)
    if quick and not (target_run or draft_run):
        notes = ["--quick: tiny random models and random-token prompts: α and the speed-ups mean nothing"]
    else:
        missing = ", ".join(r for r, got in ((target_run, t), (draft_run, d)) if r and not got)
        notes = [f"WARNING: no trained run at {missing}: a random {target.cfg.n_layer}-layer d={target.cfg.d_model} "
                 f"target and a random {draft.cfg.n_layer}-layer d={draft.cfg.d_model} draft. Their α, speed-ups and "
                 "measured ÷ predicted say nothing about trained models (train: lmforge pretrain "
                 "configs/pretrain/medium.yaml and tiny.yaml)"]  # fmt: skip
    vocab = target.cfg.vocab_size
    one = t or d  # prompt lookup needs no draft: one trained run is enough for it
    if one:
        tok = one[1]
        notes.append(f"prompt lookup runs on the trained run {one[2].name} ({one[0].cfg.n_layer} layers, "
                     f"d={one[0].cfg.d_model}), on held-out code")  # fmt: skip
        lookup_vocab = min(tok.vocab_size, one[0].cfg.vocab_size)
        return Models(target, draft, vocab, False, one[0], lookup_vocab, True, tok, read_docs(one[2].data), notes)
    notes.append("prompt lookup on a random target: it does not copy, so its α and speed-up are not a trained "
                 "model's (the prompt still repeats a block, so lookup finds drafts to try)")  # fmt: skip
    return Models(target, draft, vocab, False, target, vocab, False, notes=notes)


def text_prompts(docs: Sequence[str], tok, count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` tokens, each from a different held-out document (those at least 3 windows
    long, spread evenly over the list), starting a third of the way in, past the module docstring."""
    encoded = [ids for ids in (tok.encode(d) for d in docs) if len(ids) >= 3 * length]
    if len(encoded) < count:
        raise ValueError(f"only {len(encoded)} held-out documents have {3 * length} tokens; {count} needed")
    picks = [encoded[i * len(encoded) // count] for i in range(count)]
    return [ids[len(ids) // 3 : len(ids) // 3 + length] for ids in picks]


def function_blocks(text: str) -> list[str]:
    """Every `def` with its body (the lines indented deeper than it), dedented, trailing blank lines dropped."""
    lines, blocks = text.split("\n"), []
    for i, line in enumerate(lines):
        m = re.match(r"(\s*)def \w+\(", line)
        if not m:
            continue
        indent, j = len(m.group(1)), i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            j += 1
        while j > i + 1 and not lines[j - 1].strip():
            j -= 1
        blocks.append(textwrap.dedent("\n".join(lines[i:j])))
    return blocks


def lookup_prompt_text(block: str) -> tuple[str, str]:
    """(prompt, the copy's rest): a function, a comment asking for it again and its first line, without the
    newline (BPE merges a newline with the indentation after it, so the model picks the token), and what a
    faithful copy continues with."""
    first = block.split("\n", 1)[0]
    return block + LOOKUP_CUE + first, block[len(first) :]


def lookup_prompts(docs: Sequence[str], tok, count: int, block_tokens: tuple[int, int]):
    """`count` copy prompts (token ids) and their faithful continuations (text), from held-out functions of
    `block_tokens` tokens, one per document, spread over the documents."""
    lo, hi = block_tokens
    per_doc = [[b for b in function_blocks(d) if lo <= len(tok.encode(b)) <= hi] for d in docs]
    per_doc = [bs for bs in per_doc if bs]
    picked = [bs[len(bs) // 2] for bs in per_doc[:: max(1, len(per_doc) // count)]][:count]
    if len(picked) < count:
        raise ValueError(f"found {len(picked)} held-out functions of {lo}-{hi} tokens; {count} needed")
    texts = [lookup_prompt_text(b) for b in picked]
    return [tok.encode(prompt) for prompt, _ in texts], [rest for _, rest in texts]


def copied_chars(outputs: Sequence[str], references: Sequence[str]) -> tuple[int, int]:
    """(characters the outputs reproduce before first differing from the references, characters compared)."""
    same = total = 0
    for out, ref in zip(outputs, references, strict=True):
        n = min(len(out), len(ref))
        same += next((i for i in range(n) if out[i] != ref[i]), n)
        total += n
    return same, total


def random_prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (length,), generator=g).tolist() for _ in range(count)]


def random_lookup_prompts(vocab: int, count: int, length: int) -> list[list[int]]:
    """Without text: a random block, then its first 8 tokens again (the 'copy it' cue of the text prompts)."""
    return [block + block[:8] for block in random_prompts(vocab, count, length, seed=1)]
