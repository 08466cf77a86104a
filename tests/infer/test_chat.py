"""`lmforge chat`'s loop (lmforge/infer/chat.py): multi-turn history, /reset, Ctrl-C stops a reply and keeps what
was written, Ctrl-D leaves, and old turns are dropped to fit the context.

    .venv/bin/pytest tests/infer/test_chat.py -q
"""

from __future__ import annotations

import pytest
import torch

import lmforge.infer.chat as chat
from lmforge.config import UserError
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_char(["What is 2 + 2? hello there, system user assistant"])


def model_of(tok, max_seq_len=256):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=max_seq_len, n_layer=1, d_model=16,
                                   n_head=2, position="rope")).eval()  # fmt: skip


def scripted(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_history_reset_interrupt_and_eof(tok, monkeypatch):
    seen = []

    def reply(model, tokenizer, messages, params):
        seen.append([dict(m) for m in messages])
        yield "par"
        if messages[-1]["content"] == "long":
            raise KeyboardInterrupt  # Ctrl-C while the reply streams
        yield "tial"

    monkeypatch.setattr(chat, "reply_stream", reply)
    written = []
    chat.chat_loop(model_of(tok), tok, SamplingParams(max_new_tokens=4), system="Be brief.",
                   read=scripted(["hi", "long", "again", "/reset", "new"]), write=written.append)  # fmt: skip
    assert [m["content"] for m in seen[1]] == ["Be brief.", "hi", "partial", "long"]
    assert [m["content"] for m in seen[2]] == ["Be brief.", "hi", "partial", "long", "par", "again"]  # kept
    assert [m["content"] for m in seen[3]] == ["Be brief.", "new"]  # /reset keeps the system message only
    assert " [stopped]" in written and "[new conversation]\n" in written


def test_a_real_reply_streams_and_ends_at_a_stop_id(tok):
    params = SamplingParams(max_new_tokens=6, temperature=0)
    pieces = list(chat.reply_stream(model_of(tok), tok, [{"role": "user", "content": "hi"}], params))
    ids = tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)[0]
    from lmforge.infer.generate import generate_stream

    expected = []
    for t in generate_stream(model_of(tok), ids, SamplingParams(max_new_tokens=6, temperature=0,
                                                                stop_ids=tok.stop_ids)):  # fmt: skip
        if t in tok.stop_ids:
            break
        expected.append(t)
    assert "".join(pieces) == tok.decode(expected, skip_special=True)


def test_old_turns_are_dropped_to_fit_the_context(tok):
    model = model_of(tok, max_seq_len=64)
    turns = [{"role": "system", "content": "sys"}]
    for i in range(6):
        turns += [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "there"}]
    turns.append({"role": "user", "content": "last"})
    kept = chat.fit_history(model, tok, turns, max_new_tokens=8)
    assert kept[0]["content"] == "sys" and kept[-1]["content"] == "last" and len(kept) < len(turns)
    assert len(tok.render_chat(kept, True)[0]) + 8 <= 64
    with pytest.raises(UserError, match="too long for the model's context"):
        chat.fit_history(model, tok, [{"role": "user", "content": "x" * 80}], max_new_tokens=8)
