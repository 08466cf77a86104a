"""Inference: KV caches, sampling, batching and decoding built around `lmforge.model.Transformer`."""

from .kv_cache import ContiguousKVCache

__all__ = ["ContiguousKVCache"]
