"""The A/B rating page's back end (`/rate`): one prompt, two samples — of the served model at two temperatures, or
of the served model (A) against a second model (B, `--rate-against MODEL`) — the sides drawn per pair; a person's
vote is written as the same record `lmforge prefs collect` writes (`lmforge.align.preferences.PairRecord`), so
`lmforge reward train data=FILE` reads the file unchanged.

    lmforge serve runs/arith-sft --rate-prompts task:add:digits=2 --rate-out prefs/me.jsonl   # then open /rate
    lmforge serve runs/dpo --rate-against runs/sft --rate-prompts prompts.jsonl               # DPO (A) vs SFT (B)

Prompt i is sampled with the seeds and side that `prefs collect` would use for it (`pair_seeds`, `shown_left`), so
a pair rated here and one collected in a terminal are the same pair. The file is appended and fsynced a vote at a
time; reopening the page resumes at the first prompt without a record; undo removes the last record.

Several people can rate at once: each opens `/rate?rater=NAME` and gets their own progress and undo (records carry
`rater: "human:NAME"`); every rater sees the same two samples of a prompt (sampled once, kept), and the page shows
how often each rater agreed with the others on the pairs both rated, with Cohen's κ (`lmforge.align.agreement`).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.align.agreement import cohens_kappa
from lmforge.align.preferences import (
    Pair,
    PairRecord,
    append_record,
    load_prompts,
    pair_seeds,
    pop_last_record,
    read_records,
    shown_left,
)
from lmforge.config import UserError
from lmforge.infer.context import context_limit
from lmforge.infer.sampling import SamplingParams

SIDES = {"left", "right", "tie", "both_bad", "skip"}
DEFAULT_RATER = "rate-page"


@dataclass
class RateConfig:
    prompts: str  # task:SPEC or a JSONL of {"prompt"} / {"messages"}, as prefs collect's prompts=
    out: Path
    n_prompts: int = 50
    temperature_a: float = 0.7
    temperature_b: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    policy: str | None = None  # the served model (sample A)
    against: str | None = None  # the second model (sample B), when one is compared


@dataclass
class Against:
    """The second model of `--rate-against`: its own engine loop and tokenizer (B's prompt in B's template)."""

    loop: object
    tokenizer: object


@dataclass
class _Rater:
    current: Pair | None = None
    shown_at: float = 0.0


def rater_id(name: str | None) -> str:
    """`human:NAME` for a page's ?rater=NAME (letters, digits, - _ . only: it is written into every record)."""
    name = (name or DEFAULT_RATER).strip() or DEFAULT_RATER
    if not re.fullmatch(r"[\w.-]{1,64}", name):
        raise ValueError("rater names are 1-64 letters, digits, '-', '_' or '.'")
    return f"human:{name}"


