"""Preference collection: two samples of the policy per prompt, a rater's label, one JSON line per pair.

    lmforge prefs collect --config configs/prefs/arith-program.yaml policy=runs/arith-sft
    lmforge prefs collect policy=runs/sft prompts=task:add:digits=3 n_prompts=50 rater=human out=prefs/me.jsonl
    printf 'a\\nu\\nb\\nq\\n' | lmforge prefs collect policy=runs/sft rater=human-lines out=prefs/me.jsonl
    lmforge prefs collect policy=runs/sft rater=judge:http://127.0.0.1:8000/v1 judge_model=NAME out=prefs/j.jsonl
    lmforge prefs agreement prefs/me.jsonl prefs/you.jsonl prefs/j.jsonl     # pairwise Cohen's κ

Prompt i (of the task's train split drawn with `prompt_seed`, or line i of a JSONL file) is sampled twice, with
seeds seed + 2i and seed + 2i + 1 and temperatures temperature_a / temperature_b; draws are counter-based
(`lmforge.infer.sampling`), so the seeds alone reproduce both samples. The raters live in `raters.py`.

The out file is append-only, one record a line, fsynced after each, so a crash loses at most the pair being
rated; run the same command again and it resumes at the first prompt index with no record (undo removes the
last record, so an undone prompt is asked again). A record:

    {"prompt_index": 3, "prompt": "What is 12 + 30?", "completion_a": "42", "completion_b": "43",
     "seed_a": 6, "seed_b": 7, "temperature_a": 1.0, "temperature_b": 1.0,
     "shown_left": "b",                # the sample shown on the left, as "A", to a human (drawn per pair)
     "label": "a",                     # a | b | tie | both_bad | skip | null (no label: judge unparseable)
     "chosen": "42", "rejected": "43", # when the label is a or b, else null
     "rater": "program:add:digits=3", "rater_detail": {...}, "seconds": 0.0001,
     "timestamp": "2025-01-01T12:00:00+00:00", "messages": [{"role": "user", ...}], "policy": "runs/arith-sft"}

`to_training_pairs(records)` keeps the a/b labels as {"prompt", "chosen", "rejected"}, the format the reward
model and DPO read (`lmforge.align.pairs.load_pairs`, which also reads these records directly).
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from lmforge.config import ConfigError
from lmforge.runs import atomic_write_text, count_write

from .raters import DEFAULT_PRINCIPLES, LABELS, Action, Pair, ProgramRater, load_principles, make_rater
from .raters import parse_rater_spec as _parse_rater_spec

__all__ = [
    "PairRecord",
    "PairSampler",
    "PrefsConfig",
    "PromptItem",
    "append_record",
    "collect",
    "load_prompts",
    "pair_seeds",
    "pop_last_record",
    "read_records",
    "shown_left",
    "to_training_pairs",
]


@dataclass
class PrefsConfig:
    policy: str = "runs/sft"  # the run folder sampled (or a checkpoint / HF folder)
    prompts: str = "task:add:digits=3"  # task:SPEC (its train split) or a JSONL of {"prompt"} / {"messages"}
    n_prompts: int = 100  # pairs to collect (a JSONL's first n lines)
    prompt_seed: int = 1  # draw of a task's prompts; SFT draws with 0, so these are mostly prompts it never saw
    out: str = "runs/prefs.jsonl"
    rater: str = "human"  # human | human-lines | program[:TASK] | judge:RUN | judge:http://HOST:PORT/v1
    seed: int = 0  # prompt i is sampled with seeds seed + 2i and seed + 2i + 1
    temperature_a: float = 1.0
    temperature_b: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 8  # prompts sampled together (2 samples each) by the engine
    resume: bool = True  # continue the out file; false refuses to touch an existing one
    principles: list[str] | str = field(default_factory=lambda: list(DEFAULT_PRINCIPLES))  # or a YAML file path
    judge_model: str = "judge"  # the model name sent to an OpenAI-compatible judge
    judge_max_tokens: int = 8
    judge_timeout: float = 60.0

    def validate(self) -> None:
        if self.n_prompts < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.judge_max_tokens < 1:
            raise ValueError("n_prompts, max_new_tokens, batch_size and judge_max_tokens must be ≥ 1")
        if min(self.temperature_a, self.temperature_b) < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperatures must be ≥ 0 (0 = greedy) and top_p in (0, 1]")
        _parse_rater_spec(self.rater)
        if self.prompts.startswith("task:"):
            from lmforge.data.tasks import get_task

            get_task(self.prompts.removeprefix("task:"))


# ------------------------------------------------------------------------------------------------ prompts


@dataclass
class PromptItem:
    messages: list[dict]  # ends with the user turn the policy answers
    answer: str | None = None
    task: str | None = None

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


def load_prompts(spec: str, n: int, seed: int = 1) -> list[PromptItem]:
    """`n` prompts of a task's train split, or the first `n` of a JSONL file whose lines hold "prompt" (a
    string) or "messages" (ending with a user turn), and optionally "answer" (for the program rater)."""
    if spec.startswith("task:"):
        from lmforge.data.tasks import examples, get_task

        try:
            drawn = examples(get_task(spec.removeprefix("task:")), "train", n, seed=seed)
        except ValueError as e:
            raise ConfigError(f"prompts: {e}") from None
        return [PromptItem(e.prompt_messages(), e.answer, e.task) for e in drawn]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f'no prompts at {path}: give task:SPEC or a JSONL of {{"prompt": ...}} lines')
    from lmforge.data.chat_jsonl import jsonl_objects

    items: list[PromptItem] = []
    try:
        for number, obj in jsonl_objects(path):  # a generator: lines past the n-th are never read
            if len(items) == n:
                break
            items.append(_prompt_item(obj, f"{path}:{number}"))
    except ValueError as e:  # a line that is not a JSON object
        raise ConfigError(str(e)) from None
    if not items:
        raise ConfigError(f"{path} holds no prompts")
    return items


def _prompt_item(obj: dict, where: str) -> PromptItem:
    if isinstance(obj.get("prompt"), str):
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        messages = obj.get("messages")
        roles = ("system", "user", "assistant")
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str) for m in messages
            )
        )
        if not ok or messages[-1]["role"] != "user":
            raise ConfigError(f'{where}: need "prompt": "..." or "messages": [...] ending with a user turn')
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    answer = obj.get("answer")
    return PromptItem(messages, None if answer is None else str(answer), obj.get("task"))


def pair_seeds(seed: int, index: int) -> tuple[int, int]:
    """The sampling seeds of prompt `index`'s two samples: distinct across prompts and samples."""
    return seed + 2 * index, seed + 2 * index + 1


