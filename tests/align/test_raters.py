"""Raters of preference pairs: the human's keys and sides, the program's grades and ties, the AI judge asked in
both orders through a stub OpenAI-compatible server on 127.0.0.1 (and through a tiny lmforge checkpoint).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/align/test_raters.py -q
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmforge.align.raters import (
    DEFAULT_PRINCIPLES,
    Action,
    CheckpointJudge,
    HTTPJudge,
    HumanRater,
    JudgeRater,
    Pair,
    ProgramRater,
    Rating,
    judge_messages,
    load_principles,
    make_rater,
    parse_rater_spec,
    parse_verdict,
    side_by_side,
)
from lmforge.config import ConfigError


def make_pair(a="left text", b="right text", shown_left="a", answer=None, task=None, prompt="Say something."):
    return Pair(0, prompt, [{"role": "user", "content": prompt}], a, b, 10, 11, 1.0, 0.7, shown_left, answer, task)


def human(keys: str, **kwargs):
    out = io.StringIO()
    return HumanRater(io.StringIO(keys), out, **kwargs), out


# ------------------------------------------------------------------------------------------------- human


@pytest.mark.parametrize("shown_left", ["a", "b"])
def test_human_keys_map_screen_sides_back_to_samples(shown_left):
    other = "b" if shown_left == "a" else "a"
    expected = {"a": shown_left, "1": shown_left, "b": other, "2": other, "t": "tie", "x": "both_bad", "s": "skip"}
    for key, label in expected.items():
        rater, _ = human(f"{key}\n", lines=True)
        rating = rater.rate(make_pair(shown_left=shown_left))
        assert isinstance(rating, Rating) and rating.label == label, key
        assert rating.seconds >= 0 and rating.detail == {"key": key}


def test_human_asks_again_after_an_invalid_key_and_knows_undo_quit_and_eof():
    rater, out = human("maybe\n\nB\n", lines=True)
    assert rater.rate(make_pair(shown_left="b")).label == "a"  # uppercase accepted; right side shows sample a
    assert out.getvalue().count("unknown key") == 2
    assert human("u\n")[0].rate(make_pair()) is Action.UNDO
    assert human("q\n")[0].rate(make_pair()) is Action.QUIT
    assert human("")[0].rate(make_pair()) is Action.QUIT  # EOF: the script is over


def test_line_mode_prints_the_left_sample_as_a_one_line_each():
    rater, out = human("t\n", lines=True)
    rater.rate(make_pair(a="first\nline", b="other", shown_left="b"), (3, 10))
    text = out.getvalue()
    assert "[3/10] prompt 0: Say something." in text
    assert "A: other\n" in text and "B: first\\nline\n" in text


def test_side_by_side_shows_two_wrapped_columns():
    rater, out = human("a\n", width=41)
    long = "word " * 20
    rater.rate(make_pair(a=long, b="short answer", shown_left="a"))
    rows = [r for r in out.getvalue().splitlines() if "│" in r]
    assert rows[0].startswith("A") and rows[0].endswith("│ B")
    assert all(len(r) <= 41 for r in rows)
    assert "short answer" in rows[1] and rows[1].index("│") == 20  # 19 columns, a space, the bar
    assert sum("word" in r.split("│")[0] for r in rows) >= 5  # the long answer wrapped over several rows
    assert "(empty)" in side_by_side("", "x", 40)


# ----------------------------------------------------------------------------------------------- program


@pytest.mark.parametrize(
    "a, b, label",
    [("42", " 41", "a"), ("41", "42\n", "b"), ("42", " 42 ", "tie"), ("1", "2", "tie")],
)
def test_program_rater_picks_the_correct_sample_and_ties_otherwise(a, b, label):
    pair = make_pair(a=a, b=b, answer="42", task="add:digits=2", prompt="What is 20 + 22?")
    rating = ProgramRater("add:digits=2").rate(pair)
    assert rating.label == label
    assert rating.detail["correct_a"] == (a.strip() == "42") and rating.detail["correct_b"] == (b.strip() == "42")
    assert ProgramRater().rate(pair).label == label  # bare "program": the prompt's own task grades


def test_program_rater_needs_an_answer():
    with pytest.raises(ConfigError, match="expected answer"):
        ProgramRater("add").rate(make_pair())


# ------------------------------------------------------------------------------------------------- judge


def test_parse_verdict_is_strict_about_the_first_line():
    for reply in ["A", " B", "**A**", "(B) is better", "A.\nbecause", '"B"']:
        assert parse_verdict(reply) in ("A", "B"), reply
    for reply in ["", "I prefer A", "Answer: B", "a", "AB", "\nnone\nA", "Both"]:
        assert parse_verdict(reply) is None, reply


class _JudgeHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((self.path, body))
        reply = self.server.answer(body["messages"][-1]["content"])
        data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep the test output clean
        pass


@contextlib.contextmanager
def stub_judge(answer):
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 (a free port) replying `answer(user message)`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeHandler)
    server.answer, server.seen = answer, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def prefers_good(content: str) -> str:
    """A fair judge: the answer that says "good" wins, whichever side it is on."""
    first = re.search(r"\[Answer A\]\n(.*?)\n\[End of answer A\]", content, re.S).group(1)
    return "A, it is good" if "good" in first else "B"


@pytest.fixture(autouse=True)
def no_proxy_no_key(monkeypatch):
    for name in ("OPENAI_API_KEY", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("good", ["a", "b"])
def test_http_judge_asked_in_both_orders_labels_when_they_agree(good):
    a, b = ("a good answer", "a bad one") if good == "a" else ("a bad one", "a good answer")
    with stub_judge(prefers_good) as (server, url):
        rater = make_rater(f"judge:{url}", stdin=io.StringIO(), stdout=io.StringIO(), judge_model="stub-7b")
        rating = rater.rate(make_pair(a=a, b=b))
    assert rating.label == good and rating.detail["verdict"] == "agree"
    assert rating.detail["votes"] == [good, good] and len(rating.detail["replies"]) == 2
    assert [path for path, _ in server.seen] == ["/v1/chat/completions"] * 2
    bodies = [body for _, body in server.seen]
    assert all(b["model"] == "stub-7b" and b["temperature"] == 0 and b["max_tokens"] == 8 for b in bodies)
    users = [body["messages"][-1]["content"] for body in bodies]
    assert users[0].index(a) < users[0].index(b) and users[1].index(b) < users[1].index(a)  # both orders
    assert all(p in bodies[0]["messages"][0]["content"] for p in DEFAULT_PRINCIPLES)
    assert rater.name == f"judge:{url}#stub-7b"


def test_position_biased_or_garbage_judges_give_no_label():
    with stub_judge(lambda content: "A") as (_, url):
        rating = JudgeRater(HTTPJudge(url, "m"), ["Be right."]).rate(make_pair())
    assert rating.label is None and rating.detail["verdict"] == "inconsistent"
    assert rating.detail["votes"] == ["a", "b"]
    with stub_judge(lambda content: "Both answers have merit.") as (_, url):
        rating = JudgeRater(HTTPJudge(url, "m"), ["Be right."]).rate(make_pair())
    assert rating.label is None and rating.detail["verdict"] == "unparseable"
    assert rating.detail["replies"] == ["Both answers have merit."] * 2


def test_unreachable_judge_is_a_config_error():
    with stub_judge(prefers_good) as (_, url):
        pass  # the server is closed again: nothing listens on its port now
    with pytest.raises(ConfigError, match="judge"):
        HTTPJudge(url, "m", timeout=5)([{"role": "user", "content": "hi"}])


def test_judge_prompt_holds_principles_conversation_and_both_answers():
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    system, user = judge_messages(["Be kind.", "Be brief."], chat, "ONE", "TWO")
    assert system["content"].endswith("1. Be kind.\n2. Be brief.")
    assert "user: hi\nassistant: yo\nuser: ?" in user["content"]
    assert "[Answer A]\nONE\n" in user["content"] and "[Answer B]\nTWO\n" in user["content"]


def test_checkpoint_judge_runs_a_tiny_model_greedily():
    import torch

    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train_char(["AB ab"])
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=1024, n_layer=1, d_model=16, n_head=2))
    judge = CheckpointJudge(model, tok, max_new_tokens=3)
    messages = judge_messages(["Be right."], [{"role": "user", "content": "2+2?"}], "4", "5")
    reply = judge(messages)
    assert isinstance(reply, str) and reply == judge(messages)  # greedy: the same reply every time
    rating = JudgeRater(judge, ["Be right."]).rate(make_pair())
    assert rating.label in ("a", "b", None) and len(rating.detail["replies"]) == 2


# ---------------------------------------------------------------------------------------------- specs


def test_rater_specs_and_principles(tmp_path):
    assert parse_rater_spec("human") == ("human", "")
    assert parse_rater_spec("program") == ("program", "")
    assert parse_rater_spec("program:add:digits=2") == ("program", "add:digits=2")
    assert parse_rater_spec("judge:http://127.0.0.1:9/v1") == ("judge", "http://127.0.0.1:9/v1")
    for bad in ["robot", "judge:", "program:", "humans"]:
        with pytest.raises(ValueError, match="is not one of"):
            parse_rater_spec(bad)
    with pytest.raises(ValueError, match="unknown task"):
        parse_rater_spec("program:nope")
    path = tmp_path / "constitution.yaml"
    path.write_text("principles:\n  - Be honest.\n  - Be kind.\n")
    assert load_principles(str(path)) == ["Be honest.", "Be kind."]
    assert load_principles(["x"]) == ["x"]
    with pytest.raises(ConfigError, match="non-empty list"):
        load_principles([])
    with pytest.raises(FileNotFoundError):
        load_principles(str(tmp_path / "missing.yaml"))
