"""Chatting with a model from the terminal: `lmforge chat MODEL` (interactive, streaming, multi-turn) and
`lmforge generate MODEL --chat "..."` (one reply). The conversation is rendered by the model's own chat template
(lmforge's, or the imported model's: `lmforge.tokenizer`), and a reply ends at one of the tokenizer's stop ids.

    lmforge chat runs/arith-sft
    lmforge chat SmolLM2-135M-Instruct.Q4_1.gguf --system "Answer in one sentence." --temperature 0

In the chat, `/reset` starts a new conversation, `/exit` or Ctrl-D leaves, and Ctrl-C stops the reply being
written (the part written so far stays in the conversation) without leaving the program.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

from lmforge.config import UserError

from .context import context_limit
from .sampling import SamplingParams, TextStream

HELP = "/reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops a reply"


def reply_stream(model, tokenizer, messages: list[dict], params: SamplingParams) -> Iterator[str]:
    """The assistant's next message, piece by piece (whole characters only), ended at a stop id or string."""
    from .generate import generate_stream

    prompt = tokenizer.render_chat(messages, add_generation_prompt=True)[0]
    params.stop_ids = tuple(tokenizer.stop_ids)
    text = TextStream(tokenizer, params.stop)
    for token in generate_stream(model, prompt, params, vocab_size=tokenizer.vocab_size):
        if token in params.stop_ids:
            break
        piece = text.feed(token)
        if piece:
            yield piece
        if text.stopped:
            return
    tail = text.flush()
    if tail:
        yield tail


def fit_history(model, tokenizer, messages: list[dict], max_new_tokens: int) -> list[dict]:
    """`messages` without its oldest turns (the system message is kept) until the prompt and the reply fit the
    model's context; a last user message too long on its own is the user's to shorten."""
    limit = context_limit(model.cfg)
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system) :]
    while limit is not None and len(tokenizer.render_chat(system + rest, True)[0]) + max_new_tokens > limit:
        if len(rest) <= 1:
            raise UserError(f"the message is too long for the model's context ({limit} tokens with "
                            f"{max_new_tokens} for the reply): shorten it or lower --max-new-tokens")  # fmt: skip
        rest = rest[2:] if len(rest) > 2 else rest[1:]
    return system + rest


def chat_loop(model, tokenizer, params: SamplingParams, *, system: str | None = None,
              read: Callable[[str], str] = input, write: Callable[[str], None] | None = None) -> None:  # fmt: skip
    """The interactive chat: read a line, stream the reply, keep the conversation. `read` and `write` are the
    terminal's (tests pass their own); `read` raising EOFError ends the chat."""
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    write(f"[{HELP}]\n")
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            messages = list(start)
            write("[new conversation]\n")
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        try:
            messages = fit_history(model, tokenizer, messages, params.max_new_tokens)
        except UserError as e:
            messages.pop()
            write(f"[{e}]\n")
            continue
        pieces: list[str] = []
        try:
            for piece in reply_stream(model, tokenizer, messages, params):
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt:
            write(" [stopped]")
        write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces)})
