"""Preference collection: a human rater driven by scripted stdin (sides, undo, quit, resume), the record format
and training pairs, Cohen's κ against a hand computation, and `lmforge prefs` end to end on a tiny run.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/align/test_preferences.py -q
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from lmforge.align.agreement import agreement, cohens_kappa, format_agreement
from lmforge.align.preferences import (
    PairRecord,
    PairSampler,
    PrefsConfig,
    append_record,
    collect,
    load_prompts,
    pair_seeds,
    pop_last_record,
    read_records,
    shown_left,
    to_training_pairs,
)
from lmforge.cli import main
from lmforge.config import load_config


class FakeSampler:
    """Completions named after their seed; with `answers`, even seeds (sample a) answer right, odd ones wrong."""

    def __init__(self, answers: bool = False):
        self.answers, self.calls = answers, []

    def sample(self, requests):
        self.calls.append([seed for _, seed, _ in requests])
        texts = []
        for messages, seed, _ in requests:
            if self.answers:
                x, y = map(int, re.findall(r"\d+", messages[-1]["content"]))
                texts.append(str(x + y + seed % 2))
            else:
                texts.append(f"sample {seed}")
        return texts


def config(tmp_path, *extra):
    return load_config(PrefsConfig, None, [f"out={tmp_path / 'prefs.jsonl'}", "prompts=task:add:digits=2",
                                           "n_prompts=4", "batch_size=2", *extra])  # fmt: skip


def session(cfg, keys, sampler=None):
    out = io.StringIO()
    summary = collect(cfg, sampler=sampler or FakeSampler(), stdin=io.StringIO(keys), stdout=out)
    return summary, out.getvalue()


def other(side):
    return "b" if side == "a" else "a"


# ------------------------------------------------------------------------------------------------- human


def test_human_session_with_invalid_key_undo_quit_and_resume(tmp_path):
    cfg = config(tmp_path, "rater=human-lines")
    sides = [shown_left(0, i) for i in range(4)]
    assert set(sides) == {"a", "b"}  # the coin lands both ways on these four pairs: both mappings are tested

    # Prompt 0: left. Prompt 1: a bad key, then right. Undo: prompt 1 is shown again and tied. Prompt 2: both
    # bad. Prompt 3: quit.
    summary, text = session(cfg, "a\nzz\nb\nu\nt\nx\nq\n")
    records = read_records(cfg.out)
    assert [(r.prompt_index, r.label) for r in records] == [(0, sides[0]), (1, "tie"), (2, "both_bad")]
    assert "unknown key 'zz'" in text and "undid prompt 1" in text and "run again to resume" in text
    assert text.count("prompt 1: What is") == 2  # shown again after the undo
    assert summary["labels_now"] == {sides[0]: 1, "tie": 1, "both_bad": 1}
    r0 = records[0]
    assert (r0.seed_a, r0.seed_b) == pair_seeds(0, 0) == (0, 1) and r0.shown_left == sides[0]
    assert r0.chosen == f"sample {r0.seed_a if sides[0] == 'a' else r0.seed_b}" and r0.rater == "human-lines"
    assert all(r.chosen is None and r.rejected is None for r in records[1:])

    # A second run resumes at prompt 3; undo reaches back to prompt 2 of the first run, rated now "right".
    sampler = FakeSampler()
    summary, text = session(cfg, "u\n2\n", sampler)
    assert text.startswith(f"{cfg.out}: 3 of 4 prompts rated")
    assert sampler.calls == [[6, 7]]  # only prompt 3 was sampled
    assert summary["labels_now"] == {other(sides[2]): 1}  # the undone both_bad is taken back
    records = read_records(cfg.out)
    assert [(r.prompt_index, r.label) for r in records] == [(0, sides[0]), (1, "tie"), (2, other(sides[2]))]
    assert text.index("prompt 3:") < text.index("undid prompt 2") < text.index("prompt 2:")

    # A third run: only prompt 3 is left; skip it. A fourth run has nothing to do.
    session(cfg, "s\n")
    assert [r.label for r in read_records(cfg.out)][-1] == "skip"
    sampler = FakeSampler()
    summary, text = session(cfg, "", sampler)
    assert sampler.calls == [] and summary["records"] == 4 and summary["rated_now"] == 0
    pairs = to_training_pairs(read_records(cfg.out))
    assert len(pairs) == 2 and pairs[0]["prompt"] == records[0].prompt


def test_undo_with_nothing_to_undo_shows_the_pair_again(tmp_path):
    cfg = config(tmp_path, "rater=human-lines", "n_prompts=1")
    _, text = session(cfg, "u\nt\n")
    assert "nothing to undo" in text and [r.label for r in read_records(cfg.out)] == ["tie"]


def test_resume_false_refuses_an_existing_file_and_other_prompts_are_refused(tmp_path):
    cfg = config(tmp_path, "rater=human-lines")
    session(cfg, "t\nq\n")
    with pytest.raises(FileExistsError, match="resume=true"):
        session(config(tmp_path, "rater=human-lines", "resume=false"), "")
    with pytest.raises(Exception, match="resume with the same prompts"):
        session(config(tmp_path, "rater=human-lines", "prompt_seed=5"), "")


# ----------------------------------------------------------------------------------------------- program


def test_program_rater_through_collect_labels_the_right_sample(tmp_path):
    cfg = config(tmp_path, "rater=program:add:digits=2")
    summary, _ = session(cfg, "", FakeSampler(answers=True))
    records = read_records(cfg.out)
    assert [r.label for r in records] == ["a"] * 4 and summary["training_pairs"] == 4
    assert all(r.rater == "program:add:digits=2" and r.rater_detail["correct_a"] for r in records)
    assert all(r.chosen == r.completion_a != r.rejected for r in records)
    with pytest.raises(Exception, match="grades sub"):
        session(config(tmp_path, "rater=program:sub", f"out={tmp_path / 'x.jsonl'}"), "", FakeSampler(True))


# ------------------------------------------------------------------------------------------------ records


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[2] / "configs" / "prefs").glob("*.yaml")),
                         ids=lambda p: p.name)  # fmt: skip
def test_recipes_load(recipe):
    assert load_config(PrefsConfig, recipe).n_prompts > 0


def test_records_round_trip_pop_and_a_torn_last_line(tmp_path):
    cfg = config(tmp_path, "rater=human-lines", "n_prompts=2")
    session(cfg, "a\nb\n")
    path = tmp_path / "prefs.jsonl"
    records = read_records(path)
    lines = path.read_text().splitlines()
    assert [PairRecord.from_dict(json.loads(line)) for line in lines] == records
    assert list(json.loads(lines[0])) == ["prompt_index", "prompt", "completion_a", "completion_b", "seed_a",
                                          "seed_b", "temperature_a", "temperature_b", "shown_left", "label",
                                          "chosen", "rejected", "rater", "rater_detail", "seconds", "timestamp",
                                          "messages", "policy"]  # fmt: skip
    assert to_training_pairs([json.loads(line) for line in lines]) == to_training_pairs(records)
    last = pop_last_record(path)
    assert last == records[1] and read_records(path) == records[:1]
    with path.open("a") as f:
        f.write('{"prompt_index": 1, "prom')  # a crash mid-write
    assert read_records(path) == records[:1]
    session(cfg, "t\n")  # resuming drops the torn line before appending
    assert [r.label for r in read_records(path)] == [records[0].label, "tie"]
    append_record(path, records[0])
    assert len(path.read_text().splitlines()) == 3


def test_prompts_from_a_task_or_a_jsonl(tmp_path):
    items = load_prompts("task:add:digits=2", 3, seed=1)
    assert len(items) == 3 and items[0].answer is not None and items[0].messages[0]["role"] == "user"
    path = tmp_path / "prompts.jsonl"
    chat = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi?"}]
    path.write_text(json.dumps({"prompt": "One?", "answer": 1}) + "\n\n" + json.dumps({"messages": chat}) + "\n")
    items = load_prompts(str(path), 10)
    assert [i.text for i in items] == ["One?", "Hi?"] and items[0].answer == "1" and items[1].messages == chat
    path.write_text(json.dumps({"messages": chat[:1]}) + "\n")
    with pytest.raises(Exception, match="ending with a user turn"):
        load_prompts(str(path), 1)


# ---------------------------------------------------------------------------------------------- agreement


def test_kappa_matches_the_hand_computed_two_by_two_table():
    # 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no: p_o = 35/50 = 0.7; p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; κ = 0.4.
    one = ["a"] * 20 + ["a"] * 5 + ["b"] * 10 + ["b"] * 15
    two = ["a"] * 20 + ["b"] * 5 + ["a"] * 10 + ["b"] * 15
    assert cohens_kappa(one, two) == pytest.approx(0.4)
    assert cohens_kappa(one + ["skip", None], two + ["a", "a"]) == pytest.approx(0.4)  # unlabelled items drop out
    assert cohens_kappa(["a", "b", "tie"], ["a", "b", "tie"]) == pytest.approx(1.0)
    assert cohens_kappa(["a", "a"], ["a", "a"]) != cohens_kappa(["a", "a"], ["a", "a"])  # NaN: p_e = 1


def test_agreement_pairs_files_by_prompt_and_seeds(tmp_path, capsys):
    one = config(tmp_path, "rater=human-lines", f"out={tmp_path / 'one.jsonl'}")
    two = config(tmp_path, "rater=human-lines", f"out={tmp_path / 'two.jsonl'}")
    session(one, "a\na\nb\ns\n")
    session(two, "a\nb\nb\nt\n")
    (result,) = agreement([one.out, two.out])
    assert (result.overlap, result.labelled, result.agreed) == (4, 3, 2)
    assert main(["prefs", "agreement", one.out, two.out]) == 0
    line = capsys.readouterr().out.strip()
    assert line == format_agreement([result]) and "agreement 0.667 (2/3)" in line and "4 pairs in both" in line


# --------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def tiny_run(base_run, tmp_path):
    """The shared tiny char-level base run of tests/align/conftest.py (enough for the mechanics of sampling),
    with a fresh folder for this test's files."""
    return tmp_path, base_run[1]


