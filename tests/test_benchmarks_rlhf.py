"""The RLHF benchmark's careless demonstrator: the slip it makes, by hand, and demonstrations SFT can read."""

import random

from benchmarks import rlhf
from lmforge.data.chat_jsonl import load_jsonl_messages


def test_the_careless_demonstrator_forgets_only_a_ones_column_carry():
    rng = random.Random(0)
    assert rlhf.careless_sum(17, 25, forget=1.0, rng=rng) == 32  # 7 + 5 carries: the 1 is dropped
    assert rlhf.careless_sum(17, 25, forget=0.0, rng=rng) == 42
    assert rlhf.careless_sum(12, 93, forget=1.0, rng=rng) == 105  # only the tens column carries: kept
    wrong = sum(rlhf.careless_sum(19, 1, 0.6, rng) != 20 for _ in range(2000))
    assert 1100 < wrong < 1300  # ~60%


def test_careless_demonstrations_are_sft_chat_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(rlhf, "TASK", "add:digits=2")
    path = tmp_path / "demos.jsonl"
    stats = rlhf.careless_demonstrations(path, 400, forget=1.0)
    chats = load_jsonl_messages(path)
    assert len(chats) == 400 and [m["role"] for m in chats[0]] == ["user", "assistant"]
    wrong = 0
    for chat in chats:
        a, b = (int(x) for x in chat[0]["content"].removeprefix("What is ").removesuffix("?").split(" + "))
        expected = a + b - 10 if a % 10 + b % 10 >= 10 else a + b
        assert chat[1]["content"] == str(expected)
        wrong += expected != a + b
    assert stats == {"n": 400, "wrong": wrong} and 100 < wrong < 300  # ~45% of pairs carry out of the ones


def test_accuracy_splits_replies_by_whether_the_ones_column_carries(monkeypatch):
    from lmforge.data.tasks import examples, get_task

    monkeypatch.setattr(rlhf, "TASK", "add:digits=2")
    held = examples(get_task("add:digits=2"), "heldout", 60, seed=0)
    assert rlhf.carries("What is 17 + 25?") and not rlhf.carries("What is 12 + 93?")
    # right on every carrying sum, wrong on every other: the split says so, and the total adds up
    texts = [str(sum(rlhf.operands(e.prompt)) + (0 if rlhf.carries(e.prompt) else 1)) for e in held]
    r = rlhf.accuracy(None, None, 60, texts=texts)
    n_carry = sum(rlhf.carries(e.prompt) for e in held)
    assert r["carry"] == [n_carry, n_carry] and r["no_carry"] == [0, 60 - n_carry] and 0 < n_carry < 60
    assert r["accuracy"] == n_carry / 60


def test_reward_model_on_samples_counts_right_over_wrong_pairs_as_a_brute_force_loop(monkeypatch):
    """Rollout and scores stubbed: the fraction equals a loop over every (right, wrong) pair of a prompt's samples."""
    from types import SimpleNamespace

    import torch

    import lmforge.align.reward as reward
    import lmforge.align.rollout as rollout
    from lmforge.data.tasks import examples, get_task

    monkeypatch.setattr(rlhf, "TASK", "add:digits=2")
    n, k = 30, 4
    held = examples(get_task("add:digits=2"), "heldout", n, seed=0)
    rng = random.Random(3)
    texts = [str(sum(rlhf.operands(e.prompt)) + rng.choice([0, 0, 1, 10])) for e in held for _ in range(k)]
    values = [rng.random() for _ in texts]
    monkeypatch.setattr(rollout, "rollout", lambda *a, **kw: SimpleNamespace(
        prompt_index=[i for i in range(n) for _ in range(k)], texts=texts))  # fmt: skip
    monkeypatch.setattr(reward, "score", lambda rm, tok, prompts, responses: torch.tensor(values))
    ok = pairs = 0
    for i, e in enumerate(held):
        for a in range(k):
            for b in range(k):
                ra = texts[i * k + a] == e.answer
                rb = texts[i * k + b] == e.answer
                if ra and not rb:
                    pairs += 1
                    ok += values[i * k + a] > values[i * k + b]
    assert pairs > 20 and rlhf.reward_model_on_samples(None, None, None, n, k) == ok / pairs
