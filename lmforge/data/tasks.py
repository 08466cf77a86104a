"""Verifiable tasks for post-training: prompt generators with exact graders, fixed seeds, disjoint splits.

Every task draws short plain-ASCII problems whose one right reply is known, so SFT data, RL rewards and
evaluation need no human or model judge (the "verifiable rewards" of Lambert et al. 2024, Tülu 3):

    from lmforge.data.tasks import get_task, examples, exact_match_interval

    task = get_task("add:digits=3")              # or "reverse", "sort:length=6,max_value=9", ...
    train = examples(task, "train", 10_000)      # Example(task="add:digits=3", prompt="What is 482 + 917?",
    test = examples(task, "heldout", 1000)       #         answer="1399"), deterministic for (spec, split, n, seed)
    task.grade(test[0], " 1399\\n")               # True: exact match after stripping whitespace, nothing else
    task.well_formed("13 99")                    # False: not an integer
    exact_match_interval(413, 1000)              # (0.413, 0.3828..., 0.4439...): Wilson score interval

    lmforge eval runs/sft --tasks add:digits=3,reverse --n 1000     # greedy exact match on held-out prompts

Tasks (`available_tasks()`), with their options and defaults:

    add:digits=3              What is 482 + 917?                    1399
    sub:digits=3,negative=false   What is 917 - 482?                435   (negative=true allows 482 - 917)
    mul:digits=3              What is 482 * 7?                      3374  (times one digit, 0-9)
    reverse:min_len=3,max_len=8   Reverse the word: qzfe            efzq
    copy:min_len=3,max_len=8      Repeat exactly: qzfe              qzfe
    sort:length=5,max_value=99    Sort ascending: 42 7 19 3 88      3 7 19 42 88
    max:length=5,max_value=99     Largest number in: 42 7 19 3 88   88
    count:min_len=5,max_len=12,letters=4   Count the letter b in: abcabbd   3

Operands of add/sub/mul are uniform in [0, 10^digits), so "digits" is the most an operand has.

Splits. A prompt is held out iff the SHA-256 of its split key falls in the first 1/8 of the hash space
(`split_of`), so train and held-out prompts are disjoint by construction, with no list to store, and a
prompt lands in the same split whatever the options: "What is 12 + 34?" is held out (or not) under digits=2
and digits=3 alike, so training on one setting never leaks the other's held-out set. The split key is the
prompt, except for add, whose key is the unordered pair: 34 + 12 is held out together with 12 + 34 (else the
model could be trained on the answer of a held-out sum, one swap away).

Specs. "name" or "name:key=value,key=value"; `Task.spec()` writes every option, so "add" and
"add:digits=3" are the same task and draw the same examples. In a comma-separated list of tasks (the CLI's
`--tasks`), a `key=value` piece belongs to the task before it: "sub:digits=2,negative=true,reverse".

User chat data on disk (SFT conversations, preference pairs) is read by `lmforge.data.chat_jsonl`.

Standard library only: the CLI imports this module to build its help.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import ClassVar, Literal

__all__ = [
    "HELDOUT_FRACTION",
    "Add",
    "Copy",
    "Count",
    "Example",
    "Max",
    "Mul",
    "Reverse",
    "Sort",
    "Sub",
    "Task",
    "available_tasks",
    "exact_match_interval",
    "examples",
    "get_task",
    "parse_task_list",
    "split_of",
]

Split = Literal["train", "heldout"]
SPLITS: tuple[str, ...] = ("train", "heldout")
HELDOUT_FRACTION = 1 / 8

_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")  # ASCII digits only, no leading zeros, no "+"
_NATURAL = re.compile(r"0|[1-9][0-9]*")
_NATURALS = re.compile(r"(0|[1-9][0-9]*)( (0|[1-9][0-9]*))*")  # single spaces between numbers
_LOWER = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Example:
    """One problem: the task's spec, the user's message and the exact expected reply."""

    task: str  # spec string, e.g. "add:digits=3"
    prompt: str  # the user message, e.g. "What is 482 + 917?"
    answer: str  # the exact expected reply, e.g. "1399"

    def messages(self) -> list[dict]:
        """The conversation for SFT: the question and its answer."""
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]

    def prompt_messages(self) -> list[dict]:
        """Only the user turn: what generation (evaluation, RL rollouts) starts from."""
        return [{"role": "user", "content": self.prompt}]


# ------------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """A family of problems. Subclasses are frozen dataclasses whose fields are the spec's options."""

    name: ClassVar[str] = ""
    pattern: ClassVar[re.Pattern] = _NATURAL  # what a well-formed reply looks like

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{self.name}: {f.name} must be an integer, got {value!r}")
        self.check()

    def check(self) -> None:
        """Raise ValueError for impossible options."""

    def spec(self) -> str:
        """The canonical spec, every option written out: "add:digits=3"."""
        options = ",".join(f"{f.name}={_format(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return f"{self.name}:{options}" if options else self.name

    def sample(self, rng: random.Random) -> Example:
        """One example drawn with `rng` (train and held-out alike; `examples` sorts them into splits)."""
        raise NotImplementedError

    def size(self) -> int:
        """How many distinct prompts the task has (train and held-out together)."""
        raise NotImplementedError

    def split_key(self, prompt: str) -> str:
        """The text whose hash decides the split; prompts with the same key share a split."""
        return prompt

    def grade(self, example: Example, completion: str) -> bool:
        """Exact match after stripping surrounding whitespace; tolerant of nothing else."""
        return completion.strip() == example.answer

    def well_formed(self, completion: str) -> bool:
        """Whether the reply has the answer's form (an integer, a word, ...), right or wrong."""
        return self.pattern.fullmatch(completion.strip()) is not None

    def _example(self, prompt: str, answer: object) -> Example:
        return Example(self.spec(), prompt, str(answer))


@dataclass(frozen=True)
class _Digits(Task):
    digits: int = 3

    def check(self) -> None:
        if not 1 <= self.digits <= 30:
            raise ValueError(f"{self.name}: digits must be in 1..30, got {self.digits}")

    def _operand(self, rng: random.Random) -> int:
        return rng.randrange(10**self.digits)


@dataclass(frozen=True)
class Add(_Digits):
    name: ClassVar[str] = "add"
    pattern: ClassVar[re.Pattern] = _INTEGER

    def sample(self, rng: random.Random) -> Example:
        a, b = self._operand(rng), self._operand(rng)
        return self._example(f"What is {a} + {b}?", a + b)

    def size(self) -> int:
        return 10 ** (2 * self.digits)

    def split_key(self, prompt: str) -> str:
        # a + b and b + a are one problem: they must not sit on opposite sides of the split.
        numbers = re.findall(r"[0-9]+", prompt)
        if len(numbers) != 2:
            return prompt
        a, b = sorted(int(x) for x in numbers)
        return f"add {a} {b}"


@dataclass(frozen=True)
class Sub(_Digits):
    name: ClassVar[str] = "sub"
    pattern: ClassVar[re.Pattern] = _INTEGER
    negative: bool = False  # allow a < b (negative answers)

    def check(self) -> None:
        super().check()
        if not isinstance(self.negative, bool):
            raise ValueError(f"sub: negative must be true or false, got {self.negative!r}")

    def sample(self, rng: random.Random) -> Example:
        a, b = self._operand(rng), self._operand(rng)
        if not self.negative and a < b:
            a, b = b, a
        return self._example(f"What is {a} - {b}?", a - b)

    def size(self) -> int:
        m = 10**self.digits
        return m * m if self.negative else m * (m + 1) // 2


@dataclass(frozen=True)
class Mul(_Digits):
    name: ClassVar[str] = "mul"
    pattern: ClassVar[re.Pattern] = _INTEGER

    def sample(self, rng: random.Random) -> Example:
        a, d = self._operand(rng), rng.randrange(10)
        return self._example(f"What is {a} * {d}?", a * d)

    def size(self) -> int:
        return 10**self.digits * 10


@dataclass(frozen=True)
class _Word(Task):
    min_len: int = 3
    max_len: int = 8
    pattern: ClassVar[re.Pattern] = _LOWER

    def check(self) -> None:
        if not 1 <= self.min_len <= self.max_len <= 64:
            raise ValueError(f"{self.name}: need 1 <= min_len <= max_len <= 64, got {self.min_len}, {self.max_len}")

    def _word(self, rng: random.Random) -> str:
        # Random letters, not dictionary words: the prompt space is large and nothing can be recalled.
        return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(self.min_len, self.max_len)))

    def size(self) -> int:
        return sum(26**n for n in range(self.min_len, self.max_len + 1))


