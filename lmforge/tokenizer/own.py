"""lmforge's own tokenizers: byte-level BPE and characters, special tokens, chat template with a loss mask.

A thin wrapper around a Hugging Face `tokenizers.Tokenizer`, so the same `tokenizer.json` works here and in
`transformers.PreTrainedTokenizerFast`. Two kinds, both exact on any UTF-8 text (decode(encode(s)) == s):

    bpe   byte-level BPE as in GPT-2: text -> UTF-8 bytes -> merges; the 256 byte symbols are always in the
          vocabulary, so nothing is ever unknown. `split_digits` puts every digit in its own token (as
          Llama and PaLM do; it helps arithmetic).
    char  one token per character seen in training; any other character falls back to its UTF-8 bytes
          as tokens `<0x00>`..`<0xFF>` (the Llama/SentencePiece byte fallback).

    tok = Tokenizer.train_bpe(texts, vocab_size=4096)       # or Tokenizer.train_char(texts)
    ids = tok.encode("def f(x):\\n")                          # plain text: no specials added or recognised
    tok.decode(ids)                                         # "def f(x):\\n"
    ids, mask = tok.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    tok.save("data/stdlib")                                  # tokenizer.json + tokenizer_config.json
    tok = Tokenizer.load("data/stdlib")

Special tokens in text. `encode(text)` treats text as text: a document (or a chat message) that contains
the string "<|eos|>" is encoded as the bytes of that string, never as the end-of-sequence id, so corpus
files and users cannot forge control tokens (tiktoken refuses them for the same reason). Special ids enter
only through `bos_id`, `render_chat` and friends. `encode(text, allow_special=True)` recognises them in
text instead, which is what `PreTrainedTokenizerFast` does by default and what its `apply_chat_template`
relies on; `PreTrainedTokenizerFast(..., split_special_tokens=True)` matches the default here.

Chat format (one line per message, no newlines added):

    <|bos|><|system|>You are terse.<|end|><|user|>2+2?<|end|><|assistant|>4<|end|>

The loss mask is 1 on the assistant's content tokens and its closing <|end|> (the model must learn when to
stop), 0 on everything else. `CHAT_TEMPLATE` renders the same string in Jinja for Hugging Face.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.config import UserError
from lmforge.runs import atomic_write_text

from .base import HFBacked

__all__ = [
    "ASSISTANT",
    "BOS",
    "CHAT_TEMPLATE",
    "END",
    "EOS",
    "PAD",
    "SPECIAL_TOKENS",
    "SYSTEM",
    "TOKENIZER_FILE",
    "USER",
    "IncrementalDecoder",
    "Tokenizer",
]

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
# Their order fixes their ids: 0..6 in every tokenizer trained here.
SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

# The Jinja twin of `render_chat`. The {% generation %} block lets transformers compute the same loss mask
# (`apply_chat_template(..., return_assistant_tokens_mask=True)`).
CHAT_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)

Kind = Literal["bpe", "char"]


class Tokenizer(HFBacked):
    """A byte-level BPE or char tokenizer with lmforge's special tokens. Build with train_* or load."""

    def __init__(self, hf: HFTokenizer):
        super().__init__(hf)
        spec = json.loads(hf.to_str())
        self.kind: Kind = _kind_of(spec)
        self.split_digits = "Digits" in json.dumps(spec.get("pre_tokenizer"))
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; train it with lmforge")
        self.special_ids = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}

    # ------------------------------------------------------------------------------------------ training

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, split_digits: bool = False) -> Tokenizer:
        """Byte-level BPE of `vocab_size` tokens: 256 bytes + 7 specials + merges (fewer if texts run out)."""
        floor = 256 + len(SPECIAL_TOKENS)
        if vocab_size < floor:
            raise ValueError(f"a byte-level BPE needs vocab_size >= {floor} (256 bytes + specials)")
        hf = HFTokenizer(models.BPE())
        # No prefix space: a leading " " would be added on encode and kept on decode, breaking exactness.
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        if split_digits:
            digits = pre_tokenizers.Digits(individual_digits=True)
            hf.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
        else:
            hf.pre_tokenizer = byte_level
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def train_char(cls, texts: Iterable[str]) -> Tokenizer:
        """One token per distinct character of `texts`, plus 256 byte-fallback tokens for the rest."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = len(vocab)
        for c in sorted(chars):
            vocab[c] = len(vocab)
        # A BPE model without merges is a character lookup; byte_fallback maps unseen characters to
        # <0xNN> tokens and the ByteFallback decoder turns them back into UTF-8. No pre-tokenizer: nothing
        # would be merged across a split anyway.
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        hf.add_special_tokens(list(_added(SPECIAL_TOKENS)))
        return cls(hf)

    # ----------------------------------------------------------------------------------------- encoding

    @property
    def bos_id(self) -> int:
        return self.special_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self.special_ids[EOS]

    @property
    def pad_id(self) -> int:
        return self.special_ids[PAD]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a reply: the end of a chat turn and the end of a document."""
        return self.special_ids[END], self.special_ids[EOS]

    def token_bytes(self, id: int) -> bytes:
        """The UTF-8 bytes token `id` stands for (part of a character for byte tokens)."""
        return self._bytes_table[id]

    @cached_property
    def _bytes_table(self) -> list[bytes]:
        table = [b""] * self.vocab_size
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if token in self.special_ids:
                table[i] = token.encode()
            elif self.kind == "bpe":
                table[i] = bytes(byte_of[c] for c in token)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                table[i] = bytes([int(token[3:5], 16)])
            else:
                table[i] = token.encode()
        return table

    def incremental_decoder(self, *, skip_special: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special=skip_special)

    # --------------------------------------------------------------------------------------------- chat

    chat_template = CHAT_TEMPLATE
    add_bos = False  # lmforge's pretraining separates documents with <|eos|> and starts none with <|bos|>

    def render_chat(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and its loss mask (1 on assistant content and its <|end|>).

        With `add_generation_prompt` the ids end with <|assistant|>, ready for the model to answer.
        Message contents are encoded as plain text: special-token strings inside them are not specials.
        """
        ids, mask = [self.bos_id], [0]
        end = self.special_ids[END]
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise ValueError(f"message {i}: role must be one of {sorted(ROLES)}, got {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
            body = [*self.encode(content), end]
            learn = int(role == "assistant")
            ids += [self.special_ids[ROLES[role]], *body]
            mask += [0, *[learn] * len(body)]
        if add_generation_prompt:
            ids.append(self.special_ids[ASSISTANT])
            mask.append(0)
        return ids, mask

    # -------------------------------------------------------------------------------------- save / load

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json (to `path` if it ends in .json, else into folder `path`) and, beside it,
        tokenizer_config.json for transformers. Both atomically. Returns the tokenizer.json path."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / TOKENIZER_FILE
        atomic_write_text(path, self.hf.to_str(pretty=True))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "extra_special_tokens": [SYSTEM, USER, ASSISTANT, END],
            # Decoding must be exact: no " ." -> "." clean-up.
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
        atomic_write_text(path.parent / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer.json, or the one inside folder `path`."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer not found: {path} (make one with `lmforge tokenizer train` or `lmforge prepare`)"
            )
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
            _check_spec(json.loads(text))
            return cls(HFTokenizer.from_str(text))
        except BaseException as e:
            # tokenizers raises a bare Exception on a malformed file, and a Rust panic (pyo3's PanicException,
            # a BaseException) on some well-formed JSON it cannot build; both mean the file is not a tokenizer.
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            reason = " ".join(str(e).split()) or type(e).__name__
            if len(reason) > 160:
                reason = reason[:157] + "..."
            raise UserError(
                f"{path}: not a tokenizer file ({reason}); make it again with `lmforge tokenizer train` or "
                "`lmforge prepare`"
            ) from None

    def __repr__(self) -> str:
        digits = ", split_digits" if self.split_digits else ""
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}{digits})"


class IncrementalDecoder:
    """Streaming decode: feed ids one at a time, get back only whole characters.

        dec = tok.incremental_decoder()
        for id in generated:
            print(dec.feed(id), end="", flush=True)
        print(dec.flush())

    A character split over several byte tokens (an emoji is 4 bytes) is held back until it is complete,
    so no U+FFFD appears mid-stream. Bytes that can never form a character are shown as U+FFFD, as
    `decode` does.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip = set(tokenizer.special_ids.values()) if skip_special else set()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, id: int) -> str:
        """The text completed by token `id` (often "", or several characters)."""
        id = int(id)
        if id in self.skip:
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(id), final=False)

    def flush(self) -> str:
        """What is left at the end of the stream (U+FFFD for a character cut short)."""
        return self._utf8.decode(b"", final=True)


