"""RLHF end to end on a task whose answers can be checked: 2-digit addition in chat form, a tiny char-level model,
2 CPU cores, demonstrations from a careless demonstrator and comparisons from an exact grader. Every method starts
from the same SFT run and is judged by the task's exact grader on ≥ 1,000 held-out prompts (greedy), with 95%
intervals and the mean KL to the SFT policy.

    python -m benchmarks.rlhf              # main run, ~15 minutes on 2 cores
    python -m benchmarks.rlhf --sweep      # + PPO and DPO at three β each, for the reward-vs-KL plot
    python -m benchmarks.rlhf --quick      # a smoke run with tiny budgets (figures meaningless; no plots, no records)
    python -m benchmarks.rlhf --record     # append the headline figures to docs/benchmarks.md
    python -m benchmarks.rlhf --reuse      # keep base, sft, sft+, prefs and rm from the last run: RL stages only

Stages (run folders in runs/rlhf-bench/; runs/rlhf-bench-quick/ with --quick):
  base       a 2-layer char model (d 64, 4 heads) pretrained briefly on the stdlib (it only needs the alphabet)
  demos      6,000 add:digits=2 demonstrations written by a careless demonstrator: when the ones column carries,
             it forgets the carry 60% of the time (a classic slip). RLHF's premise is that judging an answer is
             easier than writing a perfect one (Ouyang et al. 2022): here the judge (the grader) is exact and the
             demonstrator is not, so imitation plateaus below what comparisons can teach
  sft        SFT on those demonstrations for a fixed budget; "sft+" continues it on the same demonstrations for as
             many steps as PPO takes — the baseline RL must beat (more SFT is what the RL compute could have bought)
  prefs      two samples per train prompt from the SFT policy, rated by the program grader (ties dropped)
  rm         Bradley–Terry reward model from the SFT run; pairwise accuracy on pairs from held-out prompts where
             both answers are well-formed, against a length baseline and an SFT-log-prob baseline
  ppo        PPO with the learned reward model and a per-token KL penalty
  dpo        DPO on the same pairs
  grpo       GRPO with the program's reward (8 samples a prompt)
  best-of-n  8 samples a prompt, the reward model picks (no training)
Plots (docs/img/), written with --sweep only (so a run without it never replaces them with fewer curves): the
reward model's score against true accuracy during PPO at β 0.2 and 0.05 (reward hacking shows as a gap), and
accuracy against KL for PPO and DPO across β.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import time
from pathlib import Path

import torch

from benchmarks.harness import environment, format_environment
from benchmarks.rlhf_report import report
from lmforge.config import load_config

ROOT = Path("runs/rlhf-bench")
RUNS = {"sft+": "sft-continued"}  # result names whose run folders are named otherwise
TASK = "add:digits=3"  # main(); --quick sets it from budgets()
DATA = "data/python-stdlib-char"


def budgets(quick: bool) -> dict:
    if quick:
        return dict(task="add:digits=2", base=20, sft=600, demos=500, forget=0.6, rl=8, prompts=300, prefs_rounds=1,
                    rm=20, eval_n=100, grpo_prompts=4)  # fmt: skip
    # 2-digit addition from a careless demonstrator. (Figures in this comment come from the model with 2 heads a
    # layer, before it had 4.) With correct demonstrations this model saturates 2 digits
    # (98.7% after 4,000 steps), and on 3 digits SFT on 50,000 correct demonstrations was still climbing past what
    # RL then added (78% → 83% in 120 more steps); 2,000 correct 3-digit demonstrations plateau near 72% but leave
    # a policy that samples the same answer twice for 9 prompts in 10, so comparisons have little to say; and
    # careless 3-digit demonstrations kept SFT at 2% for 5,000 steps.
    # 2 digits have 10,000 problems, 1/8 held out: 6,000 demonstrations and 7,000 prompts fit the train split.
    # RL gets 600 steps: at 120, GRPO with the true reward was +3 points (at 600: +10), and SFT on these
    # demonstrations is flat either way (64.6% after 120 more steps, 63.8% after 600). With 4 heads more SFT lowers
    # it (69.9% → 63.4% in 600 steps: the imitation follows the demonstrator's usual slip more faithfully).
    return dict(task="add:digits=2", base=300, sft=4000, demos=6000, forget=0.6, rl=600, prompts=7000, prefs_rounds=2,
                rm=3000, eval_n=1000, grpo_prompts=8)  # fmt: skip


def operands(prompt: str) -> tuple[int, int]:
    a, b = (int(x) for x in re.findall(r"[0-9]+", prompt))
    return a, b


def carries(prompt: str) -> bool:
    """Whether the ones column of the prompt's sum carries: where the demonstrator slips."""
    a, b = operands(prompt)
    return a % 10 + b % 10 >= 10