def shown_left(seed: int, index: int) -> str:
    """Which sample a human sees on the left: a fair coin per pair, reproducible from (seed, index)."""
    return "a" if random.Random(f"shown_left|{seed}|{index}").random() < 0.5 else "b"


# ----------------------------------------------------------------------------------------------- sampling


class PairSampler:
    """Completions from the policy with the paged engine: several prompts, two seeds each, in one batch."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 64, top_p: float = 1.0):
        self.model, self.tokenizer, self.max_new_tokens, self.top_p = model, tokenizer, max_new_tokens, top_p
        self.stop_ids = tokenizer.stop_ids

    @classmethod
    def from_run(cls, path: str | Path, **kwargs) -> PairSampler:
        from lmforge.infer.loading import load_for_inference

        return cls(*load_for_inference(path), **kwargs)

    def sample(self, requests: Sequence[tuple[list[dict], int, float]]) -> list[str]:
        """One completion (text, specials dropped) per (messages, seed, temperature), in order; each cut to what
        the policy's context leaves after its prompt."""
        from lmforge.infer.replies import generate_replies
        from lmforge.infer.sampling import SamplingParams

        params = [SamplingParams(max_new_tokens=self.max_new_tokens, temperature=temperature, top_p=self.top_p,
                                 seed=seed, stop_ids=self.stop_ids) for _, seed, temperature in requests]  # fmt: skip
        replies = generate_replies(self.model, self.tokenizer, [m for m, _, _ in requests], params, fit_context=True)
        return [c.text for c in replies]


def _pairs(sampler, items: list[PromptItem], todo: list[int], cfg: PrefsConfig) -> Iterator[Pair]:
    """Pairs of the prompts `todo`, sampled `batch_size` prompts at a time (so a human waits only per batch)."""
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start : start + cfg.batch_size]
        requests = []
        for i in chunk:
            seed_a, seed_b = pair_seeds(cfg.seed, i)
            requests += [(items[i].messages, seed_a, cfg.temperature_a), (items[i].messages, seed_b, cfg.temperature_b)]
        texts = sampler.sample(requests)
        for j, i in enumerate(chunk):
            seed_a, seed_b = pair_seeds(cfg.seed, i)
            yield Pair(i, items[i].text, items[i].messages, texts[2 * j], texts[2 * j + 1], seed_a, seed_b,
                       cfg.temperature_a, cfg.temperature_b, shown_left(cfg.seed, i), items[i].answer,
                       items[i].task)  # fmt: skip


