"""The A/B rating page's back end (`/rate`): one prompt, two samples of the served model at two temperatures, the
sides drawn per pair; a person's vote is written as the same record `lmforge prefs collect` writes
(`lmforge.align.preferences.PairRecord`), so `lmforge reward train data=FILE` reads the file unchanged.

    lmforge serve runs/arith-sft --rate-prompts task:add:digits=2 --rate-out prefs/me.jsonl   # then open /rate

Prompt i is sampled with the seeds and side that `prefs collect` would use for it (`pair_seeds`, `shown_left`), so
a pair rated here and one collected in a terminal are the same pair. The file is appended and fsynced a vote at a
time; reopening the page resumes at the first prompt without a record; undo removes the last record.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

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
from lmforge.infer.sampling import SamplingParams

SIDES = {"left", "right", "tie", "both_bad", "skip"}


@dataclass
class RateConfig:
    prompts: str  # task:SPEC or a JSONL of {"prompt"} / {"messages"}, as prefs collect's prompts=
    out: Path
    n_prompts: int = 50
    temperature_a: float = 0.7
    temperature_b: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    policy: str | None = None


class RateSession:
    def __init__(self, loop, tokenizer, cfg: RateConfig):
        self.loop, self.tokenizer, self.cfg = loop, tokenizer, cfg
        self.items = load_prompts(cfg.prompts, cfg.n_prompts)
        self.current: Pair | None = None
        self.shown_at = 0.0
        self._lock = asyncio.Lock()

    def records(self) -> list[PairRecord]:
        return read_records(self.cfg.out) if self.cfg.out.is_file() else []

    async def next_pair(self) -> dict:
        async with self._lock:
            done = {r.prompt_index for r in self.records()}
            todo = [i for i in range(len(self.items)) if i not in done]
            if not todo:
                return {"done": True, "rated": len(done), "total": len(self.items)}
            i = todo[0]
            if self.current is None or self.current.prompt_index != i:
                self.current = await self._sample(i)
            self.shown_at = time.perf_counter()
            pair = self.current
            left, right = ((pair.completion_a, pair.completion_b) if pair.shown_left == "a"
                           else (pair.completion_b, pair.completion_a))  # fmt: skip
            return {"done": False, "prompt_index": i, "prompt": pair.prompt, "left": left, "right": right,
                    "rated": len(done), "total": len(self.items)}  # fmt: skip

    async def _sample(self, i: int) -> Pair:
        item, cfg = self.items[i], self.cfg
        prompt = self.tokenizer.render_chat(item.messages, add_generation_prompt=True)[0]
        seeds = pair_seeds(cfg.seed, i)
        handles = [self.loop.submit(prompt, SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=t, seed=s,
                                                           stop_ids=tuple(self.tokenizer.stop_ids)))
                   for s, t in zip(seeds, (cfg.temperature_a, cfg.temperature_b))]  # fmt: skip
        texts = [(await h.aresult()).texts[0] for h in handles]
        return Pair(i, item.text, item.messages, texts[0], texts[1], seeds[0], seeds[1], cfg.temperature_a,
                    cfg.temperature_b, shown_left(cfg.seed, i), item.answer, item.task)  # fmt: skip

    async def vote(self, prompt_index: int, side: str) -> dict:
        """Record the shown pair's vote, given as a screen side (left / right / tie / both_bad / skip)."""
        async with self._lock:
            pair = self.current
            if pair is None or pair.prompt_index != prompt_index:
                return {"ok": False, "why": "that pair is not the one shown: reload the page"}
            if side in ("left", "right"):
                label = pair.shown_left if side == "left" else ("b" if pair.shown_left == "a" else "a")
            else:
                label = side
            record = PairRecord.rated(pair, label, rater="human:rate-page", detail={"side": side},
                                      seconds=time.perf_counter() - self.shown_at, policy=self.cfg.policy)  # fmt: skip
            append_record(self.cfg.out, record)
            self.current = None
            return {"ok": True, "label": label}

    async def undo(self) -> dict:
        async with self._lock:
            last = pop_last_record(self.cfg.out)
            self.current = last.pair(self.items[last.prompt_index]) if last is not None else None
            return {"ok": last is not None, "prompt_index": last.prompt_index if last else None}
