"""Batch-1 autoregressive generation over one KV cache: the fastest single-request path (a static,
preallocated cache; no scheduler), used by `lmforge sample` and `lmforge generate`.

    ids = generate(model, prompt_ids, SamplingParams(max_new_tokens=100, temperature=0.8, top_p=0.95, seed=0))
    for token in generate_stream(model, prompt_ids, params, cache=SlidingKVCache(model.cfg, 1, window=256)):
        ...

Keyword arguments (`max_new_tokens=`, `temperature=`, `top_k=`, `seed=`, `stop_ids=`) are accepted in place
of a SamplingParams for short calls. Many concurrent requests belong in `lmforge.infer.engine.Engine` (a batch
answered to the end: `lmforge.infer.replies.generate_replies`; many consumers: `lmforge.infer.engine_loop`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmforge.config import UserError

from .context import check_context
from .kv_cache import ContiguousKVCache
from .sampling import SamplingParams, draw, processed_probs
from .sliding import SlidingKVCache


@torch.no_grad()
def generate_stream(
    model,
    prompt: list[int],
    params: SamplingParams | None = None,
    *,
    cache=None,
    vocab_size: int | None = None,
    **kwargs,
) -> Iterator[int]:
    """Yield new token ids one at a time (a stop token is yielded, then generation ends). `cache` defaults to
    a ContiguousKVCache sized for the request. `vocab_size` keeps sampling inside the tokenizer's vocabulary
    when the model's embedding is padded past it."""
    params = params or SamplingParams(**kwargs)
    cfg = model.cfg
    if not prompt:
        raise UserError("the prompt is empty: give at least one token (a prompt text that encodes to tokens)")
    check_context(cfg, len(prompt), params.max_new_tokens, streaming=isinstance(cache, SlidingKVCache))
    total = len(prompt) + params.max_new_tokens
    weight = next(model.parameters())
    device = weight.device
    if cache is None:
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        cache = ContiguousKVCache(cfg, 1, total, dtype=dtype, device=device)
    model.eval()
    history = list(prompt) if params.penalised else None
    output: list[int] = []  # the generated tokens: presence and frequency penalties count these only
    stops = () if params.ignore_eos else params.stop_ids
    hidden = model.hidden_states(torch.tensor([prompt], device=device), cache=cache)
    logits = model.lm_head(hidden[0, -1:])  # the head over the last prompt token only
    plain_greedy = params.greedy and history is None  # the token is the argmax: no distribution to build
    for index in range(params.max_new_tokens):
        if plain_greedy:
            token = int(logits[0, :vocab_size].argmax())
        else:
            histories = [history] if history is not None else None
            probs = processed_probs(logits[:, :vocab_size], [params], histories, [output])
            token = draw(probs[0], params, index)
        yield token
        if token in stops:
            return
        if history is not None:
            history.append(token)
            output.append(token)
        if index + 1 < params.max_new_tokens:
            logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1:]


def generate(model, prompt: list[int], params: SamplingParams | None = None, **kwargs) -> list[int]:
    return list(generate_stream(model, prompt, params, **kwargs))