# ------------------------------------------------------------------------------------------------ records


@dataclass
class PairRecord:
    """One rated pair: a line of the out file (see the module docstring)."""

    prompt_index: int
    prompt: str
    completion_a: str
    completion_b: str
    seed_a: int
    seed_b: int
    temperature_a: float
    temperature_b: float
    shown_left: str
    label: str | None
    chosen: str | None = None
    rejected: str | None = None
    rater: str = ""
    rater_detail: dict = field(default_factory=dict)
    seconds: float = 0.0
    timestamp: str = ""
    messages: list[dict] | None = None
    policy: str | None = None

    @classmethod
    def rated(cls, pair: Pair, label: str | None, *, rater: str, detail: dict, seconds: float,
              policy: str | None = None) -> PairRecord:  # fmt: skip
        chosen = rejected = None
        if label in ("a", "b"):
            chosen, rejected = (pair.completion_a, pair.completion_b)[:: 1 if label == "a" else -1]
        return cls(pair.prompt_index, pair.prompt, pair.completion_a, pair.completion_b, pair.seed_a, pair.seed_b,
                   pair.temperature_a, pair.temperature_b, pair.shown_left, label, chosen, rejected, rater, detail,
                   round(seconds, 4), datetime.now(UTC).isoformat(timespec="seconds"), pair.messages,
                   policy)  # fmt: skip

    @classmethod
    def from_dict(cls, obj: dict, where: str = "record") -> PairRecord:
        names = [f for f in cls.__dataclass_fields__]
        missing = [k for k in names[:10] if k not in obj]
        if missing:
            raise ValueError(f"{where}: not a preference record (missing {', '.join(missing)})")
        if obj["label"] is not None and obj["label"] not in LABELS:
            raise ValueError(f"{where}: label {obj['label']!r} is not one of {', '.join(LABELS)} or null")
        return cls(**{k: obj[k] for k in names if k in obj})

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    def pair(self, item: PromptItem | None = None) -> Pair:
        """The pair again (to be rated again after an undo)."""
        messages = self.messages or [{"role": "user", "content": self.prompt}]
        return Pair(self.prompt_index, self.prompt, messages, self.completion_a, self.completion_b, self.seed_a,
                    self.seed_b, self.temperature_a, self.temperature_b, self.shown_left,
                    item.answer if item else None, item.task if item else None)  # fmt: skip


def _read(path: Path) -> tuple[list[PairRecord], bool]:
    """(records, whole): a last line cut short by a crash is skipped and reported; a bad line elsewhere fails."""
    lines = path.read_text(encoding="utf-8").split("\n")
    records, whole = [], True
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: the write was cut short
                whole = False
                continue
            raise ConfigError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        try:
            records.append(PairRecord.from_dict(obj, f"{path}:{number}"))
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None
    return records, whole