def _added(tokens: Iterable[str]) -> Iterable[AddedToken]:
    # normalized=False: match the raw text; special=True: skippable in decode.
    for t in tokens:
        yield AddedToken(t, special=True, normalized=False)


def _check_spec(spec) -> None:
    """What tokenizers' loader (0.23) panics on, printing Rust's panic to stderr, instead of reporting it: a
    merge shorter than continuing_subword_prefix, a vocab whose ids repeat (depending on hash order)."""
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict):
        return
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):  # lmforge's BPE and char models use neither
            raise ValueError(f"not an lmforge tokenizer: model.{key} is set")
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        ids = [i for i in vocab.values() if isinstance(i, int) and not isinstance(i, bool)]
        if len(set(ids)) != len(ids):
            raise ValueError("two tokens of model.vocab share an id")


def _kind_of(spec: dict) -> Kind:
    decoder = spec.get("decoder") or {}
    model = spec.get("model") or {}
    if decoder.get("type") == "ByteLevel" and model.get("type") == "BPE":
        return "bpe"
    if model.get("type") == "BPE" and model.get("byte_fallback") and not model.get("merges"):
        return "char"
    raise ValueError("not an lmforge tokenizer: expected a byte-level BPE or a char model with byte fallback")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (what ByteLevel tokens are spelled with)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping
