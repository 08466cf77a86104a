"""Exact match on verifiable tasks (`lmforge.data.tasks`): greedy replies to held-out prompts, graded exactly,
reported with a Wilson 95% interval.

    lmforge eval runs/sft --tasks add:digits=3,reverse --n 1000      # one line per task
    lmforge eval runs/sft --tasks sort --n 200 --json                 # the result dicts below

    from lmforge.train.task_eval import evaluate_tasks
    result = evaluate_tasks(model, tok, "add:digits=3", n=1000)
    result["accuracy"], result["ci95"]                                 # 0.413, [0.383, 0.444]

Each prompt is rendered with the chat template (`<|bos|><|user|>What is 482 + 917?<|end|><|assistant|>`) and
answered greedily by the continuous-batching engine (`lmforge.infer.replies`), many prompts in flight at once,
until the model writes <|end|> (or <|eos|>). A reply counts as correct only if it ended and
`task.grade(example, reply)` holds: a reply cut off by the token limit never does, or trailing spaces up to
the limit could pass as an answer the model never finished.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from lmforge.data.tasks import Split, Task, exact_match_interval, examples, get_task

# Tokens allowed past the longest expected answer: room for <|end|> and for a model that pads its reply
# with whitespace (which grading strips) before ending it.
ANSWER_SLACK = 8


class Reply(NamedTuple):
    text: str  # decoded reply without its stop token (other special tokens are written out, e.g. "<|user|>")
    ended: bool  # finished with <|end|> or <|eos|> rather than by the token limit
    tokens: int  # tokens generated, the stop token included


def greedy_replies(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int = 64,
                   progress: bool = False, desc: str = "generate") -> list[Reply]:  # fmt: skip
    """Greedy replies to token-id prompts, in order, batched by the engine (at most `batch_size` at a time); a
    reply is cut to what the model's context leaves after its prompt."""
    from lmforge.infer.replies import generate_replies
    from lmforge.infer.sampling import SamplingParams

    stops = tokenizer.stop_ids
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, seed=0, stop_ids=stops)
    replies = []
    for c in generate_replies(model, tokenizer, prompts, params, fit_context=True, max_batch=batch_size,
                              progress=progress, desc=desc):  # fmt: skip
        ended = c.finish_reason == "stop" and bool(c.ids) and c.ids[-1] in stops
        replies.append(Reply(tokenizer.decode(c.ids[:-1] if ended else c.ids), ended, len(c.ids)))
    return replies


def evaluate_tasks(model, tokenizer, task: Task | str, *, n: int = 1000, split: Split = "heldout", seed: int = 0,
                   max_new_tokens: int | None = None, batch_size: int = 64, progress: bool = True,
                   keep_replies: bool = False) -> dict:  # fmt: skip
    """Greedy exact match of `model` on `n` prompts of `task`'s `split`. Returns
    {task, split, n, seed, correct, accuracy, ci95: [lo, hi], well_formed_rate, ended_rate, max_new_tokens,
    generated_tokens, seconds, tokens_per_s, examples: [{prompt, expected, got, correct}, ...]}, and with
    `keep_replies` also replies: every reply's text and right: whether each was graded right, in prompt order.
    `max_new_tokens` defaults to the longest expected answer + ANSWER_SLACK tokens."""
    task = get_task(task)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    items = examples(task, split, n, seed)
    prompts = [tokenizer.render_chat(e.prompt_messages(), add_generation_prompt=True)[0] for e in items]
    if max_new_tokens is None:
        max_new_tokens = max(map(len, tokenizer.encode_batch([e.answer for e in items]))) + ANSWER_SLACK
    start = time.perf_counter()
    replies = greedy_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             progress=progress, desc=task.spec())  # fmt: skip
    seconds = time.perf_counter() - start
    right = [r.ended and task.grade(e, r.text) for e, r in zip(items, replies, strict=True)]
    formed = [r.ended and task.well_formed(r.text) for r in replies]
    correct = sum(right)
    accuracy, lo, hi = exact_match_interval(correct, n)
    generated = sum(r.tokens for r in replies)
    # A few replies to look at: wrong ones first (they say more), then right ones.
    order = [i for i in range(n) if not right[i]][:3] + [i for i in range(n) if right[i]][:2]
    shown = [{"prompt": items[i].prompt, "expected": items[i].answer, "got": replies[i].text, "correct": right[i]}
             for i in order]  # fmt: skip
    result = {
        "task": task.spec(),
        "split": split,
        "n": n,
        "seed": seed,
        "correct": correct,
        "accuracy": accuracy,
        "ci95": [lo, hi],
        "well_formed_rate": sum(formed) / n,
        "ended_rate": sum(r.ended for r in replies) / n,
        "max_new_tokens": max_new_tokens,
        "generated_tokens": generated,
        "seconds": seconds,
        "tokens_per_s": generated / seconds if seconds > 0 else 0.0,
        "examples": shown,
    }
    if keep_replies:
        result |= {"replies": [r.text for r in replies], "right": right}
    return result


def format_result(result: dict) -> str:
    """One line: `add:digits=3  exact match 41.3% [38.3, 44.4] (n=1000, held-out, greedy)`."""
    lo, hi = result["ci95"]
    split = "held-out" if result["split"] == "heldout" else result["split"]
    return (f"{result['task']}  exact match {100 * result['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
            f"(n={result['n']}, {split}, greedy)")  # fmt: skip