@dataclass(frozen=True)
class Reverse(_Word):
    name: ClassVar[str] = "reverse"

    def sample(self, rng: random.Random) -> Example:
        word = self._word(rng)
        return self._example(f"Reverse the word: {word}", word[::-1])


@dataclass(frozen=True)
class Copy(_Word):
    name: ClassVar[str] = "copy"

    def sample(self, rng: random.Random) -> Example:
        word = self._word(rng)
        return self._example(f"Repeat exactly: {word}", word)


@dataclass(frozen=True)
class _List(Task):
    length: int = 5
    max_value: int = 99

    def check(self) -> None:
        if not 1 <= self.length <= 64 or self.max_value < 1:
            raise ValueError(f"{self.name}: need 1 <= length <= 64 and max_value >= 1, got {self.length}, "
                             f"{self.max_value}")  # fmt: skip

    def _numbers(self, rng: random.Random) -> list[int]:
        return [rng.randint(0, self.max_value) for _ in range(self.length)]

    def size(self) -> int:
        return (self.max_value + 1) ** self.length


@dataclass(frozen=True)
class Sort(_List):
    name: ClassVar[str] = "sort"
    pattern: ClassVar[re.Pattern] = _NATURALS

    def sample(self, rng: random.Random) -> Example:
        numbers = self._numbers(rng)
        return self._example(f"Sort ascending: {_join(numbers)}", _join(sorted(numbers)))


