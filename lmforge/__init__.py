"""lmforge: raw text to an aligned, served language model."""

__version__ = "0.1.0"