def careless_sum(a: int, b: int, forget: float, rng: random.Random) -> int:
    """a + b by a demonstrator who, when the ones column carries, forgets that carry with probability `forget`."""
    ones = a % 10 + b % 10
    return a + b - 10 if ones >= 10 and rng.random() < forget else a + b


def careless_demonstrations(path: Path, n: int, forget: float, seed: int = 0) -> dict:
    """`n` train-split prompts of TASK answered by `careless_sum`, as SFT chat JSONL; returns how many are wrong."""
    from lmforge.data.tasks import examples, get_task

    rng = random.Random(seed)
    wrong = 0
    lines = []
    for e in examples(get_task(TASK), "train", n, seed=seed):
        a, b = operands(e.prompt)
        answer = str(careless_sum(a, b, forget, rng))
        wrong += answer != e.answer
        lines.append(json.dumps({"messages": [*e.prompt_messages(), {"role": "assistant", "content": answer}]}))
    path.write_text("\n".join(lines) + "\n")
    return {"n": n, "wrong": wrong}


def stage(name: str):
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def common(name: str, steps: int) -> list[str]:
    return [f"runs_dir={ROOT}", f"name={name}", f"train.steps={steps}", "train.progress=false", "train.precision=fp32"]


def accuracy(run_or_model, tok, n: int, texts: list[str] | None = None) -> dict:
    """Held-out greedy exact match of a run (or the given replies) with a Wilson 95% interval, and how many of
    the prompts whose ones column carries (and of the others) it gets right."""
    from lmforge.data.tasks import exact_match_interval, examples, get_task
    from lmforge.infer.loading import load_for_inference
    from lmforge.train.task_eval import evaluate_tasks

    task = get_task(TASK)
    held = examples(task, "heldout", n, seed=0)
    if texts is not None:
        right = [task.grade(e, t) for e, t in zip(held, texts, strict=True)]
    else:
        model = run_or_model if not isinstance(run_or_model, (str, Path)) else load_for_inference(run_or_model)[0]
        right = evaluate_tasks(model, tok, task, n=n, seed=0, progress=False, keep_replies=True)["right"]
    rate, lo, hi = exact_match_interval(sum(right), n)
    carry = [carries(e.prompt) for e in held]
    return {"accuracy": rate, "ci95": [lo, hi], "n": n,
            "carry": [sum(r for r, c in zip(right, carry) if c), sum(carry)],
            "no_carry": [sum(r for r, c in zip(right, carry) if not c), n - sum(carry)]}  # fmt: skip


@torch.no_grad()
def kl_to(policy, reference, tok, n: int = 200, max_new_tokens: int = 6) -> float:
    """Mean over held-out prompts of Σ_t log π/π_ref on responses sampled from π at T = 1 (k1, per sequence)."""
    from lmforge.align.losses import token_logprobs
    from lmforge.align.rollout import rollout
    from lmforge.data.tasks import examples, get_task

    held = examples(get_task(TASK), "heldout", n)
    out = rollout(
        policy,
        tok,
        [e.prompt_messages() for e in held],
        n=1,
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        seed=12345,
    )
    mask = out.mask[:, 1:].float()
    return ((token_logprobs(policy, out.rows) - token_logprobs(reference, out.rows)) * mask).sum(1).mean().item()


