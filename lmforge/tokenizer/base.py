"""What both tokenizers share: a Hugging Face `tokenizers.Tokenizer` and a twin of it that reads special-token
strings as plain text, so `encode(text)` never forges a control token and `encode(text, allow_special=True)` reads
them as transformers does by default.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer


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

    def fingerprint(self) -> str:
        """sha256 of the id → token table (added tokens included). Two tokenizers with one fingerprint mean the
        same token by every id, whatever their files look like (pretty-printed or not, other metadata): the test
        of whether ids made by one can be read by a model of the other (a draft, a reward model, eval data)."""
        table = sorted((i, t) for t, i in self.hf.get_vocab(with_added_tokens=True).items())
        return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode()).hexdigest()
