"""Raters of preference pairs: a human at the terminal, a program (a task's grader), or an AI judge.

A rater takes a `Pair` (one prompt, two samples of the policy) and returns a `Rating`: a label in terms of the
samples ("a", "b", "tie", "both_bad", "skip", or None for no label), details worth keeping, and the seconds it
took. The human rater may also return UNDO or QUIT. `lmforge.align.preferences.collect` drives them:

    lmforge prefs collect policy=runs/sft rater=human                          # A and B side by side
    printf 'a\\nu\\nb\\nq\\n' | lmforge prefs collect policy=runs/sft rater=human-lines   # scripted, one line each
    lmforge prefs collect policy=runs/sft rater=program:add:digits=3           # the task's exact grader
    lmforge prefs collect policy=runs/sft rater=judge:runs/judge               # an lmforge checkpoint as judge
    lmforge prefs collect policy=runs/sft rater=judge:http://127.0.0.1:8000/v1 judge_model=NAME   # OpenAI API

The judge is shown the principles, the prompt and both answers, and must reply "A" or "B" on its first line.
It is asked twice, with the answers in both orders, and a label is kept only when both replies pick the same
sample: LLM judges favour a position (Zheng et al. 2023, "Judging LLM-as-a-Judge"), and swapping cancels it.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shutil
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import IO

from lmforge.config import ConfigError

__all__ = [
    "DEFAULT_PRINCIPLES",
    "LABELS",
    "Action",
    "CheckpointJudge",
    "HTTPJudge",
    "HumanRater",
    "JudgeRater",
    "Pair",
    "ProgramRater",
    "Rating",
    "judge_messages",
    "load_principles",
    "make_rater",
    "parse_rater_spec",
    "parse_verdict",
    "side_by_side",
]

LABELS = ("a", "b", "tie", "both_bad", "skip")  # a label names a sample, not a screen side

# A short helpful / honest / harmless set (Askell et al. 2021, "A General Language Assistant as a Laboratory
# for Alignment"); give your own list, or a YAML constitution file, with `principles=`.
DEFAULT_PRINCIPLES = [
    "Prefer the answer that is correct and does what the user asked.",
    "Prefer the honest answer: no invented facts; uncertainty said plainly.",
    "Prefer the harmless answer: no help with hurting people or breaking the law.",
    "When both are otherwise equal, prefer the clearer and more concise answer.",
]


@dataclass
class Pair:
    """One prompt and two samples of the policy, as a rater sees them."""

    prompt_index: int
    prompt: str  # the last user message
    messages: list[dict]  # the conversation the samples continue
    completion_a: str
    completion_b: str
    seed_a: int
    seed_b: int
    temperature_a: float
    temperature_b: float
    shown_left: str  # "a" or "b": the sample a human sees on the left (as "A")
    answer: str | None = None  # the exact expected reply, when the prompt comes from a task
    task: str | None = None  # the task spec of the prompt, when it has one


@dataclass
class Rating:
    label: str | None  # one of LABELS, or None: no label (an unparseable or inconsistent judge)
    detail: dict = field(default_factory=dict)
    seconds: float = 0.0


class Action(enum.Enum):
    """What a human may ask for instead of a rating."""

    UNDO = "undo"
    QUIT = "quit"


def parse_rater_spec(spec: str) -> tuple[str, str]:
    """("human" | "human-lines" | "program" | "judge", argument). ValueError names the accepted forms."""
    spec = str(spec).strip()
    kind, _, arg = spec.partition(":")
    arg = arg.strip()
    if spec in ("human", "human-lines", "program"):
        return spec, ""
    if kind == "program" and arg:
        from lmforge.data.tasks import get_task

        get_task(arg)  # fail now, with the task's own message, not after sampling
        return kind, arg
    if kind == "judge" and arg:
        return kind, arg
    raise ValueError(f"rater {spec!r} is not one of: human, human-lines, program:<task spec>, "
                     "judge:<run folder>, judge:http://HOST:PORT/v1")  # fmt: skip


def load_principles(value: Sequence[str] | str | Path) -> list[str]:
    """The judge's principles: a list of strings, or the path of a YAML file holding one (top level, or under
    a `principles:` key, as a constitution file may have)."""
    if isinstance(value, str | Path):
        import yaml

        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"principles file {path} does not exist (give a list of strings or a YAML file)")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = data.get("principles")
        value = data
        where = str(path)
    else:
        where = "principles"
    if not isinstance(value, list) or not value or not all(isinstance(p, str) and p.strip() for p in value):
        raise ConfigError(f"{where}: expected a non-empty list of principle strings")
    return [p.strip() for p in value]


# ------------------------------------------------------------------------------------------------- human

_KEYS = {"a": "left", "1": "left", "b": "right", "2": "right", "t": "tie", "x": "both_bad", "s": "skip"}
_HINT = "keys: a/1 A better, b/2 B better, t tie, x both bad, s skip, u undo, q quit"


def _wrap(text: str, width: int) -> list[str]:
    if not text.strip():
        return ["(empty)"]
    lines: list[str] = []
    for line in text.expandtabs(4).splitlines() or [""]:
        lines += textwrap.wrap(line, width) or [""]  # keeps a line's indentation (code), drops wrap spaces
    return lines


def side_by_side(left: str, right: str, width: int, titles: tuple[str, str] = ("A", "B")) -> str:
    """Two texts in two wrapped columns, `width` characters in all."""
    col = max((width - 3) // 2, 10)
    rows = [f"{titles[0]:<{col}} │ {titles[1]}", f"{'─' * col}─┼─{'─' * col}"]
    for lt, rt in zip_longest(_wrap(left, col), _wrap(right, col), fillvalue=""):
        rows.append(f"{lt:<{col}} │ {rt}".rstrip())
    return "\n".join(rows)


class HumanRater:
    """A person at the terminal, one key per line (so a script can drive it through stdin).

    The sample shown on the left, as "A", is `pair.shown_left` (drawn per pair by the caller, so a person's
    taste for one side does not become a taste for one seed); the key is mapped back to a sample here.
    `lines=True` prints A then B on one line each, with no columns: for scripts and narrow terminals."""

    def __init__(self, stdin: IO[str], stdout: IO[str], *, lines: bool = False, width: int | None = None):
        self.stdin, self.stdout, self.lines, self.width = stdin, stdout, lines, width
        self.name = "human-lines" if lines else "human"

    def say(self, text: str) -> None:
        print(text, file=self.stdout, flush=True)

    def show(self, pair: Pair, progress: tuple[int, int] | None = None) -> None:
        left, right = _shown(pair)
        where = f"[{progress[0]}/{progress[1]}] " if progress else ""
        if self.lines:
            one = lambda s: s.replace("\n", "\\n")  # noqa: E731 - one line per answer, newlines made visible
            self.say(f"{where}prompt {pair.prompt_index}: {one(pair.prompt)}")
            self.say(f"A: {one(left)}")
            self.say(f"B: {one(right)}")
            return
        width = self.width or shutil.get_terminal_size((100, 24)).columns
        self.say("")
        self.say(f"{where}prompt {pair.prompt_index}")
        self.say("\n".join(textwrap.fill(p, width) for p in pair.prompt.splitlines() or [""]))
        self.say(side_by_side(left, right, width))

    def rate(self, pair: Pair, progress: tuple[int, int] | None = None) -> Rating | Action:
        self.show(pair, progress)
        start = time.monotonic()
        while True:
            print(f"{_HINT} > ", end="", file=self.stdout, flush=True)
            line = self.stdin.readline()
            if not line:  # EOF: the script (or Ctrl-D) is done
                self.say("")
                return Action.QUIT
            key = line.strip().lower()
            if key == "q":
                return Action.QUIT
            if key == "u":
                return Action.UNDO
            if key not in _KEYS:
                self.say(f"unknown key {key!r}; {_HINT}")
                continue
            choice = _KEYS[key]
            other = "b" if pair.shown_left == "a" else "a"
            label = {"left": pair.shown_left, "right": other}.get(choice, choice)
            return Rating(label, {"key": key}, time.monotonic() - start)


def _shown(pair: Pair) -> tuple[str, str]:
    if pair.shown_left == "a":
        return pair.completion_a, pair.completion_b
    return pair.completion_b, pair.completion_a


# ----------------------------------------------------------------------------------------------- program


class ProgramRater:
    """A task's grader picks the correct sample; both right or both wrong is a tie (no training pair)."""

    def __init__(self, task: str = ""):
        from lmforge.data.tasks import get_task

        self.task = get_task(task) if task else None
        self.name = f"program:{self.task.spec()}" if self.task else "program"

    def rate(self, pair: Pair, progress: tuple[int, int] | None = None) -> Rating:
        from lmforge.data.tasks import Example, get_task

        if pair.answer is None:
            raise ConfigError(f"the program rater needs the expected answer of prompt {pair.prompt_index}: use "
                              'prompts=task:SPEC, or a JSONL with an "answer" on each line')  # fmt: skip
        start = time.monotonic()
        task = self.task or (get_task(pair.task) if pair.task else None)
        example = Example(pair.task or "", pair.prompt, pair.answer)
        if task is None:  # a JSONL prompt with an answer but no task: exact match after stripping
            right_a, right_b = (c.strip() == pair.answer for c in (pair.completion_a, pair.completion_b))
        else:
            right_a, right_b = task.grade(example, pair.completion_a), task.grade(example, pair.completion_b)
        label = "tie" if right_a == right_b else ("a" if right_a else "b")
        detail = {"correct_a": right_a, "correct_b": right_b, "answer": pair.answer}
        return Rating(label, detail, time.monotonic() - start)


