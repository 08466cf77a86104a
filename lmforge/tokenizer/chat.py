"""Chat templates of imported models: a conversation rendered by the model's own Jinja template, tokenized so that
message content is always text, with the assistant-only loss mask.

    chat = ChatTemplate(source, specials=["<|im_start|>", "<|im_end|>"], bos_token=None, eos_token="<|im_end|>")
    rendered = chat.render(messages, add_generation_prompt=True)  # text, control-token spans, assistant spans

The tokenizer (`lmforge.tokenizer.imported`) turns it into ids: each control span is one special id, the text
between two of them is encoded whole (as transformers would) with special-token strings read as text, and a
token is in the loss mask when it starts inside an assistant span.

**Content stays text.** transformers renders the template to one string and tokenizes it with special tokens
recognised, so a user message holding "<|im_end|><|im_start|>system" forges a system turn. Here the template is
rendered a second time with each content replaced by a sentinel; the template's own text lies between the
sentinels, and only special-token strings found there become control tokens. When the template rewrites content
(so that the two renderings do not line up), a conversation whose content holds a special-token string is refused
rather than guessed at.

**The loss mask without `{% generation %}` markers.** Most templates lack them, so the assistant's part of a
conversation is found prefix by prefix, as the template defines it: message i's part is what rendering
messages[:i+1] adds to rendering messages[:i] with the generation prompt — the reply, its end-of-turn token and
whatever the template writes after it before the next turn. A turn that a template writes otherwise once later
turns follow (Qwen3 adds an empty reasoning block to the last reply only) is taken as it stands in the whole: its
content through its end-of-turn token. Where that cannot be found either (the template also rewrote the
content), the conversation is refused in one line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from lmforge.config import UserError

ROLES = ("system", "user", "assistant", "tool")
# Private-use characters: no template test or filter (trim, upper, startswith) changes them.
SENTINEL = "\ue000{}\ue001"


@dataclass(frozen=True)
class Rendered:
    """A conversation as the template writes it, with the character spans of the control tokens the template
    itself emits and of the assistant turns (the 1s of the loss mask)."""

    text: str
    controls: list[tuple[int, int]]
    trained: list[tuple[int, int]]


def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' marker for the assistant mask) renders its body;
        the mask is found prefix by prefix either way, the same for every template."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    # trim_blocks and lstrip_blocks, as transformers renders templates: the same template gives the same text.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])  # fmt: skip
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    def __init__(self, source: str, specials: Sequence[str], *, bos_token: str | None, eos_token: str | None,
                 name: str = "chat template"):  # fmt: skip
        import jinja2

        self.source, self.name = source, name
        self.variables = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        try:
            self.template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise UserError(f"{name} does not parse as Jinja ({e})") from None
        ordered = sorted(set(specials), key=len, reverse=True)  # longest first, as tokenizers matches added tokens
        self.specials = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the template writes it (what transformers' apply_chat_template(tokenize=False) gives)."""
        import jinja2

        try:
            return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        **self.variables)  # fmt: skip
        except jinja2.TemplateError as e:
            raise UserError(f"{self.name}: {e}") from None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> Rendered:
        """The conversation, its control tokens and its assistant turns (none when `add_generation_prompt`: a
        prompt is not trained on)."""
        contents = _check(messages)
        text = self.text(messages, add_generation_prompt)
        content_spans = self._content_spans(messages, contents, text, add_generation_prompt)
        controls = self._control_spans(text, content_spans)
        trained = [] if add_generation_prompt else self._assistant_spans(messages, text, content_spans, controls)
        return Rendered(text, controls, trained)

    def _content_spans(self, messages, contents, text, add_generation_prompt) -> list[tuple[int, int]] | None:
        """Where each message's content lies in `text`, or None when the template rewrites content and no content
        holds a special-token string (then no control token can come from content)."""
        marked = [dict(m, content=SENTINEL.format(i)) for i, m in enumerate(messages)]
        skeleton = self.text(marked, add_generation_prompt)
        parts = re.split("\ue000(\\d+)\ue001", skeleton)
        spans, rebuilt = [], parts[0]
        for index, after in zip(parts[1::2], parts[2::2]):
            content = contents[int(index)]
            spans.append((len(rebuilt), len(rebuilt) + len(content)))
            rebuilt += content + after
        if rebuilt == text:
            return spans
        if self.specials is not None and any(self.specials.search(c) for c in contents):
            raise UserError(f"{self.name} rewrites message content, and a message holds a special-token string "
                            "(such as an end-of-turn marker) that could not be kept as text: refused")  # fmt: skip
        return None

    def _control_spans(self, text: str, content_spans) -> list[tuple[int, int]]:
        if self.specials is None:
            return []
        inside = content_spans or []
        return [(m.start(), m.end()) for m in self.specials.finditer(text)
                if not any(a <= m.start() < b for a, b in inside)]  # fmt: skip

    def _assistant_spans(self, messages, text: str, content_spans, controls) -> list[tuple[int, int]]:
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.text(messages[:i], add_generation_prompt=True)
            through = self.text(messages[: i + 1])
            if through.startswith(before) and text.startswith(through):
                spans.append((len(before), len(through)))
            elif content_spans is not None:
                # A turn the template writes otherwise once later turns follow (Qwen3 drops the empty reasoning
                # block of earlier turns): its reply as it stands in the whole, through its end-of-turn token.
                start, end = content_spans[i]
                spans.append((start, next((b for a, b in controls if a >= end), end)))
            else:
                raise UserError(f"{self.name} renders the start of a conversation differently from the whole "
                                f"(at message {i}) and rewrites its content, so the assistant's tokens cannot be "
                                "marked for the loss: train on single-turn conversations, or give the template "
                                "{% generation %} markers")  # fmt: skip
        return spans


def _check(messages: Sequence[dict]) -> list[str]:
    contents = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"message {i}: must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UserError(f"message {i}: role must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise UserError(f"message {i}: content must be a string, got {type(content).__name__}")
        contents.append(content)
    return contents
