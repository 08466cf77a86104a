"""Sampling processors against brute-force recomputation; counter-based seeds; stop strings across tokens."""

import math

import pytest
import torch

from lmforge.infer.sampling import (
    SamplingParams,
    TextStream,
    draw,
    processed_logits,
    processed_probs,
    token_logprobs,
)
from lmforge.tokenizer import Tokenizer


def brute_force_keep(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """The tokens a row keeps, computed one filter at a time in plain Python."""
    t = 1.0 if p.greedy else p.temperature
    probs = (logits / t).softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = set(order[: p.top_k] if p.top_k else order)
    mass, nucleus = 0.0, set()
    for i in order:
        if mass >= p.top_p:
            break
        nucleus.add(i)
        mass += probs[i]
    keep &= nucleus
    keep &= {i for i in order if probs[i] >= p.min_p * probs[order[0]]}
    return keep | {order[0]}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=5),
        SamplingParams(top_p=0.7, temperature=0.5),
        SamplingParams(min_p=0.2, temperature=2.0),
        SamplingParams(top_k=10, top_p=0.9, min_p=0.05),
        SamplingParams(top_p=0.01),  # the most likely token always survives
    ],
)
def test_filters_keep_exactly_the_brute_force_set(params):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    out = processed_logits(logits, [params] * 3)
    for row in range(3):
        kept = {i for i in range(50) if math.isfinite(out[row, i])}
        assert kept == brute_force_keep(logits[row], params)


def test_each_row_uses_its_own_parameters():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    rows = [SamplingParams(top_k=3), SamplingParams(temperature=0), SamplingParams(top_p=0.5, temperature=0.7)]
    together = processed_probs(logits, rows)
    for i, p in enumerate(rows):
        assert torch.allclose(together[i], processed_probs(logits[i : i + 1], [p])[0])
    assert together[1].max() == 1 and int(together[1].argmax()) == int(logits[1].argmax())  # greedy: one-hot


def test_repetition_penalty_is_ctrl():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = processed_logits(logits, [SamplingParams(repetition_penalty=2.0)], histories=[[0, 1, 1]])
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_draws_are_a_function_of_seed_and_index_only():
    probs = torch.full((16,), 1 / 16)
    p = SamplingParams(seed=7)
    a = [draw(probs, p, i) for i in range(50)]
    assert a == [draw(probs, p, i) for i in range(50)]
    assert a != [draw(probs, SamplingParams(seed=8), i) for i in range(50)]
    assert a[10:] == [draw(probs, p, i) for i in range(10, 50)]  # resuming mid-way changes nothing
    assert len(set(a)) > 5


def test_sampled_frequencies_follow_the_processed_distribution():
    logits = torch.tensor([[1.0, 2.0, 0.5, 3.0, -1.0]])
    p = SamplingParams(top_k=3, temperature=0.8, seed=3)
    probs = processed_probs(logits, [p])[0]
    counts = torch.bincount(torch.tensor([draw(probs, p, i) for i in range(4000)]), minlength=5).float()
    assert counts[2] == 0 and counts[4] == 0
    assert torch.allclose(counts / 4000, probs, atol=0.03)


def test_logprobs_are_the_models_log_softmax_with_top_alternatives():
    logits = torch.randn(2, 30)
    out = token_logprobs(logits, [4, 9], k=3)
    ref = logits.log_softmax(-1)
    assert out[0].logprob == pytest.approx(float(ref[0, 4]), abs=1e-6)
    assert [t for t, _ in out[1].top] == ref[1].topk(3).indices.tolist()


def test_bad_parameters_give_one_line_errors():
    for kwargs in ({"top_p": 0}, {"temperature": -1}, {"max_new_tokens": 0}, {"stop": ("",)}):
        with pytest.raises(ValueError) as e:
            SamplingParams(**kwargs)
        assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def char_tok():
    return Tokenizer.train_char(["abcdef xyz\nhello"])  # é and 世界 fall back to UTF-8 bytes


def stream_all(tok, text, stop):
    ts = TextStream(tok, stop)
    shown = [ts.feed(t) for t in tok.encode(text)]
    if not ts.stopped:
        shown.append(ts.flush())
    return "".join(shown), ts


def test_stop_string_across_tokens_cuts_the_text_and_never_shows_its_start(char_tok):
    ts = TextStream(char_tok, ("xyz",))
    shown = [ts.feed(t) for t in char_tok.encode("abc xyz def")]
    assert "".join(shown) == "abc " and ts.stopped
    assert all("x" not in s for s in shown)  # "x" was held back until it proved to start the stop string


def test_a_false_start_of_a_stop_string_is_released(char_tok):
    text, ts = stream_all(char_tok, "ab xy ab", ("xyz",))
    assert text == "ab xy ab" and not ts.stopped


def test_streaming_is_utf8_safe(char_tok):
    assert len(char_tok.encode("世")) == 3  # one character, three byte tokens
    ts = TextStream(char_tok, ())
    shown = [ts.feed(t) for t in char_tok.encode("hello é 世界")] + [ts.flush()]
    assert "".join(shown) == "hello é 世界" and not any("\ufffd" in s for s in shown)


def test_bad_parameters_are_user_errors_naming_the_field():
    from lmforge.config import UserError

    for field, kwargs in (("temperature", {"temperature": -1}), ("max_new_tokens", {"max_new_tokens": -1})):
        with pytest.raises(UserError, match=f"^{field} must be"):
            SamplingParams(**kwargs)