@torch.no_grad()
def reward_model_on_samples(rm, policy, tok, n: int, k: int = 4) -> float:
    """The reward model's pairwise accuracy on a policy's own samples: k samples at T = 1 for each of n held-out
    prompts, every (right, wrong) pair among a prompt's samples, how often the right one scores higher. Lower on an
    RL policy's samples than on SFT's: the policy has moved to where the reward model is weaker (overoptimisation,
    Gao et al. 2022)."""
    from lmforge.align.reward import score
    from lmforge.align.rollout import rollout
    from lmforge.data.tasks import examples, get_task

    task = get_task(TASK)
    held = examples(task, "heldout", n, seed=0)
    out = rollout(policy, tok, [e.prompt_messages() for e in held], n=k, temperature=1.0, max_new_tokens=6, seed=7)
    scores = score(rm, tok, [held[i].prompt for i in out.prompt_index], out.texts).view(n, k)
    right = torch.tensor([task.grade(held[i], t) for i, t in zip(out.prompt_index, out.texts)]).view(n, k)
    pairs = right[:, :, None] & ~right[:, None, :]  # [prompt, a, b]: sample a right, sample b wrong
    return int((pairs & (scores[:, :, None] > scores[:, None, :])).sum()) / max(int(pairs.sum()), 1)


def reward_model_figures(rm_run: Path, sft_run: Path, pairs: list[dict]) -> dict:
    """Pairwise accuracy of the reward model and of two baselines on held-out pairs with well-formed answers."""
    from lmforge.align.losses import sequence_logprob
    from lmforge.align.pairs import collate
    from lmforge.align.reward import load_reward_model, split_by_prompt
    from lmforge.data.tasks import get_task
    from lmforge.infer.loading import load_for_inference

    task = get_task(TASK)
    train, val = split_by_prompt(pairs, 0.1, 0)  # the reward model's own held-out prompts
    val = [p for p in val if task.well_formed(p["chosen"]) and task.well_formed(p["rejected"])]
    # the length baseline takes whichever rule (longer or shorter wins) is right more often on the training pairs;
    # equal lengths (most pairs: "1234" vs "1243") are a coin flip, worth ½
    longer_wins = sum(len(p["chosen"]) > len(p["rejected"]) for p in train) >= sum(
        len(p["chosen"]) < len(p["rejected"]) for p in train
    )

    def length_vote(p: dict) -> float:
        a, r = len(p["chosen"]), len(p["rejected"])
        return 0.5 if a == r else float((a > r) == longer_wins)

    rm, tok = load_reward_model(rm_run)
    sft, _ = load_for_inference(sft_run)
    rm_ok = logp_ok = 0
    length_ok = 0.0
    for i in range(0, len(val), 64):
        b = collate(tok, val[i : i + 64], 64)
        with torch.no_grad():
            rm_ok += int((rm(b.chosen, b.chosen_last) > rm(b.rejected, b.rejected_last)).sum())
            logp_ok += int(
                (
                    sequence_logprob(sft, b.chosen, b.chosen_mask) > sequence_logprob(sft, b.rejected, b.rejected_mask)
                ).sum()
            )
        length_ok += sum(length_vote(p) for p in val[i : i + 64])
    n = max(len(val), 1)
    return {"pairs": len(val), "rm": rm_ok / n, "length": length_ok / n, "sft_logprob": logp_ok / n}