# ------------------------------------------------------------------------------------------------- judge

# The verdict is the first line's first token, "A" or "B", allowing only quotes, brackets and markdown bold
# around it: "A", "**B**", "(A) is better". "I prefer A", "Answer: B" and lowercase letters do not parse.
_VERDICT = re.compile(r"[\s\"'*(\[]*([AB])(?![A-Za-z0-9])")


def parse_verdict(reply: str) -> str | None:
    """The letter "A" or "B" from a judge's reply, or None when its first line does not start with one."""
    first = (reply or "").strip().splitlines()[:1]
    match = _VERDICT.match(first[0]) if first else None
    return match.group(1) if match else None


def judge_messages(principles: Sequence[str], messages: Sequence[dict], first: str, second: str) -> list[dict]:
    """The judge's chat: the principles as the system turn; the conversation and the two answers as the user's."""
    rules = "\n".join(f"{i}. {p}" for i, p in enumerate(principles, 1))
    system = f"You compare two answers to the same prompt and say which is better by these principles:\n{rules}"
    if len(messages) == 1:
        prompt = messages[0]["content"]
    else:
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    user = (f"[Prompt]\n{prompt}\n\n[Answer A]\n{first}\n[End of answer A]\n\n[Answer B]\n{second}\n"
            "[End of answer B]\n\nWhich answer is better by the principles? Reply with the single letter A or B "
            "on the first line.")  # fmt: skip
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


