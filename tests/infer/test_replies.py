"""generate_replies: the same samples as the engine settings each caller used to build by hand and as the batch-1
path; chats and token ids alike; one ContextLengthError for a prompt too long, before anything runs."""

import pytest
import torch

from lmforge.infer.context import ContextLengthError
from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate_stream
from lmforge.infer.replies import generate_replies, kv_blocks
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import END, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CHATS = [[{"role": "user", "content": f"What is {i} + {i * 7}?"}] for i in range(5)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_char(["What is 0123456789 + - * ? Reverse the word: abcdefghijklmnopqrstuvwxyz"])


def tiny(tok, **kw) -> Transformer:
    torch.manual_seed(0)
    fields = dict(vocab_size=tok.vocab_size, max_seq_len=64, n_layer=2, d_model=32, n_head=4, position="rope",
                  ffn="swiglu", norm="rmsnorm", init_std=0.3)  # fmt: skip
    fields.update(kw)
    return Transformer(ModelConfig(**fields)).eval()


def stops(tok):
    return (tok.token_to_id(END), tok.eos_id)


def test_samples_equal_the_rollouts_old_engine_and_the_batch1_path(tok):
    """The engine RL rollouts built by hand (no tokenizer, blocks for everything, one prefill step) gives the same
    n samples; a one-sample request is the batch-1 generator's."""
    model = tiny(tok)
    ids = [tok.render_chat(c, add_generation_prompt=True)[0] for c in CHATS]
    params = [SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7 + i, stop_ids=stops(tok))
              for i in range(len(ids))]  # fmt: skip
    got = generate_replies(model, tok, CHATS, params)
    old = Engine(model, num_blocks=sum(-(-(len(i) + 10) // 16) for i in ids) * 3 + 16, max_batch=len(ids) * 3,
                 vocab_size=tok.vocab_size, token_budget=max(512, sum(map(len, ids))))  # fmt: skip
    expected = [(i, s.index, s.output) for i, r in enumerate(old.generate(ids, params)) for s in r.seqs]
    assert [(c.prompt_index, c.index, c.ids) for c in got] == sorted(expected, key=lambda e: e[:2])
    assert all(c.text == tok.decode(c.ids, skip_special=True) and c.prompt == ids[c.prompt_index] for c in got)
    for temperature in (0.0, 0.8):
        one = SamplingParams(temperature=temperature, max_new_tokens=12, seed=3, stop_ids=stops(tok))
        for c in generate_replies(model, tok, ids, one, max_batch=2):
            assert c.ids == list(generate_stream(model, ids[c.prompt_index], one, vocab_size=tok.vocab_size))
            assert c.finish_reason == ("stop" if c.ids[-1] in stops(tok) else "length")


def test_chats_and_token_ids_give_the_same_replies_and_the_mode_is_restored(tok):
    model = tiny(tok).train()
    params = SamplingParams(temperature=0, max_new_tokens=8, logprobs=1)
    ids = [tok.render_chat(c, add_generation_prompt=True)[0] for c in CHATS]
    by_chat = generate_replies(model, tok, CHATS, params)
    assert model.training  # the engine evaluates; the caller's mode comes back
    by_ids = generate_replies(model, tok, ids, params)
    assert [c.ids for c in by_chat] == [c.ids for c in by_ids]
    assert all(len(c.logprobs) == len(c.ids) and c.logprobs[0].token == c.ids[0] for c in by_ids)
    assert generate_replies(model, tok, [], params) == []
    with pytest.raises(ValueError, match="2 SamplingParams for 5 prompts"):
        generate_replies(model, tok, ids, [params, params])


class Letters(torch.nn.Module):
    """An LM head that can only write lowercase letters (random weights otherwise write stray bytes)."""

    def __init__(self, head: torch.nn.Module, allowed: list[int]):
        super().__init__()
        self.head, self.allowed = head, allowed

    def forward(self, h):
        logits = torch.full_like(self.head(h), -1e4)
        logits[..., self.allowed] = self.head(h)[..., self.allowed]
        return logits


def test_stop_strings_cut_the_text(tok):
    model = tiny(tok)
    model.lm_head = Letters(model.lm_head, tok.encode("abcdefghijklmnopqrstuvwxyz"))
    (free,) = generate_replies(model, tok, CHATS[:1], SamplingParams(temperature=0, max_new_tokens=20, seed=0))
    assert len(free.text) > 3
    stop = free.text[2:4]
    (cut,) = generate_replies(model, tok, CHATS[:1], SamplingParams(temperature=0, max_new_tokens=20, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_too_long_is_one_context_length_error_before_anything_runs(tok, position, monkeypatch):
    model = tiny(tok, position=position, max_seq_len=24)
    steps = []
    monkeypatch.setattr(Engine, "step", lambda self: steps.append(1) or [])
    short, long = [5, 6, 7], list(range(5, 25))  # 3 and 20 tokens of a 24-token context
    params = SamplingParams(temperature=0, max_new_tokens=10)
    with pytest.raises(ContextLengthError, match=r"prompt \(20 tokens\) \+ max_new_tokens \(10\) = 30"):
        generate_replies(model, tok, [short, long], params)
    with pytest.raises(ContextLengthError, match=r"prompt \(24 tokens\) \+ max_new_tokens \(1\)"):
        generate_replies(model, tok, [short, list(range(5, 29))], params, fit_context=True)  # no room at all
    assert steps == []  # refused before the first step
    monkeypatch.undo()
    fitted = generate_replies(model, tok, [short, long], SamplingParams(temperature=0, max_new_tokens=10,
                                                                        ignore_eos=True), fit_context=True)  # fmt: skip
    assert [len(c.ids) for c in fitted] == [10, 4]  # the long prompt's reply stops at the context


def test_the_kv_pool_holds_what_runs_at_once_so_nothing_is_preempted(tok, monkeypatch):
    model = tiny(tok)
    preempted = []
    monkeypatch.setattr(Engine, "_preempt", lambda self, seq: preempted.append(seq))
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=30, seed=1, ignore_eos=True)
    out = generate_replies(model, tok, CHATS, params, max_batch=3)
    assert preempted == [] and [len(c.ids) for c in out] == [30] * 10
    ids = [[1] * 10, [1] * 40, [1] * 20]
    assert kv_blocks(ids, [SamplingParams(max_new_tokens=8)] * 3, 2, 16) == 3 + 2 + 1  # the two longest, + 1