def prepare(b: dict) -> tuple[dict, dict, list[dict], dict]:
    """base → sft → sft+ → prefs → rm: everything the RL stages start from. Returns the SFT figures, the reward
    model's figures, the preference pairs and the seconds each stage took."""
    from lmforge.align import reward, sft
    from lmforge.align.preferences import PrefsConfig, collect, read_records, to_training_pairs
    from lmforge.infer.loading import load_for_inference
    from lmforge.train.pretrain import PretrainConfig
    from lmforge.train.pretrain import run as pretrain

    shutil.rmtree(ROOT, ignore_errors=True)
    seconds: dict[str, float] = {}

    t = stage("base: a 2-layer char model, briefly pretrained")
    pretrain(
        load_config(
            PretrainConfig,
            None,
            [
                f"data={DATA}",
                *common("base", b["base"]),
                "model.n_layer=2",
                "model.d_model=64",
                # 4 heads (the same weights and time as 2): a sum's leading digits read all four digits of the
                # prompt. With 2 heads every RL method stopped near 74%, even PPO with the grader's exact reward
                # (74% by step 120, 74.4% at step 1,200): the policy could not learn when the ones column carries
                "model.n_head=4",
                "model.max_seq_len=128",
                "model.position=rope",
                "model.ffn=swiglu",
                "model.norm=rmsnorm",
                "model.bias=false",
                "train.batch_size=16",
                "train.lr=3e-3",
                "eval.batches=2",
            ],
        )
    )
    seconds["base"] = time.perf_counter() - t

    t = stage(
        f"demos: {b['demos']:,} careless demonstrations (a ones-column carry forgotten {b['forget']:.0%} of the time)"
    )
    demos = careless_demonstrations(ROOT / "demos.jsonl", b["demos"], b["forget"])
    print(f"{demos['wrong']:,} of {demos['n']:,} demonstrations are wrong")
    seconds["demos"] = time.perf_counter() - t

    t = stage(f"sft: {TASK}, {b['demos']:,} demonstrations, {b['sft']} steps")
    sft_args = [
        f"base={ROOT / 'base'}",
        f"data={ROOT / 'demos.jsonl'}",
        "seq_len=128",
        "train.lr=3e-3",
        "train.min_lr=3e-4",
        "train.batch_size=16",
        f"train.eval_every={b['sft']}",
    ]
    sft.run(load_config(sft.SFTConfig, None, [*sft_args, *common("sft", b["sft"])]))
    seconds["sft"] = time.perf_counter() - t
    policy, tok = load_for_inference(ROOT / "sft")
    results = {"sft": accuracy(policy, tok, b["eval_n"])}
    print(f"SFT held-out accuracy {results['sft']['accuracy']:.1%}")

    t = stage(f"sft+: SFT continued on the same demonstrations for {b['rl']} more steps (the baseline)")
    cont = [
        f"base={ROOT / 'sft'}",
        f"data={ROOT / 'demos.jsonl'}",
        "seq_len=128",
        "train.lr=3e-4",
        "train.min_lr=3e-4",
        "train.warmup_steps=0",
        "train.batch_size=16",
        f"train.eval_every={b['rl']}",
    ]
    sft.run(load_config(sft.SFTConfig, None, [*cont, *common("sft-continued", b["rl"])]))
    results["sft+"] = accuracy(ROOT / "sft-continued", tok, b["eval_n"])
    seconds["sft+"] = time.perf_counter() - t

    t = stage(f"prefs: {b['prefs_rounds']} × {b['prompts']} train prompts × 2 samples, rated by the grader")
    prefs_path = ROOT / "prefs.jsonl"
    rounds = []
    for r in range(b["prefs_rounds"]):  # the task has few prompts: each round samples them anew (other seeds)
        out = ROOT / f"prefs-round{r}.jsonl"
        collect(
            PrefsConfig(
                policy=str(ROOT / "sft"),
                prompts=f"task:{TASK}",
                n_prompts=b["prompts"],
                out=str(out),
                rater=f"program:{TASK}",
                max_new_tokens=6,
                temperature_a=1.0,
                temperature_b=1.0,
                seed=r * 1_000_000,
            )
        )
        rounds.append(out.read_text())
    prefs_path.write_text("".join(rounds))
    pairs = to_training_pairs(read_records(prefs_path))
    seconds["prefs"] = time.perf_counter() - t
    print(f"{len(pairs)} non-tie pairs")

    t = stage("rm: Bradley–Terry reward model")
    rm_args = [
        f"base={ROOT / 'sft'}",
        f"data={prefs_path}",
        "train.batch_size=32",
        "train.lr=1e-3",
        "train.min_lr=1e-4",
        f"train.eval_every={b['rm']}",
        "max_len=64",
    ]
    reward.run(load_config(reward.RewardConfig, None, [*rm_args, *common("rm", b["rm"])]))
    rm_fig = reward_model_figures(ROOT / "rm", ROOT / "sft", pairs)
    seconds["rm"] = time.perf_counter() - t
    return results, rm_fig, pairs, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run")
    parser.add_argument("--sweep", action="store_true", help="also PPO and DPO at β ∈ {0.05, 0.5, 1}")
    parser.add_argument("--record", action="store_true", help="append the headline figures to docs/benchmarks.md")
    parser.add_argument("--reuse", action="store_true",
                        help="keep base, sft, sft+, prefs and rm of the last run with these budgets")  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    b = budgets(args.quick)
    global TASK, ROOT
    TASK = b["task"]
    if args.quick:  # a smoke run never replaces the main run's folders
        ROOT = ROOT.with_name(ROOT.name + "-quick")
    from lmforge.align import dpo, grpo, ppo
    from lmforge.align.preferences import read_records, to_training_pairs
    from lmforge.infer.loading import load_for_inference

    print(format_environment(environment()))
    if not Path(DATA, "meta.json").is_file():
        raise SystemExit(f"prepare the corpus first: lmforge prepare --config configs/data/stdlib-char.yaml ({DATA})")
    prep = ROOT / "prepared.json"
    if args.reuse and prep.is_file() and json.loads(prep.read_text())["budgets"] == b:
        saved = json.loads(prep.read_text())
        results, rm_fig, seconds = saved["results"], saved["reward_model"], saved["seconds"]
        pairs = to_training_pairs(read_records(ROOT / "prefs.jsonl"))
        print(f"reusing base, sft, sft+, prefs and rm in {ROOT}")
    else:
        if args.reuse:
            print(f"nothing to reuse in {ROOT} for these budgets: preparing from scratch")
        results, rm_fig, pairs, seconds = prepare(b)
        prep.write_text(json.dumps({"budgets": b, "results": results, "reward_model": rm_fig, "seconds": seconds}))
    prefs_path = ROOT / "prefs.jsonl"
    sft_model, tok = load_for_inference(ROOT / "sft")  # never trained here: the KL reference and best-of-n's sampler

    def run_ppo(beta: float, name: str) -> None:
        ppo_args = [
            f"base={ROOT / 'sft'}",
            f"reward_model={ROOT / 'rm'}",
            f"task={TASK}",
            f"beta={beta}",
            # one on-policy step per rollout of 64 prompts, as GRPO's 8 × 8 samples: with 2 epochs of minibatches of
            # 16, 600 steps saw a sixth of the samples and PPO gained half as much
            "prompts_per_rollout=64",
            "minibatch=64",
            "ppo_epochs=1",
            "max_new_tokens=6",
            "train.lr=1e-4",
            "train.min_lr=1e-5",
            f"train.eval_every={max(b['rl'] // 5, 1)}",
            f"eval_n={min(b['eval_n'], 300)}",
        ]
        shutil.rmtree(ROOT / name, ignore_errors=True)  # a --reuse run trains the RL stages again
        ppo.run(load_config(ppo.PPOConfig, None, [*ppo_args, *common(name, b["rl"])]))
        pol = load_for_inference(ROOT / name)[0]
        results[name] = {**accuracy(pol, tok, b["eval_n"]), "kl": kl_to(pol, sft_model, tok), "beta": beta}

    def run_dpo(beta: float, name: str, rpo_alpha: float = 1.0) -> None:
        dpo_args = [
            f"base={ROOT / 'sft'}",
            f"data={prefs_path}",
            f"beta={beta}",
            f"rpo_alpha={rpo_alpha}",
            "train.batch_size=32",
            "train.lr=1e-5",
            "train.min_lr=1e-6",
            f"train.eval_every={b['rl']}",
            "max_len=64",
        ]
        shutil.rmtree(ROOT / name, ignore_errors=True)
        dpo.run(load_config(dpo.DPOConfig, None, [*dpo_args, *common(name, b["rl"])]))
        pol = load_for_inference(ROOT / name)[0]
        results[name] = {**accuracy(pol, tok, b["eval_n"]), "kl": kl_to(pol, sft_model, tok), "beta": beta}

    # β 0.2 on the normalised reward: at 0.05 the policy drifted to KL ~2 nats and lost 40 points (reward hacking)
    t = stage(f"ppo: {b['rl']} steps, β = 0.2")
    run_ppo(0.2, "ppo")
    seconds["ppo"] = time.perf_counter() - t
    # DPO with the NLL term on chosen answers (Pang et al. 2024), and plain DPO beside it: plain DPO lowers the
    # chosen answers' likelihood along with the rejected ones' and fell to 12% here
    t = stage(f"dpo: {b['rl']} steps, β = 0.1, NLL term α = 1; then plain DPO")
    run_dpo(0.1, "dpo")
    run_dpo(0.1, "dpo-plain", rpo_alpha=0.0)
    seconds["dpo"] = time.perf_counter() - t

    t = stage(f"grpo: {b['rl']} steps, 8 samples a prompt")
    grpo_args = [
        f"base={ROOT / 'sft'}",
        f"task={TASK}",
        "n=8",
        f"prompts_per_step={b['grpo_prompts']}",
        "max_new_tokens=6",
        "train.lr=1e-4",
        "train.min_lr=1e-5",
        f"train.eval_every={b['rl']}",
        f"eval_n={min(b['eval_n'], 300)}",
    ]
    shutil.rmtree(ROOT / "grpo", ignore_errors=True)
    grpo.run(load_config(grpo.GRPOConfig, None, [*grpo_args, *common("grpo", b["rl"])]))
    pol = load_for_inference(ROOT / "grpo")[0]
    results["grpo"] = {**accuracy(pol, tok, b["eval_n"]), "kl": kl_to(pol, sft_model, tok)}
    seconds["grpo"] = time.perf_counter() - t

    t = stage("best-of-8 with the reward model")
    from lmforge.align.reward import best_of_n, load_reward_model
    from lmforge.data.tasks import examples, get_task

    rm_model, _ = load_reward_model(ROOT / "rm")
    held = examples(get_task(TASK), "heldout", b["eval_n"])
    picks = best_of_n(sft_model, tok, rm_model, [e.prompt for e in held], n=8, max_new_tokens=6)
    results["best-of-8"] = accuracy(None, tok, b["eval_n"], texts=picks)
    seconds["best-of-8"] = time.perf_counter() - t

    def rm_on_own_samples() -> None:
        """The reward model's pairwise accuracy on the samples of every trained policy not measured yet."""
        for name, r in results.items():
            if name != "best-of-8" and "rm_own" not in r:
                policy = load_for_inference(ROOT / RUNS.get(name, name))[0]
                r["rm_own"] = reward_model_on_samples(rm_model, policy, tok, b["eval_n"])

    t = stage("the reward model on each policy's own samples")
    rm_on_own_samples()
    seconds["rm on samples"] = time.perf_counter() - t

    if args.sweep:
        for beta in (0.05, 0.5, 1.0):
            t = stage(f"sweep β = {beta}")
            run_ppo(beta, f"ppo-beta{beta}")
            run_dpo(beta, f"dpo-beta{beta}")
            rm_on_own_samples()
            seconds[f"sweep {beta}"] = time.perf_counter() - t

    report(results, rm_fig, seconds, len(pairs), task=TASK, root=ROOT, sweep=args.sweep and not args.quick,
           record_figures=args.record and not args.quick)  # fmt: skip


if __name__ == "__main__":
    main()
