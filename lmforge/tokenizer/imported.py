"""The tokenizer an imported model came with: its tokenizer.json (or a GGUF file's tokenizer metadata), chat
template, BOS/EOS/stop ids — behind the same interface as lmforge's own `Tokenizer`, so the engine and every stage
take either.

    tok = ImportedTokenizer.from_folder("hf/SmolLM2-135M-Instruct")  # tokenizer.json + tokenizer_config.json
    tok = ImportedTokenizer.from_gguf(gguf_metadata("model.gguf"), "model.gguf")
    ids, mask = tok.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    tok.stop_ids   # EOS, the generation config's eos ids, the end-of-turn token

As with lmforge's own tokenizer, `encode(text)` reads special-token strings as text and `encode(text,
allow_special=True)` as specials (what completion prompts and a /tokenize call want); chat message content is
always text (`lmforge.tokenizer.chat`), whatever the template.

GGUF files carry the vocabulary, merges, token types and the name of llama.cpp's pre-tokenizer
(`tokenizer.ggml.pre`); the ones built here are those of byte-level BPE models whose pre-tokenizer is known below.
Anything else is refused in one line rather than tokenized differently from the model's training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from lmforge.config import UserError
from lmforge.runs import atomic_write_text

from .base import HFBacked, gguf_pre_tokenizer
from .chat import ChatTemplate
from .own import IncrementalDecoder, _bytes_to_unicode

TOKENIZER_FILE, CONFIG_FILE, GENERATION_FILE = "tokenizer.json", "tokenizer_config.json", "generation_config.json"
STOP_KEY = "lmforge_stop_tokens"  # in tokenizer_config.json: the stop tokens beyond eos_token, kept through a run

GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # llama.cpp's token types


def _token_string(value: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ImportedTokenizer(HFBacked):
    """A model's own tokenizer. Build with `from_folder` or `from_gguf`; `save` writes it into a run folder."""

    def __init__(self, hf: HFTokenizer, *, bos_token: str | None, eos_token: str | None, pad_token: str | None = None,
                 stop_tokens: Sequence[str] = (), chat_template: str | None = None, add_bos: bool = False,
                 name: str = "tokenizer"):  # fmt: skip
        super().__init__(hf)
        self.name, self.add_bos = name, add_bos
        added = hf.get_added_tokens_decoder()
        self.special_ids = {t.content: i for i, t in added.items() if t.special}
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        for role, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if token is not None and hf.token_to_id(token) is None:
                raise UserError(f"{name}: its {role} {token!r} is not in the vocabulary")
        if eos_token is None:
            raise UserError(f"{name}: no eos_token is named (tokenizer_config.json, generation_config.json), so "
                            "generation could not stop; set eos_token in tokenizer_config.json")  # fmt: skip
        self.stop_tokens = tuple(dict.fromkeys([eos_token, *(t for t in stop_tokens if hf.token_to_id(t) is not None)]))
        self.chat_template = chat_template
        self._chat = None
        if chat_template:
            self._chat = ChatTemplate(chat_template, list(self.special_ids), bos_token=bos_token, eos_token=eos_token,
                                      name=f"{name}'s chat template")  # fmt: skip

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_folder(cls, folder: str | Path) -> ImportedTokenizer:
        """An HF folder's (or a run folder's) tokenizer.json, tokenizer_config.json, chat_template.jinja and
        generation_config.json."""
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"{path}: not a tokenizer file ({' '.join(str(e).split())[:160]})") from None
        config = _read_json(folder / CONFIG_FILE)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        generation = _read_json(folder / GENERATION_FILE)
        eos_ids = generation.get("eos_token_id")
        eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids] if isinstance(eos_ids, int) else []
        stops = [hf.id_to_token(i) for i in eos_ids if isinstance(i, int) and hf.id_to_token(i) is not None]
        stops += [t for t in config.get(STOP_KEY, []) if isinstance(t, str)]
        eos = _token_string(config.get("eos_token")) or (stops[0] if stops else None)
        add_bos = config.get("add_bos_token")
        bos = _token_string(config.get("bos_token"))
        if add_bos is None:  # the post-processor's template says whether HF adds BOS (Llama 3 does, Qwen does not)
            add_bos = bos is not None and f'"{bos}"' in json.dumps(json.loads(hf.to_str()).get("post_processor"))
        return cls(hf, bos_token=bos, eos_token=eos,
                   pad_token=_token_string(config.get("pad_token")), stop_tokens=stops, chat_template=template,
                   add_bos=bool(add_bos), name=str(folder))  # fmt: skip

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], name: str = "model.gguf") -> ImportedTokenizer:
        """The tokenizer in a GGUF file's metadata (`lmforge.model.gguf.gguf_metadata`)."""
        kind, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre", "gpt2")
        if kind != "gpt2":
            raise UserError(f"{name}: tokenizer.ggml.model {kind!r} is not supported yet (byte-level BPE, 'gpt2', "
                            "is): convert the HF folder instead")  # fmt: skip
        pre_tokenizer = gguf_pre_tokenizer(pre)
        if pre_tokenizer is None:
            raise UserError(f"{name}: tokenizer.ggml.pre {pre!r} is not supported (gpt2, smollm, llama-bpe, qwen2): "
                            "import the model's HF folder instead")  # fmt: skip
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
        hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                    ignore_merges=pre == "llama-bpe"))  # fmt: skip
        hf.pre_tokenizer = pre_tokenizer
        hf.decoder = decoders.ByteLevel()
        hf.add_tokens([AddedToken(t, special=ty == GGUF_CONTROL, normalized=False)
                       for t, ty in zip(tokens, types) if ty in (GGUF_CONTROL, GGUF_USER_DEFINED)])  # fmt: skip

        def token(key: str) -> str | None:
            i = metadata.get(f"tokenizer.ggml.{key}")
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        stops = [t for t in (token("eot_token_id"), token("eom_token_id")) if t]
        return cls(hf, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
                   pad_token=token("padding_token_id"), stop_tokens=stops,
                   chat_template=metadata.get("tokenizer.chat_template"),
                   add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)), name=name)  # fmt: skip

    # ----------------------------------------------------------------------------------------- encoding

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.hf.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.hf.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.hf.token_to_id(self.pad_token or self.eos_token)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a reply: EOS, the generation config's eos ids, the end-of-turn token."""
        return tuple(self.hf.token_to_id(t) for t in self.stop_tokens)

    @cached_property
    def byte_level(self) -> bool:
        decoder = json.dumps(json.loads(self.hf.to_str()).get("decoder"))
        return '"ByteLevel"' in decoder and '"Metaspace"' not in decoder and '"Replace"' not in decoder

    def token_bytes(self, id: int) -> bytes:
        return self._bytes_table[id]

    @cached_property
    def _bytes_table(self) -> list[bytes]:
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        added = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        table = [b""] * self.vocab_size
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            table[i] = token.encode() if token in added else bytes(byte_of.get(c, 0) for c in token)
        return table

    def incremental_decoder(self, *, skip_special: bool = False):
        """Streaming decode that emits only whole characters (`lmforge.tokenizer.IncrementalDecoder`); tokenizers
        that are not byte-level re-decode the tail (`SuffixDecoder`)."""
        if self.byte_level:
            return IncrementalDecoder(self, skip_special=skip_special)
        return SuffixDecoder(self, skip_special=skip_special)

    # --------------------------------------------------------------------------------------------- chat

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of a conversation in the model's own template, and the loss mask (1 on the tokens of
        assistant turns: `lmforge.tokenizer.chat`). Message content is text: special-token strings in it stay
        text."""
        if self._chat is None:
            raise UserError(f"{self.name} has no chat template: give a completion prompt instead, or add "
                            "chat_template to its tokenizer_config.json")  # fmt: skip
        rendered = self._chat.render(messages, add_generation_prompt)
        ids: list[int] = []
        mask: list[int] = []

        def add_text(start: int, end: int) -> None:
            if start == end:
                return
            encoding = self._plain.encode(rendered.text[start:end], add_special_tokens=False)
            for id, (a, _) in zip(encoding.ids, encoding.offsets):
                ids.append(id)
                mask.append(int(any(s <= start + a < e for s, e in rendered.trained)))

        at = 0
        for a, b in rendered.controls:
            add_text(at, a)
            ids.append(self.special_ids[rendered.text[a:b]])
            mask.append(int(any(s <= a < e for s, e in rendered.trained)))
            at = b
        add_text(at, len(rendered.text))
        return ids, mask

    def chat_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the template writes it (transformers' apply_chat_template(tokenize=False))."""
        if self._chat is None:
            raise UserError(f"{self.name} has no chat template")
        return self._chat.text(messages, add_generation_prompt)

    # -------------------------------------------------------------------------------------- save / load

    def save(self, path: str | Path) -> Path:
        """tokenizer.json and tokenizer_config.json (special tokens, stop tokens, chat template) into folder
        `path`, each atomically; `from_folder` reads them back. Returns the tokenizer.json path."""
        folder = Path(path)
        atomic_write_text(folder / TOKENIZER_FILE, self.hf.to_str(pretty=True))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token, "add_bos_token": self.add_bos,
                  "clean_up_tokenization_spaces": False, STOP_KEY: list(self.stop_tokens[1:])}  # fmt: skip
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return folder / TOKENIZER_FILE

    def __repr__(self) -> str:
        return f"ImportedTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"


class SuffixDecoder:
    """Streaming decode for tokenizers whose tokens are not plain bytes (SentencePiece's ▁, normalizers): decode
    everything so far and emit what is new, holding back a trailing partial character."""

    def __init__(self, tokenizer: ImportedTokenizer, *, skip_special: bool = False):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.ids: list[int] = []
        self.emitted = 0

    def feed(self, id: int) -> str:
        self.ids.append(int(id))
        text = self.tokenizer.decode(self.ids, skip_special=self.skip_special)
        stable = len(text.rstrip("\ufffd"))
        new, self.emitted = text[self.emitted : stable], max(self.emitted, stable)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special=self.skip_special)
        new, self.emitted = text[self.emitted :], len(text)
        return new


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}
