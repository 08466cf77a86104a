"""The context check: exactly at the limit is fine, one past is refused, scaled RoPE is allowed to its scaled
length, and every generating path (batch-1, engine admission, speculative) makes the same check."""

import pytest
import torch

from lmforge.config import UserError
from lmforge.infer.context import ContextLengthError, check_context, context_limit
from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.sliding import SlidingKVCache
from lmforge.infer.speculative import speculative_generate
from lmforge.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/infer/conftest.py


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=32, max_seq_len=64, n_layer=1, d_model=16, n_head=2), **kw})


@pytest.mark.parametrize(
    "overrides, limit",
    [
        (dict(position="learned"), 64),
        (dict(position="rope"), 64),
        (dict(position="rope", rope_scaling="linear", rope_factor=4.0), 256),
        (dict(position="rope", rope_scaling="dynamic", rope_factor=2.0, rope_original_max_len=64), 128),
        (dict(position="rope", rope_scaling="llama3", rope_factor=2.0, rope_original_max_len=48), 96),
        (dict(position="rope", rope_scaling="llama3", rope_factor=2.0, rope_original_max_len=16), 64),
    ],
)
def test_exactly_at_the_limit_is_fine_one_past_is_refused(overrides, limit):
    c = cfg(**overrides)
    assert context_limit(c) == limit
    check_context(c, limit - 10, 10)
    with pytest.raises(ContextLengthError) as e:
        check_context(c, limit - 10, 11)
    err = e.value
    assert isinstance(err, UserError) and err.code == "context_length_exceeded"
    assert (err.limit, err.requested, err.prompt_tokens, err.max_new_tokens) == (limit, limit + 1, limit - 10, 11)
    assert "\n" not in str(err) and f"context of {limit} tokens" in str(err)


def test_positions_without_a_table_and_streaming_caches_have_no_rope_limit():
    for position in ("alibi", "sinusoidal", "relative", "none"):
        check_context(cfg(position=position), 1000, 1000)
    check_context(cfg(position="rope"), 1000, 1000, streaming=True)  # StreamingLLM: past the length on purpose
    with pytest.raises(ContextLengthError, match="learned positions"):
        check_context(cfg(position="learned"), 1000, 1000, streaming=True)  # nothing past the table


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg(position="rope", max_seq_len=32, **kw)).eval()


def test_every_generating_path_refuses_rope_past_its_length():
    model, params = tiny(), SamplingParams(temperature=0, max_new_tokens=8)
    prompt = list(range(1, 26))  # 25 + 8 = 33 > 32
    with pytest.raises(ContextLengthError):
        generate(model, prompt, params)
    with pytest.raises(ContextLengthError):
        Engine(model, num_blocks=8, block_size=8).add_request(prompt, params)
    with pytest.raises(ContextLengthError):
        speculative_generate(model, prompt, params, lookup_ngram=2)
    assert len(generate(model, prompt[1:], params)) == 8  # 32: exactly the context
    assert len(generate(tiny(rope_scaling="linear", rope_factor=2.0), prompt, params)) == 8
    sliding = SlidingKVCache(model.cfg, 1, window=16, sinks=2)
    assert len(generate(model, prompt, params, cache=sliding)) == 8
