"""The HF `transformers` baselines of `benchmarks/batching.py`, and the workload types they share with it:
requests served one at a time (or a seeded sample of them, the rest rebuilt from a fitted service-time model
on the arrival schedule) and in padded static batches, each token timed by a streamer."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

GPT2_YAML = Path(__file__).resolve().parents[1] / "configs" / "model" / "gpt2-124m.yaml"
GOAL_VS_SINGLE, GOAL_VS_STATIC = 5.0, 1.5


PAD_ID = 0  # any id: padded positions are masked out


@dataclass
class Job:
    """One request of the workload; `arrival` is seconds after the first arrival."""

    index: int
    arrival: float
    prompt: list[int]
    max_new: int


@dataclass
class Run:
    """One system's replay of the schedule. Times are seconds; `span` = last token − first arrival."""

    name: str
    output_tokens: int
    span: float
    ttft: list[float]
    itl: list[float]
    estimated: bool = False  # tok/s, TTFT and span rebuilt from a sample (HF one at a time, --hf-sample)
    elapsed: float = 0.0  # real time this system took to measure
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.span


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default); nan when empty."""
    s = sorted(xs)
    if not s:
        return math.nan
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


# ---- HF generate ---------------------------------------------------------------------------------------------


class TokenClock:
    """A `generate` streamer that only records when each step's tokens are out (any batch size)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(hf, prompts: list[list[int]], max_new: int) -> tuple[list[list[int]], list[float]]:
    """Greedy, exactly `max_new` new tokens per row, left-padded batch. Returns (new tokens per row, step times)."""
    from transformers import GenerationConfig

    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, L - len(p) :] = torch.tensor(p)
        mask[row, L - len(p) :] = 1
    gen = GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, num_beams=1,
                           pad_token_id=PAD_ID, eos_token_id=None, bos_token_id=None)  # fmt: skip
    clock = TokenClock()
    out = hf.generate(input_ids=ids, attention_mask=mask, generation_config=gen, streamer=clock)
    new = out[:, L:].tolist()
    if any(len(t) != max_new for t in new) or len(clock.times) != max_new:
        raise RuntimeError(f"HF generate gave {out.shape[1] - L} tokens / {len(clock.times)} steps, not {max_new}")
    return new, clock.times


# ---- HF systems ---------------------------------------------------------------------------------------------


@dataclass
class Served:
    """One HF request served alone: when generate started, each token's time, when generate returned."""

    job: Job
    start: float
    times: list[float]
    end: float


def serve_one_at_a_time(hf, jobs: list[Job], t0: float | None) -> list[Served]:
    """Each job alone, in order; with `t0`, a job starts no earlier than its arrival. Absolute times."""
    served = []
    for job in jobs:
        if t0 is not None:
            time.sleep(max(0.0, t0 + job.arrival - time.perf_counter()))
        start = time.perf_counter()
        _, times = hf_generate(hf, [job.prompt], job.max_new)
        served.append(Served(job, start, times, time.perf_counter()))
    return served


@dataclass
class ServiceModel:
    """A request's time alone, fitted on served ones: first token after a + b·prompt (least squares), then d per
    further token, then `tail` until generate returns."""

    a: float
    b: float
    d: float
    tail: float

    @classmethod
    def fit(cls, served: list[Served]) -> ServiceModel:
        p = [len(s.job.prompt) for s in served]
        pre = [s.times[0] - s.start for s in served]
        p_mean, pre_mean = sum(p) / len(p), sum(pre) / len(pre)
        var = sum((x - p_mean) ** 2 for x in p)
        b = sum((x - p_mean) * (y - pre_mean) for x, y in zip(p, pre)) / var if var else 0.0
        decode_tokens = sum(s.job.max_new - 1 for s in served)
        d = sum(s.times[-1] - s.times[0] for s in served) / max(decode_tokens, 1)
        tail = sum(s.end - s.times[-1] for s in served) / len(served)
        return cls(pre_mean - b * p_mean, b, d, tail)

    def offsets(self, job: Job) -> tuple[float, float, float]:
        """(first token, last token, end), in seconds after the request starts."""
        first = self.a + self.b * len(job.prompt)
        last = first + (job.max_new - 1) * self.d
        return first, last, last + self.tail