@dataclass(frozen=True)
class Max(_List):
    name: ClassVar[str] = "max"

    def sample(self, rng: random.Random) -> Example:
        numbers = self._numbers(rng)
        return self._example(f"Largest number in: {_join(numbers)}", max(numbers))


@dataclass(frozen=True)
class Count(Task):
    name: ClassVar[str] = "count"
    min_len: int = 5
    max_len: int = 12
    letters: int = 4  # the string uses the first `letters` letters, so counts are rarely 0 or 1

    def check(self) -> None:
        if not 1 <= self.min_len <= self.max_len <= 64 or not 1 <= self.letters <= 26:
            raise ValueError(f"count: need 1 <= min_len <= max_len <= 64 and 1 <= letters <= 26, got "
                             f"{self.min_len}, {self.max_len}, {self.letters}")  # fmt: skip

    def sample(self, rng: random.Random) -> Example:
        alphabet = string.ascii_lowercase[: self.letters]
        text = "".join(rng.choices(alphabet, k=rng.randint(self.min_len, self.max_len)))
        letter = rng.choice(alphabet)
        return self._example(f"Count the letter {letter} in: {text}", text.count(letter))

    def size(self) -> int:
        return self.letters * sum(self.letters**n for n in range(self.min_len, self.max_len + 1))


TASKS: dict[str, type[Task]] = {t.name: t for t in (Add, Sub, Mul, Reverse, Copy, Sort, Max, Count)}


def available_tasks() -> list[str]:
    """The task names, in the order of the module docstring's table."""
    return list(TASKS)


def get_task(spec: str | Task) -> Task:
    """The task of a spec: "add", "add:digits=3", "count:letters=3,max_len=8". ValueError names the choices."""
    if isinstance(spec, Task):
        return spec
    name, _, options = str(spec).strip().partition(":")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} in {spec!r}: choose from {', '.join(available_tasks())}")
    cls = TASKS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, object] = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in fields:
            known = ", ".join(f"{k}=" for k in fields) or "none"
            raise ValueError(f"task {name!r}: bad option {item!r} in {spec!r}; its options: {known}")
        kwargs[key] = _parse(name, key, value, fields[key].type)
    return cls(**kwargs)


