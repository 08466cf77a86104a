"""`lmforge generate` at its boundary: a bad option is one line and exit 2, said before any model is loaded.
The loader is replaced by one that records its calls and hands out a tiny model with a char tokenizer."""

import pytest
import torch

from lmforge import cli
from lmforge.infer import loading
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/infer/conftest.py


def tiny_model(vocab_size: int, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab_size, max_seq_len=64, n_layer=1, d_model=16, n_head=2, init_std=0.2)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


@pytest.fixture
def loads(monkeypatch):
    """The paths `load_for_inference` was called with; each gets a tiny model and a char tokenizer."""
    calls = []
    tok = Tokenizer.train_char(["ab\ncd "])

    def fake_load(path):
        calls.append(str(path))
        return tiny_model(tok.vocab_size), tok

    monkeypatch.setattr(loading, "load_for_inference", fake_load)
    return calls


def run(argv, capsys):
    status = cli.main(["generate", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--draft", "runs/draft", "--gamma", "0"], "--gamma"),
        (["--kv", "sliding", "--window", "0"], "--window"),
        (["--temperature", "-1"], "--temperature"),
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--top-p", "2"], "--top-p"),
        (["--lookup", "0"], "--lookup"),
        (["--n", "0"], "--n"),
    ],
)
def test_bad_options_are_one_line_before_the_model_loads(argv, option, loads, tmp_path, capsys):
    status, out, err = run(["--ckpt", str(tmp_path / "no-such-run"), *argv], capsys)
    assert status == 2 and loads == [] and out == ""
    assert err.startswith(f"lmforge: error: {option} ") and err.count("\n") == 1, err


def test_good_options_generate(loads, capsys):
    status, out, err = run(["--ckpt", "runs/tiny", "--prompt", "ab", "--max-new-tokens", "5", "--temperature", "0"],
                           capsys)  # fmt: skip
    assert status == 0 and loads == ["runs/tiny"] and out.startswith("ab"), err


def test_the_sampling_pair_serves_another_command():
    import argparse

    from lmforge.infer.commands import add_sampling_arguments, sampling_params_from_args

    p = argparse.ArgumentParser()
    add_sampling_arguments(p, top_k=50)
    params = sampling_params_from_args(p.parse_args(["--temperature", "0.5", "--stop", "x"]))
    assert (params.top_k, params.temperature, params.stop, params.seed) == (50, 0.5, ("x",), 0)
    with pytest.raises(cli.UserError, match="^--repetition-penalty must be > 0"):
        sampling_params_from_args(p.parse_args(["--repetition-penalty", "0"]))


def test_a_draft_with_another_tokenizer_is_refused_before_generating(monkeypatch, capsys):
    # Same vocabulary size, other characters: the ids line up, their meanings do not.
    toks = {"runs/target": Tokenizer.train_char(["ab\ncd "]), "runs/draft": Tokenizer.train_char(["xy\nzw "])}
    assert toks["runs/target"].vocab_size == toks["runs/draft"].vocab_size
    monkeypatch.setattr(loading, "load_for_inference", lambda path: (tiny_model(toks[path].vocab_size), toks[path]))
    status, out, err = run(["--ckpt", "runs/target", "--draft", "runs/draft", "--temperature", "0"], capsys)
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("lmforge: error: --draft runs/draft must share the target's tokenizer")


def test_a_draft_with_the_same_tokenizer_speculates(loads, capsys):
    status, out, err = run(["--ckpt", "runs/target", "--draft", "runs/draft", "--prompt", "ab", "--temperature", "0",
                            "--max-new-tokens", "6", "--stats"], capsys)  # fmt: skip
    assert status == 0 and loads == ["runs/target", "runs/draft"] and "acceptance" in out, err


@pytest.fixture
def rope_loads(monkeypatch):
    tok = Tokenizer.train_char(["ab\ncd "])
    monkeypatch.setattr(loading, "load_for_inference", lambda path: (tiny_model(tok.vocab_size, position="rope"), tok))


def test_a_prompt_past_the_rope_context_is_one_line(rope_loads, capsys):
    status, out, err = run(["--ckpt", "runs/tiny", "--prompt", "ab" * 30, "--max-new-tokens", "5"], capsys)  # 65 > 64
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("lmforge: error: prompt (60 tokens) + max_new_tokens (5) = 65, past the model's context")
    status, out, err = run(["--ckpt", "runs/tiny", "--prompt", "ab" * 30, "--max-new-tokens", "4"], capsys)
    assert status == 0, err


def test_unescape_stop_reads_what_a_shell_passes():
    from lmforge.infer.commands import unescape_stop

    assert unescape_stop(r"\n\n") == "\n\n" and unescape_stop(r"a\tb\r\n") == "a\tb\r\n"
    assert unescape_stop(r"\\n") == "\\n" and unescape_stop(r"\d+") == r"\d+" and unescape_stop("plain") == "plain"


def test_a_stop_typed_as_backslash_n_stops_at_a_blank_line(loads, monkeypatch, capsys):
    from lmforge.infer import generate as generate_module

    tok = Tokenizer.train_char(["ab\ncd "])
    monkeypatch.setattr(generate_module, "generate_stream", lambda *a, **k: iter(tok.encode("ab\ncd\n\ncd cd")))
    stop = r"\n\n"  # the 4 characters a shell passes for --stop "\n\n"
    status, out, err = run(["--ckpt", "runs/tiny", "--prompt", "c", "--max-new-tokens", "20", "--stop", stop], capsys)
    assert status == 0 and out == "cab\ncd\n", (out, err)


@pytest.mark.parametrize("kv", [["--kv", "contiguous"], ["--kv", "paged"], ["--lookup", "2"], ["--kv", "sliding"]])
def test_an_empty_prompt_is_one_line_on_every_path(kv, loads, capsys):
    status, out, err = run(["--ckpt", "runs/tiny", "--prompt", "", "--max-new-tokens", "3", *kv], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith("lmforge: error: the prompt is empty: give at least one token"), err


@pytest.fixture
def linear_loads(monkeypatch):
    tok = Tokenizer.train_char(["ab\ncd "])
    model = tiny_model(tok.vocab_size, attention="linear")
    monkeypatch.setattr(loading, "load_for_inference", lambda path: (model, tok))


@pytest.mark.parametrize(
    "argv, says, fix",
    [
        (["--lookup", "2"], "the target uses linear attention, whose running state cannot roll back", "no --lookup"),
        (["--kv", "sliding"], "linear attention keeps a fixed-size state already", "--kv contiguous"),
        (["--kv", "paged"], "linear attention keeps a recurrent state, not keys and values", "--kv contiguous"),
        (["--n", "2"], "linear attention keeps a recurrent state, not keys and values", "--kv contiguous"),
    ],
)
def test_what_a_linear_attention_model_cannot_do_is_one_line(argv, says, fix, linear_loads, capsys):
    status, out, err = run(["--ckpt", "runs/linear", "--prompt", "ab", "--max-new-tokens", "3", *argv], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(f"lmforge: error: {says}") and fix in err, err
    status, out, err = run(["--ckpt", "runs/linear", "--prompt", "ab", "--max-new-tokens", "3"], capsys)
    assert status == 0, err  # the contiguous cache, without speculation, serves it
