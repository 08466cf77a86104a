"""Inference: KV caches, sampling, continuous batching, speculative decoding and weight quantization built
around `lmforge.model.Transformer` (the engine works on token ids; the tokenizer only detokenises).

Names are imported on first use (PEP 562), so `lmforge.infer.commands` can build `lmforge --help` without
loading torch."""

from importlib import import_module

_HOME = {
    "ContiguousKVCache": "kv_cache",
    "Engine": "engine",
    "EngineLoop": "engine_loop",
    "PagedKVPool": "paged",
    "SamplingParams": "sampling",
    "SlidingKVCache": "sliding",
    "TokenMergingCache": "merging",
    "generate_replies": "replies",
    "quantize_model": "quantize",
    "speculative_generate": "speculative",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'lmforge.infer' has no attribute {name!r}")
    return getattr(import_module(f".{_HOME[name]}", __name__), name)
