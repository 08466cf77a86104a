"""Constitutional AI mechanics with a scripted critic and judge (tiny models critique poorly; the docs say so):
the critique → revision loop, SFT on the revisions, and AI-feedback pairs labelled by one drawn principle."""

from __future__ import annotations

import json
import random

import pytest

from lmforge.align.constitutional import (
    CAIConfig,
    Principle,
    PrincipleJudge,
    critique_and_revise,
    feedback,
    load_constitution,
    supervised,
)
from lmforge.config import ConfigError, load_config


class ScriptedCritic:
    """Critiques name the principle it was asked about; revisions upper-case the response."""

    def __init__(self):
        self.calls = []

    def __call__(self, messages):
        self.calls.append(messages)
        request = messages[-1]["content"]
        if request.startswith("Rewrite"):
            answer = next(m["content"] for m in messages if m["role"] == "assistant")
            return answer.upper() + " (revised)"
        return f"critique for: {request[:20]}"


class FixedSampler:
    def sample(self, requests):
        return [f"answer {seed % 7} for {messages[-1]['content'][:12]}" for messages, seed, _ in requests]


def test_constitution_file_and_plain_strings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("principles:\n  - Be kind.\n  - name: brief\n    critique: Too long?\n    revision: Shorten.\n")
    principles = load_constitution(path)
    assert [p.name for p in principles] == ["p0", "brief"]
    assert "Be kind." in principles[0].critique and principles[1].comparison == "Shorten."
    assert len(load_constitution("configs/cai/constitution.yaml")) == 4
    path.write_text("principles: []\n")
    with pytest.raises(ConfigError, match="non-empty"):
        load_constitution(path)


def test_critique_then_revision_rounds_chain_the_latest_response():
    critic = ScriptedCritic()
    principles = [Principle.from_text("kind", "Be kind."), Principle.from_text("brief", "Be brief.")]
    prompt = [{"role": "user", "content": "Say hi"}]
    out = critique_and_revise(prompt, "hi there", critic, principles, rounds=2, rng=random.Random(0))
    assert out["initial"] == "hi there" and len(out["steps"]) == 2 and len(critic.calls) == 4
    # round 2 critiques round 1's revision, and its revision is the final answer
    assert out["steps"][0]["revision"] == "HI THERE (revised)"
    assert critic.calls[2][-2]["content"] == "HI THERE (revised)"
    assert out["messages"] == [*prompt, {"role": "assistant", "content": "HI THERE (REVISED) (revised)"}]
    # the critique request of the drawn principle is what the critic saw
    assert critic.calls[0][-1]["content"] in {p.critique for p in principles}


def test_supervised_stage_writes_revisions_resumably_and_fine_tunes_on_them(base_run, tmp_path):
    _, base, _, _ = base_run
    cfg = load_config(CAIConfig, None, [f"policy={base}", "prompts=task:reverse", "n_prompts=6",
                                        f"out_dir={tmp_path / 'cai'}", "sft.train.steps=2", "sft.train.batch_size=2",
                                        "sft.train.progress=false", "sft.train.precision=fp32", "sft.n_val=0",
                                        "sft.packing=false", "sft.seq_len=64"])  # fmt: skip
    run_dir = supervised(cfg, critic=ScriptedCritic(), sampler=FixedSampler())
    lines = (tmp_path / "cai" / "revisions.jsonl").read_text().splitlines()
    assert len(lines) == 6
    first = json.loads(lines[0])
    assert first["messages"][-1]["content"].endswith("(revised)") and first["steps"][0]["principle"]
    assert run_dir.read_metrics()[-1]["step"] == 2
    critic = ScriptedCritic()
    cfg.sft.train.steps = 0
    assert supervised(cfg, critic=critic, sampler=FixedSampler()) is None
    assert critic.calls == []  # resumed: every prompt already revised


def test_feedback_labels_by_one_drawn_principle_in_both_orders(base_run, tmp_path):
    _, base, _, _ = base_run

    def judge(messages):  # prefers the answer that mentions "1", wherever it is shown
        text = messages[-1]["content"]
        a = text.split("[Answer A]")[1].split("[End of answer A]")[0]
        return "A" if "answer 1" in a or "answer 3" in a else "B"

    class Pairs:
        def sample(self, requests):
            return [f"answer {seed % 4}" for _, seed, _ in requests]

    cfg = load_config(CAIConfig, None, [f"policy={base}", "prompts=task:reverse", "n_prompts=5",
                                        f"out_dir={tmp_path / 'cai'}"])  # fmt: skip
    feedback(cfg, judge=judge, sampler=Pairs())
    records = [json.loads(line) for line in (tmp_path / "cai" / "feedback.jsonl").read_text().splitlines()]
    assert len(records) == 5
    for r in records:
        assert r["rater_detail"]["principle"] in {"helpful", "honest", "harmless", "concise"}
        assert len(r["rater_detail"]["replies"]) == 2  # asked in both orders
        assert r["label"] in ("a", "b") and r["chosen"] in ("answer 1", "answer 3")  # consistent in both orders


def test_principle_judge_draws_the_same_principle_for_the_same_pair():
    principles = [Principle.from_text(n, n) for n in ("x", "y", "z")]
    seen = []

    def reply(messages):
        seen.append(messages[0]["content"].splitlines()[-1])
        return "A"

    from lmforge.align.raters import Pair

    pair = Pair(prompt_index=3, prompt="p", messages=[{"role": "user", "content": "p"}], completion_a="1",
                completion_b="2", seed_a=0, seed_b=1, temperature_a=1.0, temperature_b=1.0, shown_left="a")  # fmt: skip
    first = PrincipleJudge(reply, principles).rate(pair).detail["principle"]
    assert all(PrincipleJudge(reply, principles).rate(pair).detail["principle"] == first for _ in range(3))
    assert len(set(seen)) == 1  # one principle shown, the same each time
