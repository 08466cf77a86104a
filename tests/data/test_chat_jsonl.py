"""User chat data in JSONL: good lines load, every bad one is a one-line error naming its line."""

from __future__ import annotations

import json

import pytest

from lmforge.data.chat_jsonl import load_jsonl_messages, load_jsonl_preferences


def write(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) for line in lines))
    return path


def test_load_jsonl_messages(tmp_path):
    chat = {"messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4", "weight": 1}]}  # fmt: skip
    path = write(tmp_path / "ok.jsonl", [json.dumps(chat) + "\n", "\n", json.dumps(chat) + "\n"])
    got = load_jsonl_messages(path)
    assert len(got) == 2 and got[0][2] == {"role": "assistant", "content": "4"}
    bad_role = {"messages": [{"role": "bot", "content": "x"}]}
    cases = [
        ([json.dumps(chat) + "\n", json.dumps(bad_role) + "\n"], r":2: .*role 'bot'"),
        ([json.dumps({"messages": [{"role": "user"}]}) + "\n"], r":1: .*\"content\""),
        ([json.dumps({"chat": []}) + "\n"], r':1: expected "messages"'),
        ([json.dumps(chat) + "\n", "\n", '{"messages": [\n'], r":3: not valid JSON"),
        ([json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"], r":1: no assistant"),
        ([json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n"], r":1: .*must be a string"),
    ]
    for lines, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as e:
            load_jsonl_messages(write(tmp_path / "bad.jsonl", lines))
        assert "\n" not in str(e.value)


def test_load_jsonl_preferences(tmp_path):
    pair = {"prompt": "2+2?", "chosen": "4", "rejected": "5", "extra": 1}
    assert (
        load_jsonl_preferences(write(tmp_path / "ok.jsonl", [json.dumps(pair) + "\n"] * 3))
        == [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}] * 3
    )
    cases = [
        ([json.dumps(pair) + "\n", json.dumps({"prompt": "a", "chosen": "b"}) + "\n"], r':2: missing "rejected"'),
        ([json.dumps({**pair, "chosen": ["4"]}) + "\n"], r':1: "chosen" must be a string'),
        (["not json\n"], r":1: not valid JSON"),
        (["[1, 2]\n"], r":1: expected a JSON object"),
    ]
    for lines, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            load_jsonl_preferences(write(tmp_path / "bad.jsonl", lines))
    with pytest.raises(FileNotFoundError):
        load_jsonl_preferences(tmp_path / "missing.jsonl")


def test_load_jsonl_preferences_reads_prefs_collect_records(tmp_path):
    labelled = {"prompt": "2+2?", "label": "b", "chosen": "4", "rejected": "5", "rater": "program"}
    tie = {"prompt": "3+3?", "label": "tie", "chosen": None, "rejected": None}
    path = write(tmp_path / "prefs.jsonl", [json.dumps(labelled) + "\n", json.dumps(tie) + "\n"])
    assert load_jsonl_preferences(path) == [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