def fifo_timeline(jobs: list[Job], served: list[Served], model: ServiceModel) -> tuple[list[float], float]:
    """One-at-a-time serving of every job on the schedule's clock (first arrival = 0): a job starts at
    max(its arrival, the previous end) and takes its measured time if it was served, else the model's.
    Returns (TTFT per job, time of the last token)."""
    measured = {s.job.index: (s.times[0] - s.start, s.times[-1] - s.start, s.end - s.start) for s in served}
    prev_end, ttft, last = 0.0, [], 0.0
    for job in jobs:
        start = max(job.arrival, prev_end)
        first, last, end = measured.get(job.index) or model.offsets(job)
        ttft.append(start + first - job.arrival)
        last, prev_end = start + last, start + end
    return ttft, last


def run_hf_single(hf, jobs: list[Job], sample: int, seed: int) -> Run:
    name = "HF one at a time"
    out = sum(j.max_new for j in jobs)
    if not sample or sample >= len(jobs):
        t0 = time.perf_counter()
        served = serve_one_at_a_time(hf, jobs, t0)
        ttft = [s.times[0] - (t0 + s.job.arrival) for s in served]
        itl = [g for s in served for g in gaps(s.times)]
        return Run(name, out, served[-1].times[-1] - t0, ttft, itl, elapsed=time.perf_counter() - t0)

    chosen = sorted(random.Random(seed).sample(range(len(jobs)), sample))
    t_start = time.perf_counter()
    served = serve_one_at_a_time(hf, [jobs[i] for i in chosen], None)  # back to back: service times only
    elapsed = time.perf_counter() - t_start
    model = ServiceModel.fit(served)
    ttft, last = fifo_timeline(jobs, served, model)
    itl = [g for s in served for g in gaps(s.times)]
    s_prompt = sum(len(s.job.prompt) for s in served)
    s_out = sum(s.job.max_new for s in served)
    notes = [
        f"* {sample} of {len(jobs)} requests served (seeded subset; mean prompt {s_prompt / sample:.0f} vs "
        f"{sum(len(j.prompt) for j in jobs) / len(jobs):.0f}, mean output {s_out / sample:.0f} vs "
        f"{out / len(jobs):.0f} for all); the others modelled: first token {model.a * 1e3:.1f} ms + "
        f"{model.b * 1e3:.3f} ms/prompt token, then {model.d * 1e3:.1f} ms/token; tok/s, TTFT and wall rebuilt "
        f"for all {len(jobs)} on the arrival schedule (FIFO). The sample alone, back to back: "
        f"{s_out / elapsed:.1f} tok/s; ITL from the sample's own tokens"
    ]
    return Run(name, out, last, ttft, itl, estimated=True, elapsed=elapsed, notes=notes,
               extra=dict(sample=chosen, service_model=model))  # fmt: skip


def run_hf_static(hf, jobs: list[Job], size: int) -> Run:
    ttft, itl, wasted, steps_run, last = [], [], 0, 0, 0.0
    t0 = time.perf_counter()
    for i in range(0, len(jobs), size):
        group = jobs[i : i + size]
        time.sleep(max(0.0, t0 + max(j.arrival for j in group) - time.perf_counter()))  # its last member is in
        m = max(j.max_new for j in group)
        _, times = hf_generate(hf, [j.prompt for j in group], m)
        for job in group:
            ttft.append(times[0] - (t0 + job.arrival))
            itl += gaps(times[: job.max_new])
            wasted += m - job.max_new
        steps_run += m * len(group)
        last = times[-1]
    out = sum(j.max_new for j in jobs)
    padded = sum(
        len(g) * max(len(j.prompt) for j in g) for g in (jobs[i : i + size] for i in range(0, len(jobs), size))
    )
    prompts = sum(len(j.prompt) for j in jobs)
    notes = [
        f"{wasted:,} of {steps_run:,} generated tokens ({wasted / steps_run:.0%}) beyond their request's length "
        f"(wasted); prompt padding {1 - prompts / padded:.0%} of {padded:,} prefilled positions; TTFT = first "
        "step of the batch out (streamer)"
    ]
    return Run(f"HF static batches of {size}", out, last - t0, ttft, itl, elapsed=time.perf_counter() - t0,
               notes=notes, extra=dict(wasted_tokens=wasted, generated_tokens=steps_run))  # fmt: skip