def test_samples_are_reproducible_from_their_seeds(tiny_run):
    from lmforge.infer.generate import generate_stream
    from lmforge.infer.sampling import SamplingParams

    _, run_dir = tiny_run
    sampler = PairSampler.from_run(run_dir, max_new_tokens=6)
    chat = [{"role": "user", "content": "What is 3 + 4?"}]
    first = sampler.sample([(chat, 5, 1.0), (chat, 6, 1.0), (chat, 7, 0.0)])
    again = sampler.sample([(chat, 5, 1.0), (chat, 6, 1.0), (chat, 7, 0.0)])
    assert first == again and all(isinstance(t, str) for t in first)
    # The engine's batched draws are the batch-1 path's draws: a seed alone gives the sample, in any batch.
    ids = sampler.tokenizer.render_chat(chat, add_generation_prompt=True)[0]
    for text, seed, temperature in zip(first, (5, 6, 7), (1.0, 1.0, 0.0)):
        params = SamplingParams(max_new_tokens=6, temperature=temperature, seed=seed, stop_ids=sampler.stop_ids)
        alone = generate_stream(sampler.model, ids, params, vocab_size=sampler.tokenizer.vocab_size)
        assert sampler.tokenizer.decode(list(alone), skip_special=True) == text
    assert len(set(first[:2])) == 2 and first[0]  # two seeds, two different non-empty samples