class RateSession:
    def __init__(self, loop, tokenizer, cfg: RateConfig, against: Against | None = None):
        self.loop, self.tokenizer, self.cfg, self.against = loop, tokenizer, cfg, against
        self.items = load_prompts(cfg.prompts, cfg.n_prompts)
        self.pairs: dict[int, Pair] = {}  # prompt index -> its pair, sampled once for every rater
        self.raters: dict[str, _Rater] = {}
        self._lock = asyncio.Lock()

    def records(self) -> list[PairRecord]:
        return read_records(self.cfg.out) if self.cfg.out.is_file() else []

    async def next_pair(self, rater: str) -> dict:
        async with self._lock:
            records = self.records()
            done = {r.prompt_index for r in records if r.rater == rater}
            state = self.raters.setdefault(rater, _Rater())
            base = {"rated": len(done), "total": len(self.items), "rater": rater,
                    "agreement": agreement_with_others(records, rater)}  # fmt: skip
            todo = [i for i in range(len(self.items)) if i not in done]
            if not todo:
                return base | {"done": True}
            i = todo[0]
            if state.current is None or state.current.prompt_index != i:
                state.current = self.pairs.get(i) or await self._sample(i)
                self.pairs[i] = state.current
            state.shown_at = time.perf_counter()
            pair = state.current
            left, right = ((pair.completion_a, pair.completion_b) if pair.shown_left == "a"
                           else (pair.completion_b, pair.completion_a))  # fmt: skip
            return base | {"done": False, "prompt_index": i, "prompt": pair.prompt, "left": left, "right": right}

    async def _sample(self, i: int) -> Pair:
        item, cfg = self.items[i], self.cfg
        seeds = pair_seeds(cfg.seed, i)
        sides = [(self.loop, self.tokenizer), (self.against.loop, self.against.tokenizer) if self.against else
                 (self.loop, self.tokenizer)]  # fmt: skip
        handles = []
        for (loop, tok), s, t in zip(sides, seeds, (cfg.temperature_a, cfg.temperature_b)):
            prompt = tok.render_chat(item.messages, add_generation_prompt=True)[0]
            limit = context_limit(loop.engine.cfg) or loop.engine.pool.capacity_tokens
            if len(prompt) >= limit:
                raise UserError(f"prompt {i} has {len(prompt)} tokens, past the model's context of {limit}: "
                                "give shorter prompts")  # fmt: skip
            # as long a reply as asked for, cut to what the model's context leaves after the prompt
            params = SamplingParams(max_new_tokens=min(cfg.max_new_tokens, limit - len(prompt)), temperature=t,
                                    seed=s, stop_ids=tuple(tok.stop_ids))  # fmt: skip
            handles.append(loop.submit(prompt, params))
        texts = [(await h.aresult()).texts[0] for h in handles]
        return Pair(i, item.text, item.messages, texts[0], texts[1], seeds[0], seeds[1], cfg.temperature_a,
                    cfg.temperature_b, shown_left(cfg.seed, i), item.answer, item.task)  # fmt: skip

    async def vote(self, rater: str, prompt_index: int, side: str) -> dict:
        """Record the shown pair's vote, given as a screen side (left / right / tie / both_bad / skip)."""
        async with self._lock:
            state = self.raters.get(rater)
            pair = state.current if state else None
            if pair is None or pair.prompt_index != prompt_index:
                return {"ok": False, "why": "that pair is not the one shown: reload the page"}
            if side in ("left", "right"):
                label = pair.shown_left if side == "left" else ("b" if pair.shown_left == "a" else "a")
            else:
                label = side
            detail = {"side": side} | ({"model_b": self.cfg.against} if self.cfg.against else {})
            record = PairRecord.rated(pair, label, rater=rater, detail=detail,
                                      seconds=time.perf_counter() - state.shown_at, policy=self.cfg.policy)  # fmt: skip
            append_record(self.cfg.out, record)
            state.current = None
            return {"ok": True, "label": label}

    async def undo(self, rater: str) -> dict:
        async with self._lock:
            last = pop_last_record(self.cfg.out, rater=rater)
            state = self.raters.setdefault(rater, _Rater())
            state.current = None
            if last is not None:  # that pair is shown again
                state.current = self.pairs.get(last.prompt_index) or last.pair(self.items[last.prompt_index])
            return {"ok": last is not None, "prompt_index": last.prompt_index if last else None}


def agreement_with_others(records: list[PairRecord], rater: str) -> list[dict]:
    """Per other human rater: the pairs both labelled (a, b, tie or both_bad; skips left out), how many got the
    same label, and Cohen's κ (None where it is undefined: one label throughout, or nothing shared)."""
    counted = ("a", "b", "tie", "both_bad")
    mine = {r.prompt_index: r.label for r in records if r.rater == rater and r.label in counted}
    shared: dict[str, list[tuple[str, str]]] = {}
    for r in records:
        if r.rater != rater and r.rater.startswith("human:") and r.prompt_index in mine and r.label in counted:
            shared.setdefault(r.rater, []).append((mine[r.prompt_index], r.label))
    out = []
    for other, labels in shared.items():
        kappa = cohens_kappa([x for x, _ in labels], [y for _, y in labels])
        out.append({"with": other, "n": len(labels), "same": sum(x == y for x, y in labels),
                    "kappa": None if math.isnan(kappa) else round(kappa, 3)})  # fmt: skip
    return out