def read_records(path: str | Path) -> list[PairRecord]:
    """The records of an out file, in order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no preference file at {path}")
    return _read(path)[0]


def append_record(path: str | Path, record: PairRecord) -> None:
    """Add one line and make it durable before the next pair is shown."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count_write(path)
    with path.open("a", encoding="utf-8") as f:
        f.write(record.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


def _rewrite(path: Path, records: Sequence[PairRecord]) -> None:
    atomic_write_text(path, "".join(r.to_json() + "\n" for r in records))


def pop_last_record(path: str | Path, rater: str | None = None) -> PairRecord | None:
    """Remove the file's last record — the last of `rater`'s, when given — (rewriting the file atomically) and
    return it; None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    records, _ = _read(path)
    last = next((i for i in reversed(range(len(records))) if rater is None or records[i].rater == rater), None)
    if last is None:
        return None
    _rewrite(path, records[:last] + records[last + 1 :])
    return records[last]


def to_training_pairs(records: Iterable[PairRecord | dict]) -> list[dict]:
    """{"prompt", "chosen", "rejected"} for every record labelled a or b; ties, skips and no-labels drop out."""
    pairs = []
    for r in records:
        r = PairRecord.from_dict(r) if isinstance(r, dict) else r
        if r.label in ("a", "b"):
            chosen, rejected = (r.completion_a, r.completion_b)[:: 1 if r.label == "a" else -1]
            pairs.append({"prompt": r.prompt, "chosen": chosen, "rejected": rejected})
    return pairs


# ------------------------------------------------------------------------------------------------ collect


def _open_out(path: Path, resume: bool, items: list[PromptItem]) -> list[PairRecord]:
    if not path.exists() or path.stat().st_size == 0:
        return []
    if not resume:
        raise FileExistsError(f"{path} already holds pairs: resume=true continues it, or give another out=")
    records, whole = _read(path)
    if not whole:  # drop the torn line now, or the next append would glue onto it
        _rewrite(path, records)
    for r in records:
        if r.prompt_index < len(items) and r.prompt != items[r.prompt_index].text:
            expected = items[r.prompt_index].text
            raise ConfigError(f"{path}: prompt {r.prompt_index} there is {r.prompt!r}, not {expected!r}: resume with "
                              "the same prompts (and prompt_seed), or give another out=")  # fmt: skip
    return records


def collect(cfg: PrefsConfig, *, rater=None, sampler=None, stdin: IO[str] | None = None,
            stdout: IO[str] | None = None) -> dict:  # fmt: skip
    """Sample and rate the pairs of the prompts not yet in `cfg.out`; returns a summary of the file."""
    cfg.validate()
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    items = load_prompts(cfg.prompts, cfg.n_prompts, cfg.prompt_seed)
    out = Path(cfg.out)
    records = _open_out(out, cfg.resume, items)
    if rater is None:
        rater = make_rater(cfg.rater, stdin=stdin, stdout=stdout, principles=load_principles(cfg.principles),
                           judge_model=cfg.judge_model, judge_max_tokens=cfg.judge_max_tokens,
                           judge_timeout=cfg.judge_timeout)  # fmt: skip
    if isinstance(rater, ProgramRater) and rater.task is not None and items[0].task:
        from lmforge.data.tasks import get_task

        if get_task(items[0].task).name != rater.task.name:
            raise ConfigError(f"rater {cfg.rater} grades {rater.task.name}, but the prompts are {items[0].task}")
    done = {r.prompt_index for r in records}
    todo = [i for i in range(len(items)) if i not in done]
    n_rated = len(items) - len(todo)
    print(f"{out}: {n_rated} of {len(items)} prompts rated; rater {rater.name}", file=stdout, flush=True)
    labels: Counter = Counter()
    if todo:
        if sampler is None:
            sampler = PairSampler.from_run(cfg.policy, max_new_tokens=cfg.max_new_tokens, top_p=cfg.top_p)
        fresh, pending = _pairs(sampler, items, todo, cfg), deque[Pair]()
        while (pair := pending.popleft() if pending else next(fresh, None)) is not None:
            result = rater.rate(pair, (n_rated + 1, len(items)))
            if result is Action.QUIT:
                print(f"stopped; {n_rated} of {len(items)} rated in {out}: run again to resume", file=stdout)
                break
            if result is Action.UNDO:
                pending.appendleft(pair)
                last = pop_last_record(out)
                if last is None:
                    print("nothing to undo", file=stdout)
                    continue
                print(f"undid prompt {last.prompt_index} ({last.label}); rate it again", file=stdout, flush=True)
                labels[_key(last.label)] -= 1  # `+labels` below drops a count that goes below one
                in_range = last.prompt_index < len(items)
                pending.appendleft(last.pair(items[last.prompt_index] if in_range else None))
                n_rated -= int(in_range)
                continue
            record = PairRecord.rated(pair, result.label, rater=rater.name, detail=result.detail,
                                      seconds=result.seconds, policy=cfg.policy)  # fmt: skip
            append_record(out, record)
            labels[_key(result.label)] += 1
            n_rated += int(pair.prompt_index < len(items))
    final = read_records(out) if out.exists() else []
    summary = {"out": str(out), "rated_now": sum((+labels).values()), "labels_now": dict(+labels),
               "records": len(final), "training_pairs": len(to_training_pairs(final))}  # fmt: skip
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary["labels_now"].items())) or "none"
    print(f"{out}: {summary['records']} records ({summary['training_pairs']} training pairs); this run: {counts}",
          file=stdout)  # fmt: skip
    return summary


def _key(label: str | None) -> str:
    return "null" if label is None else label
