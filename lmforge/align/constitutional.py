"""Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback"), both stages.

Supervised stage: sample a response from the policy, ask a critic model to critique it against a principle
drawn at random from the constitution, ask it to revise the response, repeat, and fine-tune on the final
revisions. RL stage (AI feedback): two samples per prompt, a judge picks the better by one randomly drawn
principle (asked in both orders, as every lmforge judge), and the labelled pairs train a reward model for PPO
(`lmforge reward train`, `lmforge ppo`).

    lmforge cai supervised --config configs/cai/tiny.yaml critic=http://127.0.0.1:8000/v1 critic_model=NAME
    lmforge cai feedback --config configs/cai/tiny.yaml judge=runs/judge
    lmforge reward train data=runs/cai/feedback.jsonl ...  &&  lmforge ppo ...

The critic and judge are an lmforge checkpoint or any OpenAI-compatible endpoint. Tiny models critique poorly:
the mechanics are tested with scripted critics and judges, and only a capable critic makes the revisions
better.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import ConfigError

from .sft import SFTConfig

Reply = Callable[[list[dict]], str]  # a chat model: messages in, the assistant's reply out


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str  # the request that asks for a critique of the last response
    revision: str  # the request that asks for a rewrite answering the critique
    comparison: str  # what a judge compares two responses by

    @classmethod
    def from_text(cls, name: str, text: str) -> Principle:
        return cls(name, f"Identify specific ways in which the last response falls short of this principle: {text}",
                   f"Rewrite the response to follow this principle, fixing what the critique found: {text}",
                   text)  # fmt: skip


def load_constitution(path: str | Path) -> list[Principle]:
    """Principles from YAML: `principles:` a list of strings, or of {name, critique, revision, comparison}."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no constitution at {path}: see configs/cai/constitution.yaml for the format")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    items = data.get("principles") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: expected a non-empty list under principles:")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(Principle.from_text(f"p{i}", item))
        elif isinstance(item, dict) and {"critique", "revision"} <= set(item):
            text = item.get("comparison") or item["revision"]
            out.append(Principle(str(item.get("name", f"p{i}")), item["critique"], item["revision"], text))
        else:
            raise ConfigError(f"{path}: principle {i} needs critique and revision (or be a plain string)")
    return out


def critique_and_revise(prompt: list[dict], response: str, critic: Reply, principles: Sequence[Principle],
                        rounds: int, rng: random.Random) -> dict:  # fmt: skip
    """The critique → revision loop of the supervised stage (Bai et al. 2022, §3.1): each round draws a
    principle, asks for a critique of the current response, then for a revision, which becomes the response."""
    chat = [*prompt, {"role": "assistant", "content": response}]
    steps = []
    for _ in range(rounds):
        p = rng.choice(list(principles))
        critique = critic([*chat, {"role": "user", "content": p.critique}]).strip()
        revision = critic([*chat, {"role": "user", "content": p.critique}, {"role": "assistant", "content": critique},
                           {"role": "user", "content": p.revision}]).strip()  # fmt: skip
        steps.append({"principle": p.name, "critique": critique, "revision": revision})
        if revision:  # an empty revision keeps the previous response
            chat = [*prompt, {"role": "assistant", "content": revision}]
    return {"messages": chat, "initial": response, "steps": steps}


@dataclass
class CAIConfig:
    policy: str = "runs/sft"  # the model whose responses are critiqued (and, fine-tuned, the result)
    critic: str = "runs/critic"  # critic and reviser: a run folder or an OpenAI-compatible URL
    critic_model: str = "critic"  # the model name sent to a URL
    judge: str | None = None  # the RL stage's judge (default: the critic)
    constitution: str = "configs/cai/constitution.yaml"
    prompts: str = "task:reverse"  # task:SPEC, or a JSONL of {"prompt"} / {"messages"}
    n_prompts: int = 200
    rounds: int = 1  # critique → revision rounds per response
    max_new_tokens: int = 64  # per response, critique and revision
    out_dir: str = "runs/cai"  # revisions.jsonl, feedback.jsonl and the SFT run go here
    seed: int = 0
    sft: SFTConfig = field(default_factory=SFTConfig)  # its base and data are set from the fields above


