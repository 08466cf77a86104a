"""Exact-match evaluation on verifiable tasks: the engine's greedy replies, the grading loop, `lmforge eval --tasks`."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.data.tasks import exact_match_interval, examples
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import END, Tokenizer
from lmforge.train import task_eval
from lmforge.train.task_eval import Reply, evaluate_tasks, format_result, greedy_replies


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation on a shared 2-core box
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_char(["What is 0123456789 + - * ? Reverse the word: abcdefghijklmnopqrstuvwxyz"])


def tiny_model(tok, **kw) -> Transformer:
    torch.manual_seed(0)
    fields = dict(vocab_size=tok.vocab_size, max_seq_len=64, n_layer=2, d_model=32, n_head=4, position="rope",
                  ffn="swiglu", norm="rmsnorm")  # fmt: skip
    fields.update(kw)
    return Transformer(ModelConfig(**fields)).eval()


def test_a_tiny_random_model_is_evaluated(tok):
    result = evaluate_tasks(tiny_model(tok), tok, "add:digits=2", n=12, batch_size=5, progress=False)
    assert result["task"] == "add:digits=2" and result["split"] == "heldout" and result["n"] == 12
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["well_formed_rate"] <= 1
    rate, lo, hi = exact_match_interval(result["correct"], 12)
    assert result["accuracy"] == rate and result["ci95"] == [lo, hi]
    # no reply runs past its budget; a few replies are kept to look at
    assert result["generated_tokens"] <= 12 * result["max_new_tokens"] and 0 < len(result["examples"]) <= 5
    assert re.fullmatch(r"add:digits=2  exact match \d+\.\d% \[\d+\.\d, \d+\.\d\] \(n=12, held-out, greedy\)",
                        format_result(result))  # fmt: skip
    json.dumps(result)  # plain data
    assert "replies" not in result  # kept only when asked for


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_engine_replies_equal_one_prompt_at_a_time_generation(tok, position):
    from lmforge.infer.generate import generate_stream

    model = tiny_model(tok, position=position, max_seq_len=40)
    prompts = [tok.render_chat(e.prompt_messages(), add_generation_prompt=True)[0]
               for e in examples("reverse", "heldout", 7)]  # fmt: skip
    stops = (tok.token_to_id(END), tok.eos_id)
    replies = greedy_replies(model, tok, prompts, max_new_tokens=20, batch_size=3)
    for ids, reply in zip(prompts, replies, strict=True):
        budget = min(20, 40 - len(ids))  # learned positions and unscaled RoPE alike: the trained length
        out = list(generate_stream(model, ids, max_new_tokens=budget, temperature=0, stop_ids=stops,
                                   vocab_size=tok.vocab_size))  # fmt: skip
        ended = out[-1] in stops
        assert reply == Reply(tok.decode(out[:-1] if ended else out), ended, len(out))


class SaysEnd(nn.Module):
    """An LM head whose argmax is always <|end|>: every reply is empty and ended."""

    def __init__(self, head: nn.Module, end: int):
        super().__init__()
        self.head, self.end = head, end

    def forward(self, h):
        logits = self.head(h).clone()
        logits[..., self.end] += 1e4
        return logits


def test_a_reply_stops_at_end_and_an_empty_reply_is_wrong_and_ill_formed(tok):
    model = tiny_model(tok)
    model.lm_head = SaysEnd(model.lm_head, tok.token_to_id(END))
    result = evaluate_tasks(model, tok, "sort", n=6, progress=False)
    assert result["ended_rate"] == 1 and result["generated_tokens"] == 6
    assert result["correct"] == 0 and result["well_formed_rate"] == 0
    assert result["examples"][0]["got"] == ""


def test_grading_loop_counts_exactly_the_right_replies(tok, monkeypatch):
    """Generation replaced by a stub that answers every other prompt right: accuracy is exactly 0.5. A right
    answer that never ended (cut off by the token limit) counts as wrong."""
    n = 40
    answers = {e.prompt: e.answer for e in examples("add:digits=3", "heldout", n, seed=3)}
    seen = []

    def fake(model, tokenizer, prompts, *, max_new_tokens, batch_size, progress, desc):
        replies = []
        for i, ids in enumerate(prompts):
            prompt = tokenizer.decode(ids).removeprefix("<|bos|><|user|>").removesuffix("<|end|><|assistant|>")
            seen.append(prompt)
            answer = answers[prompt]
            if i == 1:  # right text, but the model never said <|end|>
                replies.append(Reply(answer, False, max_new_tokens))
            elif i % 2 == 0:
                replies.append(Reply(f" {answer}\n", True, 3))
            else:
                replies.append(Reply(str(int(answer) + 1), True, 3))
        return replies

    monkeypatch.setattr(task_eval, "greedy_replies", fake)
    result = evaluate_tasks(None, tok, "add:digits=3", n=n, seed=3, progress=False)
    assert seen == list(answers) and result["correct"] == n // 2 and result["accuracy"] == 0.5
    assert result["ci95"] == list(exact_match_interval(n // 2, n)[1:])
    assert result["well_formed_rate"] == (n - 1) / n and result["ended_rate"] == (n - 1) / n
    assert [e["correct"] for e in result["examples"]] == [False, False, False, True, True]
    seen.clear()
    kept = evaluate_tasks(None, tok, "add:digits=3", n=n, seed=3, progress=False, keep_replies=True)
    assert kept["right"] == [i % 2 == 0 for i in range(n)]  # prompt order; the unended right answer is wrong
    assert kept["replies"][0] == f" {answers[seen[0]]}\n" and kept["replies"][1] == answers[seen[1]]


# ---- the CLI ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("taskeval")
    corpus = root / "corpus"
    for pkg in ("alpha", "beta"):
        (corpus / pkg).mkdir(parents=True)
        for i in range(2):
            (corpus / pkg / f"m{i}.py").write_text(
                "".join(f"# What is {i} + {j}? Reverse the word: {pkg}\nx = {i} + {j}\n\n" for j in range(40))
            )
    from lmforge.data.prepare import PrepareConfig
    from lmforge.data.prepare import run as prepare
    from lmforge.train.pretrain import PretrainConfig
    from lmforge.train.pretrain import run as pretrain

    data = prepare(load_config(PrepareConfig, None, [f"source=text:{corpus}", f"out={root / 'data'}",
                                                      "vocab_size=300", "val_fraction=0.25"]))  # fmt: skip
    overrides = [f"data={data}", f"runs_dir={root / 'runs'}", "name=t", "model.n_layer=1", "model.d_model=32",
                 "model.n_head=2", "model.max_seq_len=64", "model.position=rope", "model.ffn=swiglu",
                 "model.norm=rmsnorm", "model.bias=false", "train.steps=2", "train.batch_size=2",
                 "train.precision=fp32", "train.eval_every=2", "train.progress=false", "eval.batches=1",
                 "eval.batch_size=2"]  # fmt: skip
    return pretrain(load_config(PretrainConfig, None, overrides)).path


def test_eval_tasks_json(run, capsys):
    assert main(["eval", str(run), "--tasks", "add:digits=2", "--n", "20", "--batch", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = out["tasks"]["add:digits=2"]
    assert result["n"] == 20 and result["split"] == "heldout" and 0 <= result["accuracy"] <= 1
    assert len(result["ci95"]) == 2


def test_eval_tasks_prints_one_line_per_task(run, capsys):
    assert main(["eval", str(run), "--tasks", "add:digits=2,count:letters=3", "--n", "6", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"add:digits=2  exact match \d+\.\d% \[\d+\.\d, \d+\.\d\] \(n=6, held-out, greedy\)", lines[0])
    assert lines[1].startswith("count:min_len=5,max_len=12,letters=3  exact match ")


@pytest.mark.parametrize(
    "extra, words",
    [(["--tasks", "add,divide"], ["unknown task 'divide'", "add, sub"]),
     (["--tasks", "add:digits=1", "--n", "50"], ["cannot draw 50"]),
     (["--tasks", "add", "--batches", "3"], ["--batches"]),
     (["--tasks", "add", "--n", "0"], ["--n"])],
)  # fmt: skip
def test_eval_tasks_user_errors_are_one_line(run, capsys, extra, words):
    assert main(["eval", str(run), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error:") and "\n" not in err and all(w in err for w in words), err