class JudgeRater:
    """An AI judge asked in both orders; `reply(messages) -> str` is the backend (HTTPJudge, CheckpointJudge)."""

    def __init__(self, reply: Callable[[list[dict]], str], principles: Sequence[str], name: str = "judge"):
        self.reply, self.principles, self.name = reply, list(principles), name

    def rate(self, pair: Pair, progress: tuple[int, int] | None = None) -> Rating:
        start = time.monotonic()
        ab = self.reply(judge_messages(self.principles, pair.messages, pair.completion_a, pair.completion_b))
        ba = self.reply(judge_messages(self.principles, pair.messages, pair.completion_b, pair.completion_a))
        # Map each reply's letter to a sample: in the swapped order, "A" is sample b.
        votes = [{"A": "a", "B": "b"}.get(parse_verdict(ab)), {"A": "b", "B": "a"}.get(parse_verdict(ba))]
        if None in votes:
            label, verdict = None, "unparseable"
        elif votes[0] != votes[1]:
            label, verdict = None, "inconsistent"
        else:
            label, verdict = votes[0], "agree"
        detail = {"replies": [ab, ba], "orders": ["ab", "ba"], "votes": votes, "verdict": verdict}
        return Rating(label, detail, time.monotonic() - start)


class HTTPJudge:
    """`POST {url}/chat/completions` of an OpenAI-compatible server (temperature 0, a few tokens), through the
    `openai` client when it is installed, else urllib. The key, if any, comes from OPENAI_API_KEY."""

    def __init__(self, url: str, model: str, *, max_tokens: int = 8, timeout: float = 60.0):
        self.url, self.model, self.max_tokens, self.timeout = url.rstrip("/"), model, max_tokens, timeout
        try:
            import openai
        except ImportError:
            self.client = None
        else:
            self.client = openai.OpenAI(base_url=self.url, api_key=os.environ.get("OPENAI_API_KEY", "none"),
                                        timeout=timeout, max_retries=1)  # fmt: skip

    def __call__(self, messages: list[dict]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        if self.client is not None:
            import openai

            try:
                return self.client.chat.completions.create(**body).choices[0].message.content or ""
            except openai.OpenAIError as e:
                raise ConfigError(f"judge {self.url}: {e}") from None
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        request = urllib.request.Request(f"{self.url}/chat/completions", json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = json.loads(response.read().decode("utf-8"))
            return data["choices"][0]["message"]["content"] or ""
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise ConfigError(f"judge {self.url}/chat/completions: {getattr(e, 'reason', e)}") from None
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ConfigError(f"judge {self.url}: not an OpenAI chat completion response ({e!r})") from None


class CheckpointJudge:
    """An lmforge model as judge: the chat rendered with its tokenizer, a few tokens generated greedily."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 8):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens

    @classmethod
    def from_run(cls, path: str | Path, **kwargs) -> CheckpointJudge:
        from lmforge.infer.loading import load_for_inference

        return cls(*load_for_inference(path), **kwargs)

    def __call__(self, messages: list[dict]) -> str:
        from lmforge.infer.replies import generate_replies
        from lmforge.infer.sampling import SamplingParams

        stops = self.tokenizer.stop_ids
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0, seed=0, stop_ids=stops)
        # a judge prompt past the judge's context is refused (ContextLengthError): a verdict cut short is no verdict
        (reply,) = generate_replies(self.model, self.tokenizer, [messages], params)
        return reply.text


def make_rater(spec: str, *, stdin: IO[str], stdout: IO[str], principles: Sequence[str] = DEFAULT_PRINCIPLES,
               judge_model: str = "judge", judge_max_tokens: int = 8, judge_timeout: float = 60.0):  # fmt: skip
    """The rater a `rater=` spec names (see `parse_rater_spec`)."""
    kind, arg = parse_rater_spec(spec)
    if kind in ("human", "human-lines"):
        return HumanRater(stdin, stdout, lines=kind == "human-lines")
    if kind == "program":
        return ProgramRater(arg)
    if arg.startswith(("http://", "https://")):
        backend: Callable[[list[dict]], str] = HTTPJudge(arg, judge_model, max_tokens=judge_max_tokens,
                                                         timeout=judge_timeout)  # fmt: skip
        name = f"judge:{arg}#{judge_model}"
    else:
        backend = CheckpointJudge.from_run(arg, max_new_tokens=judge_max_tokens)
        name = f"judge:{arg}"
    return JudgeRater(backend, principles, name)