def parse_task_list(text: str) -> list[str]:
    """Split "add:digits=3,sub:digits=2,negative=true,reverse" into specs; a key=value piece belongs to the
    task before it. The specs are not checked here (get_task does that)."""
    specs: list[str] = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
        if "=" in piece and ":" not in piece:
            if not specs:
                raise ValueError(f"{piece!r} in {text!r} is an option with no task before it")
            specs[-1] += ("," if ":" in specs[-1] else ":") + piece
        else:
            specs.append(piece)
    if not specs:
        raise ValueError(f"no task in {text!r}: choose from {', '.join(available_tasks())}")
    return specs


def _parse(task: str, key: str, value: str, kind: object) -> object:
    if kind in ("bool", bool):
        lowered = value.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"task {task!r}: {key} must be true or false, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"task {task!r}: {key} must be an integer, got {value!r}") from None


def _format(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _join(numbers: Sequence[int]) -> str:
    return " ".join(map(str, numbers))


# ------------------------------------------------------------------------------------------------ splits


def _hash64(text: str) -> int:
    # hashlib, not hash(): str hashes change with PYTHONHASHSEED from one process to the next.
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_of(task: Task | str, prompt: str | Example) -> Split:
    """Which split a prompt belongs to ("train" or "heldout"); a pure function of its split key."""
    task = get_task(task)
    text = prompt.prompt if isinstance(prompt, Example) else prompt
    return "heldout" if _hash64(task.split_key(text)) < HELDOUT_FRACTION * 2**64 else "train"


def examples(task: Task | str, split: Split, n: int, seed: int = 0) -> list[Example]:
    """`n` distinct examples of `split`, the same for the same (task spec, split, n, seed); a shorter list is
    a prefix of a longer one. ValueError when the split has fewer than `n` distinct prompts."""
    task = get_task(task)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    size = task.size()
    share = HELDOUT_FRACTION if split == "heldout" else 1 - HELDOUT_FRACTION

    def too_few() -> ValueError:
        return ValueError(f"{task.spec()}: cannot draw {n:,} distinct {split} prompts; the task has {size:,} "
                          f"prompts, about {share * size:,.0f} of them {split}: ask for fewer or widen the task "
                          "(more digits, longer lists or words)")  # fmt: skip

    if n > size:
        raise too_few()
    rng = random.Random(_hash64(f"{task.spec()}|{split}|{seed}"))
    # Rejection sampling: draw, keep what is new and in the split. Give up after a long run of misses,
    # long enough that a split with room left is (almost) never given up on: the last free prompt of a
    # space of `size` takes `size / free` draws on average, and e^-20 is the chance of 20x that.
    patience = max(10_000, 20 * size)
    out: list[Example] = []
    seen: set[str] = set()
    misses = 0
    while len(out) < n:
        example = task.sample(rng)
        if example.prompt in seen or split_of(task, example.prompt) != split:
            misses += 1
            if misses > patience:
                raise too_few()
            continue
        misses = 0
        seen.add(example.prompt)
        out.append(example)
    return out


# --------------------------------------------------------------------------------------------- statistics


def exact_match_interval(correct: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """(rate, lo, hi): the exact-match rate and its Wilson score interval (Wilson 1927). Unlike the normal
    approximation p ± z·sqrt(p(1-p)/n), it stays inside [0, 1] and is not empty at 0 or n correct."""
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n >= 1, got correct={correct}, n={n}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = correct / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 (or n) correct the bound is exactly 0 (or 1); say so rather than leave 1e-17 of rounding.
    lo = 0.0 if correct == 0 else max(0.0, center - half)
    hi = 1.0 if correct == n else min(1.0, center + half)
    return p, lo, hi