def backend(spec: str, model_name: str, max_new_tokens: int) -> Reply:
    """A chat model from a run folder or an OpenAI-compatible URL."""
    from .raters import CheckpointJudge, HTTPJudge

    if spec.startswith(("http://", "https://")):
        return HTTPJudge(spec, model_name, max_tokens=max_new_tokens)
    return CheckpointJudge.from_run(spec, max_new_tokens=max_new_tokens)


def supervised(cfg: CAIConfig, *, critic: Reply | None = None, sampler=None):
    """Write `out_dir/revisions.jsonl` (resumable by line count), then SFT the policy on the final revisions.
    Returns the SFT run folder (None when `sft.train.steps` is 0)."""
    from .preferences import PairSampler, load_prompts
    from .sft import run as sft_run

    principles = load_constitution(cfg.constitution)
    items = load_prompts(cfg.prompts, cfg.n_prompts)
    critic = critic or backend(cfg.critic, cfg.critic_model, cfg.max_new_tokens)
    sampler = sampler or PairSampler.from_run(cfg.policy, max_new_tokens=cfg.max_new_tokens)
    out = Path(cfg.out_dir) / "revisions.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = out.read_text(encoding="utf-8").count("\n") if out.is_file() else 0
    responses = sampler.sample([(item.messages, cfg.seed * 100_003 + i, 1.0) for i, item in enumerate(items)])
    with out.open("a", encoding="utf-8") as f:
        for i in range(done, len(items)):
            record = critique_and_revise(items[i].messages, responses[i], critic, principles, cfg.rounds,
                                         random.Random(cfg.seed * 1_000_003 + i))  # fmt: skip
            f.write(json.dumps({"prompt_index": i, **record}) + "\n")
            f.flush()
    print(f"{out}: {len(items)} revised responses ({len(items) - done} new)")
    if cfg.sft.train.steps <= 0:
        return None
    cfg.sft.base, cfg.sft.data = cfg.policy, str(out)
    cfg.sft.runs_dir, cfg.sft.name = str(Path(cfg.out_dir)), cfg.sft.name or "sft"
    return sft_run(cfg.sft)


class PrincipleJudge:
    """The RL stage's labeller: for each pair one principle, drawn by the pair's prompt index, and a judge asked
    in both orders by that principle alone (Bai et al. 2022, §4.1)."""

    def __init__(self, reply: Reply, principles: Sequence[Principle], seed: int = 0, name: str = "cai-judge"):
        self.reply, self.principles, self.seed, self.name = reply, list(principles), seed, name

    def rate(self, pair, progress=None):
        from .raters import JudgeRater

        p = random.Random(self.seed * 1_000_003 + pair.prompt_index).choice(self.principles)
        rating = JudgeRater(self.reply, [p.comparison], name=self.name).rate(pair, progress)
        rating.detail["principle"] = p.name
        return rating


def feedback(cfg: CAIConfig, *, judge: Reply | None = None, sampler=None) -> dict:
    """AI-feedback pairs to `out_dir/feedback.jsonl` (the `lmforge prefs collect` format, resumable)."""
    from .preferences import PrefsConfig, collect

    principles = load_constitution(cfg.constitution)
    judge = judge or backend(cfg.judge or cfg.critic, cfg.critic_model, 8)
    out = Path(cfg.out_dir) / "feedback.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    prefs = PrefsConfig(policy=cfg.policy, prompts=cfg.prompts, n_prompts=cfg.n_prompts, out=str(out),
                        rater="judge:cai", max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)  # fmt: skip
    return collect(prefs, rater=PrincipleJudge(judge, principles, cfg.seed), sampler=sampler)
