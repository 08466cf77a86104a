"""Replies to a batch of prompts or chats, run to the end by the continuous-batching engine: the one way evaluation,
RL rollouts, preference sampling and model judges generate (each used to size its own KV cache and check lengths).

    from lmforge.infer.replies import generate_replies
    chats = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Sort 3 1 2"}]]
    out = generate_replies(model, tok, chats, SamplingParams(temperature=0, max_new_tokens=16, stop_ids=stops))
    out[0].text, out[0].ids, out[0].finish_reason           # "7", [..., end_id], "stop"
    generate_replies(model, tok, [ids_a, ids_b], [params_a, params_b], fit_context=True)  # token-id prompts

A chat (a list of messages) is rendered with the tokenizer's chat format, ending with the assistant's turn; a
list of ints is used as it is. Every prompt is checked against the model's context (`lmforge.infer.context`) before
anything is generated: too long is one ContextLengthError, or with `fit_context` max_new_tokens shrinks to what the
context leaves. The KV pool holds the sequences that run at once at their full length, not the engine's default
of some GiB (a tiny model would allocate gigabytes it never touches), so nothing is preempted. The engine's draws
are counter-based, so a reply depends on its prompt and params alone, not on the batch it ran in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .context import check_context, context_limit
from .engine import Engine
from .sampling import SamplingParams, TokenLogprobs

BLOCK_SIZE = 16
MIN_TOKEN_BUDGET = 512  # the engine's default per-step budget


@dataclass
class Completion:
    """One sample's reply to one prompt."""

    prompt_index: int  # which prompt it answers
    index: int  # which of that prompt's `params.n` samples
    prompt: list[int]  # the prompt's token ids (a chat rendered)
    ids: list[int]  # the generated ids, a stop token included
    text: str  # the ids decoded without special tokens, cut before a stop string; "" without a tokenizer
    finish_reason: str  # "stop" (a stop id, a stop string or EOS) | "length"
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per id, when params.logprobs asks


def prompt_ids(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of each prompt: a chat (a list of message dicts) rendered ready for the assistant's reply, a list
    of ints as it is."""
    out = []
    for p in prompts:
        if p and isinstance(p[0], dict):
            out.append(tokenizer.render_chat(p, add_generation_prompt=True)[0])
        else:
            out.append([int(t) for t in p])
    return out


def fit_to_context(cfg, prompt_tokens: int, max_new_tokens: int) -> int:
    """max_new_tokens, shrunk to what the model's context leaves after the prompt; ContextLengthError when not
    even one token fits."""
    limit = context_limit(cfg)
    budget = max_new_tokens if limit is None else min(max_new_tokens, limit - prompt_tokens)
    check_context(cfg, prompt_tokens, max(budget, 1))
    return budget


def kv_blocks(prompts: list[list[int]], params: list[SamplingParams], max_batch: int, block_size: int) -> int:
    """Blocks for the sequences that can run at once, each at its full length: the `max_batch` longest (plus the
    n − 1 twins a request admitted last can bring along), and one to spare."""
    need = sorted((-(-(len(ids) + p.max_new_tokens) // block_size) for ids, p in zip(prompts, params, strict=True)
                   for _ in range(p.n)), reverse=True)  # fmt: skip
    return sum(need[: max_batch + max(p.n for p in params) - 1]) + 1


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list, params: SamplingParams | list[SamplingParams], *,
                     fit_context: bool = False, max_batch: int | None = None, progress: bool = False,
                     desc: str = "generate") -> list[Completion]:  # fmt: skip
    """Every sample of every prompt, in order (prompt 0's n samples, then prompt 1's, ...). `params`: one for all
    prompts or one per prompt. `max_batch`: sequences in flight at once (default: all). `progress`: a bar of
    prompts answered. The model's train/eval mode is restored afterwards."""
    ids = prompt_ids(tokenizer, prompts)
    many = list(params) if isinstance(params, list) else [params] * len(ids)
    if len(many) != len(ids):
        raise ValueError(f"{len(many)} SamplingParams for {len(ids)} prompts")
    if not ids:
        return []
    for i, (prompt, p) in enumerate(zip(ids, many)):  # refuse before anything runs
        if fit_context:
            budget = fit_to_context(model.cfg, len(prompt), p.max_new_tokens)
            if budget != p.max_new_tokens:
                many[i] = dataclasses.replace(p, max_new_tokens=budget)
        else:
            check_context(model.cfg, len(prompt), p.max_new_tokens)
    sequences = sum(p.n for p in many)
    batch = max(1, min(max_batch or sequences, sequences))
    was_training = model.training
    engine = Engine(model, tokenizer=tokenizer, vocab_size=tokenizer.vocab_size if tokenizer is not None else None,
                    num_blocks=kv_blocks(ids, many, batch, BLOCK_SIZE), block_size=BLOCK_SIZE, max_batch=batch,
                    token_budget=max(MIN_TOKEN_BUDGET, sum(map(len, ids))))  # fmt: skip
    try:
        requests = [engine.add_request(prompt, p) for prompt, p in zip(ids, many)]
        _run(engine, requests, progress, desc)
    finally:
        model.train(was_training)
    out = []
    for i, request in enumerate(requests):
        for seq in sorted(request.seqs, key=lambda s: s.index):
            # Decoded whole, as `tokenizer.decode` writes it; the engine's streamed text only where stop strings cut it.
            if tokenizer is None:
                text = ""
            elif request.params.stop:
                text = seq.text.text
            else:
                text = tokenizer.decode(seq.output, skip_special=True)
            out.append(Completion(i, seq.index, request.prompt, list(seq.output), text, seq.finish_reason,
                                  list(seq.logprobs)))  # fmt: skip
    return out


def _run(engine: Engine, requests, progress: bool, desc: str) -> None:
    from tqdm.auto import tqdm

    by_id = {r.id: r for r in requests}
    with tqdm(total=len(requests), desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True,
              leave=False) as bar:  # fmt: skip
        while engine.has_work():
            ended = {o.request_id for o in engine.step() if o.finish_reason is not None}
            bar.update(sum(by_id[r].done for r in ended))
