"""Plain autoregressive sampling with a contiguous KV cache: the simple path `lmforge sample` uses.

ids = generate(model, prompt_ids, max_new_tokens=100, temperature=0.8, top_k=50, seed=0)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .kv_cache import ContiguousKVCache


@torch.no_grad()
def generate_stream(
    model,
    prompt: list[int],
    *,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    stop_ids: tuple[int, ...] = (),
    vocab_size: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time. temperature 0 is greedy. `vocab_size` keeps sampling inside the
    tokenizer's vocabulary when the model's embedding is padded past it."""
    cfg = model.cfg
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if cfg.position == "learned" and len(prompt) + max_new_tokens > cfg.max_seq_len:  # no positions past the table
        raise ValueError(
            f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceed the model's {cfg.max_seq_len} positions"
        )
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = ContiguousKVCache(cfg, 1, len(prompt) + max_new_tokens, dtype=next(model.parameters()).dtype,
                              device=device)  # fmt: skip
    model.eval()
    logits = model(torch.tensor([prompt], device=device), cache=cache)[0, -1]
    for _ in range(max_new_tokens):
        token = sample_token(logits[:vocab_size].float(), temperature, top_k, generator)
        yield token
        if token in stop_ids:
            return
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]


def sample_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def generate(model, prompt: list[int], **kwargs) -> list[int]:
    return list(generate_stream(model, prompt, **kwargs))
