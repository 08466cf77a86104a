"""The network and nothing else: ModelConfig, Transformer and the cache protocol it accepts."""

from .cache import Cache
from .config import ModelConfig
from .transformer import Block, Transformer

__all__ = ["Block", "Cache", "ModelConfig", "Transformer"]
