"""What both tokenizers share: a Hugging Face `tokenizers.Tokenizer` and a twin of it that reads special-token
strings as plain text, so `encode(text)` never forges a control token and `encode(text, allow_special=True)` reads
them as transformers does by default.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

from tokenizers import Regex, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), as tokenizers pre-tokenizers.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def gguf_pre_tokenizer(pre: str):
    """The tokenizers pre-tokenizer of llama.cpp's `tokenizer.ggml.pre` name, or None for one lmforge lacks."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bytes_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    table = {
        "gpt-2": lambda: byte_level,  # llama.cpp's name for GPT-2's pre-tokenizer
        "gpt2": lambda: byte_level,
        "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": lambda: pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), bytes_only]
        ),  # fmt: skip
        "qwen2": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), bytes_only]),
    }
    return table.get(pre, lambda: None)()


GGUF_PRE_NAMES = ("gpt-2", "smollm", "llama-bpe", "qwen2")  # the ones GGUF export can name


class HFBacked:
    def __init__(self, hf: HFTokenizer):
        # A file made elsewhere may ask to truncate or pad every encoding; encode must stay exact.
        hf.no_truncation()
        hf.no_padding()
        self.hf = hf  # the one saved to tokenizer.json: special tokens in text are recognised (HF default)
        self._plain = HFTokenizer.from_str(hf.to_str())
        self._plain.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.hf.id_to_token(id)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; nothing added. `allow_special`: read special-token strings in text as specials."""
        hf = self.hf if allow_special else self._plain
        return hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (in parallel threads inside `tokenizers`)."""
        hf = self.hf if allow_special else self._plain
        return [e.ids for e in hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """The text of `ids`; special tokens are written out unless `skip_special`."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        # tokenizers skips special tokens by default; lmforge shows everything unless asked.
        return self.hf.decode(ids, skip_special_tokens=skip_special)

    def gguf_pre(self) -> str | None:
        """llama.cpp's name (`tokenizer.ggml.pre`) of the pre-tokenizer that splits text as this one does, or None
        when it has none lmforge knows (what GGUF export writes, so llama.cpp tokenizes text the same)."""
        mine = json.loads(self.hf.to_str()).get("pre_tokenizer")
        for name in GGUF_PRE_NAMES:
            if json.loads(gguf_pre_tokenizer(name).__getstate__()) == mine:
                return name
        return None

    def fingerprint(self) -> str:
        """sha256 of the id → token table (added tokens included). Two tokenizers with one fingerprint mean the
        same token by every id, whatever their files look like (pretty-printed or not, other metadata): the test
        of whether ids made by one can be read by a model of the other (a draft, a reward model, eval data)."""
        table = sorted((i, t) for t, i in self.hf.get_vocab(with_added_tokens=True).items())
        return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode()).hexdigest()