def test_cli_collect_with_the_program_rater_and_a_bad_rater(tiny_run, capsys):
    root, run_dir = tiny_run
    out = root / "program.jsonl"
    argv = ["prefs", "collect", f"policy={run_dir}", "prompts=task:add:digits=1", "n_prompts=3", f"out={out}",
            "rater=program:add:digits=1", "max_new_tokens=4", "temperature_b=0.5"]  # fmt: skip
    assert main(argv) == 0
    records = read_records(out)
    assert [r.prompt_index for r in records] == [0, 1, 2] and all(r.rater == "program:add:digits=1" for r in records)
    assert all(r.label in ("a", "b", "tie") and r.temperature_b == 0.5 for r in records)
    assert all(r.policy == str(run_dir) and r.rater_detail["answer"] for r in records)
    sampler = PairSampler.from_run(run_dir, max_new_tokens=4)
    chat = records[1].messages
    assert sampler.sample([(chat, records[1].seed_a, 1.0), (chat, records[1].seed_b, 0.5)]) == [
        records[1].completion_a, records[1].completion_b]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0  # everything rated: resumes with nothing to do
    assert "3 of 3 prompts rated" in capsys.readouterr().out and len(read_records(out)) == 3
    assert main([*argv[:-3], "rater=robot"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: override rater=robot: rater 'robot' is not one of")
    assert main(["prefs", "collect", f"policy={root / 'nope'}", f"out={root / 'x.jsonl'}", "rater=program"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_human_rater_reads_keys_from_stdin(tiny_run, monkeypatch, capsys):
    root, run_dir = tiny_run
    out = root / "human.jsonl"
    argv = ["prefs", "collect", f"policy={run_dir}", "prompts=task:add:digits=1", "n_prompts=3", f"out={out}",
            "rater=human-lines", "max_new_tokens=4", "batch_size=2"]  # fmt: skip
    monkeypatch.setattr("sys.stdin", io.StringIO("a\nu\nb\nq\n"))  # as `printf 'a\nu\nb\nq\n' | lmforge ...`
    assert main(argv) == 0
    (record,) = read_records(out)
    assert record.prompt_index == 0 and record.label == other(record.shown_left) and record.rater == "human-lines"
    assert "undid prompt 0" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("t\n"))  # resumes at prompt 1; EOF after it quits
    assert main(argv) == 0
    assert [(r.prompt_index, r.label) for r in read_records(out)] == [(0, record.label), (1, "tie")]
