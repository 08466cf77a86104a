"""Speculative decoding: the rejection rule reproduces the target distribution (χ² against p, with a negative
control that must fail), greedy speculation equals target-only greedy for a draft model and prompt lookup,
the mean accepted length matches (1 − α^(γ+1)) / (1 − α), and stops, limits, caches and seeds behave."""

import pytest
import torch

from lmforge.config import UserError
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import (
    SpeculativeStats,
    expected_tokens_per_step,
    lookup_draft,
    predicted_speedup,
    residual_distribution,
    speculative_generate,
    verify,
)
from lmforge.model import ModelConfig, Transformer

CHI2_CRIT_7DOF = 18.475  # χ² critical value, 7 degrees of freedom, significance 0.01 (scipy is not installed)
V, GAMMA, DRAWS = 8, 4, 20_000


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/infer/conftest.py


def tiny(seed, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, max_seq_len=128, n_layer=2, d_model=32, n_head=4, init_std=0.2)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def target():
    return tiny(0)


@pytest.fixture(scope="module")
def draft():
    return tiny(1, n_layer=1, d_model=16, n_head=2)


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs.double()
    assert (expected >= 5).all(), "too few draws per bin for a χ² test"
    return float(((counts.double() - expected) ** 2 / expected).sum())


def synthetic_pq():
    """Fixed, context-independent target rows p [γ+1, V] and different draft rows q [γ, V]; q row 0 never
    proposes token 3, so p_0(3) can only come from the residual."""
    g = torch.Generator().manual_seed(1234)
    p = 0.7 * torch.softmax(1.5 * torch.randn(GAMMA + 1, V, generator=g), -1) + 0.3 / V
    q = torch.softmax(1.5 * torch.randn(GAMMA, V, generator=g), -1)
    q[0, 3] = 0.0
    return p, q / q.sum(-1, keepdim=True)


def run_verifier(verifier, p, q, seed=0):
    """First emitted token of every draw, and second tokens of the draws whose first draft was accepted."""
    g = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q, DRAWS, replacement=True, generator=g).T.tolist()  # x_i ~ q_i
    first, second = torch.zeros(V, dtype=torch.long), {}
    for x in drafts:
        accepted, token = verifier(p, q, x, g)
        out = accepted + [token]
        first[out[0]] += 1
        if accepted:
            second.setdefault(out[0], torch.zeros(V, dtype=torch.long))[out[1]] += 1
    return first, second


def test_verify_emits_the_target_distribution():
    p, q = synthetic_pq()
    assert (p[0] - q[0]).abs().sum() > 0.5  # a draft far from the target: most mass comes through rejection
    first, second = run_verifier(verify, p, q)
    assert chi2(first, p[0]) < CHI2_CRIT_7DOF
    # Given the first draft was accepted as c, the next token is a fresh draw against p_1 (rows are
    # context-independent): test the c with the most such draws.
    c = max(second, key=lambda t: int(second[t].sum()))
    assert second[c].sum() > 2000
    assert chi2(second[c], p[1]) < CHI2_CRIT_7DOF


def test_accept_always_control_fails_the_same_test():
    """Negative control: keeping every draft emits q, not p — the χ² test must reject it (it has the power)."""
    p, q = synthetic_pq()

    def accept_always(p, q, x, g):
        return list(x), int(torch.multinomial(p[len(x)], 1, generator=g))

    first, _ = run_verifier(accept_always, p, q)
    assert chi2(first, p[0]) > CHI2_CRIT_7DOF

    def resample_from_p(p, q, x, g):  # a subtler bug: a rejected position redrawn from p, not max(0, p − q)
        if float(torch.rand(1, generator=g)) < min(1.0, float(p[0, x[0]] / q[0, x[0]])):
            return [x[0]], int(torch.multinomial(p[1], 1, generator=g))
        return [], int(torch.multinomial(p[0], 1, generator=g))

    first, _ = run_verifier(resample_from_p, p, q)
    assert chi2(first, p[0]) > CHI2_CRIT_7DOF


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_mean_accepted_length_matches_theory(alpha):
    """q one-hot on token 0 with p(0) = α: every draft is accepted independently with probability exactly α."""
    p = torch.full((GAMMA + 1, V), (1 - alpha) / (V - 1))
    p[:, 0] = alpha
    q = torch.zeros(GAMMA, V)
    q[:, 0] = 1.0
    g, stats = torch.Generator().manual_seed(7), SpeculativeStats()
    for _ in range(8000):  # standard error of the mean length ≈ 0.5%
        accepted, token = verify(p, q, [0] * GAMMA, g)
        stats.record(GAMMA, len(accepted), len(accepted) + 1)
    assert stats.tokens_per_step == pytest.approx(expected_tokens_per_step(alpha, GAMMA), rel=0.02)
    assert stats.alpha == pytest.approx(alpha, abs=0.02)  # per judged draft, not per drafted token
    assert stats.accepted_fraction < stats.alpha


def test_formulas_and_residual_guard():
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert expected_tokens_per_step(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2)
    assert predicted_speedup(0.8, 4, 0.0) == pytest.approx(expected_tokens_per_step(0.8, 4))  # prompt lookup
    assert predicted_speedup(0.8, 4, 0.25, 1.8) == pytest.approx(3.3616 / 2.8)
    p = torch.tensor([0.5, 0.3, 0.2])
    assert torch.allclose(residual_distribution(p, p), p)  # max(0, p − q) = 0: fall back to p
    assert torch.allclose(residual_distribution(p, torch.tensor([0.1, 0.6, 0.3])), torch.tensor([1.0, 0.0, 0.0]))


def test_lookup_draft():
    seq = [7, 1, 2, 3, 9, 4, 1, 2, 3, 5, 6, 2, 3]
    assert lookup_draft(seq, 3, max_ngram=3) == [5, 6, 2]  # the most recent earlier "2 3", not the first one
    assert lookup_draft(seq + [1, 2, 3], 2, max_ngram=3) == [5, 6]  # longest n-gram "1 2 3" wins
    assert lookup_draft([1, 2, 3, 4], 3, max_ngram=2) == []
    assert lookup_draft([4, 4, 4], 5, max_ngram=2) == [4]  # the occurrence may overlap the suffix


PROMPTS = [[1, 2, 3], [5, 9, 9, 9, 5, 9], list(range(20))]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_target_only(target, draft, prompt):
    ref = generate(target, prompt, max_new_tokens=40, temperature=0)
    params = SamplingParams(temperature=0, max_new_tokens=40)
    for gamma in (1, 3, 5):
        for kw in (dict(draft=draft), dict(lookup_ngram=3), dict(draft=draft, adaptive=True), {}):
            stream = speculative_generate(target, prompt, params, gamma=gamma, **kw)
            assert list(stream) == ref, (gamma, kw)
            assert stream.stats.emitted == 40
    stream = speculative_generate(target, prompt, params, draft=target, gamma=4)  # the target drafting itself
    assert list(stream) == ref
    assert stream.stats.alpha == 1.0 and stream.stats.target_forwards == 8  # 40 tokens, 5 per step


def test_repetition_penalty_sees_each_draft_position_history(target, draft):
    """Each verified row is penalised with prompt + output + the drafts before it: speculation changes nothing."""
    params = SamplingParams(temperature=0, max_new_tokens=30, repetition_penalty=1.5)
    ref = list(speculative_generate(target, [5, 9, 9, 9, 5, 9], params))  # no drafter: one token per forward
    assert ref != generate(target, [5, 9, 9, 9, 5, 9], max_new_tokens=30, temperature=0)  # the penalty bites
    for kw in (dict(draft=draft), dict(lookup_ngram=2), dict(draft=target)):
        assert list(speculative_generate(target, [5, 9, 9, 9, 5, 9], params, gamma=3, **kw)) == ref


def test_lookup_accepts_on_repetitive_text(target):
    """A random model soon loops: prompt lookup then drafts for free and several tokens land per forward."""
    stream = speculative_generate(target, [5, 9, 9, 9, 5, 9], SamplingParams(temperature=0, max_new_tokens=40),
                                  lookup_ngram=3, gamma=4)  # fmt: skip
    list(stream)
    assert stream.stats.draft_forwards == 0 and stream.stats.accepted > 0
    assert stream.stats.tokens_per_step > 1.2 and stream.stats.target_forwards < 40


@pytest.mark.parametrize("kind", ["draft", "lookup", "self"])
def test_stop_ids_max_new_tokens_and_cache_invariant(target, draft, kind):
    prompt = [1, 2, 3]
    ref = generate(target, prompt, max_new_tokens=40, temperature=0)
    kw = {"draft": dict(draft=draft), "lookup": dict(lookup_ngram=2), "self": dict(draft=target)}[kind]
    # Stop tokens first seen at several places (for "self" they land inside a fully accepted step).
    for j in sorted({ref.index(t) for t in ref})[1:6]:
        stream = speculative_generate(target, prompt, SamplingParams(temperature=0, max_new_tokens=40,
                                                                     stop_ids=(ref[j],)), gamma=4, **kw)  # fmt: skip
        out = list(stream)
        assert out == ref[: j + 1]
        # Between steps the target cache holds everything but the last emitted token; the draft at most that.
        assert stream.cache.length == len(prompt) + len(out) - 1
        if stream.draft_cache is not None:
            assert stream.draft_cache.length <= stream.cache.length
    for m in (1, 2, 3, 5, 7, 12):
        stream = speculative_generate(target, prompt, SamplingParams(temperature=0, max_new_tokens=m), gamma=4, **kw)
        out = list(stream)
        assert out == ref[:m]
        assert stream.cache.length == len(prompt) + m - 1
        if kind == "self":
            assert stream.stats.target_forwards == -(-m // 5)  # ceil(m / (γ + 1)): drafts capped at the limit
    ignoring = SamplingParams(temperature=0, max_new_tokens=10, stop_ids=(ref[0],), ignore_eos=True)
    assert list(speculative_generate(target, prompt, ignoring, gamma=3, **kw)) == ref[:10]


@pytest.mark.parametrize("kw", [{"lookup_ngram": 2}, {"adaptive": True}])
def test_same_seed_same_tokens(target, draft, kw):
    kw = dict(kw, draft=draft) if "adaptive" in kw else kw

    def sample(seed):
        params = SamplingParams(temperature=0.9, top_k=20, seed=seed, max_new_tokens=30)
        return list(speculative_generate(target, [4, 8, 15, 16, 23, 42], params, gamma=3, **kw))

    assert sample(3) == sample(3)
    assert len({tuple(sample(s)) for s in (3, 4, 5)}) > 1


def test_sampled_pipeline_follows_the_target(target, draft):
    """End to end with temperature 1: the first token follows the target's softmax at the prompt, and the
    second, given the first, the target's softmax one step later — across prefill, drafts and rollbacks."""
    small = dict(vocab_size=8, n_layer=1, d_model=16, n_head=2, init_std=0.3)
    t8, d8 = tiny(3, **small), tiny(11, **small)  # p and q at the prompt differ by total variation 0.43
    prompt, runs = [1, 2, 3], 1200
    with torch.no_grad():
        p0 = t8(torch.tensor([prompt]))[0, -1].softmax(-1)
    first, pairs = torch.zeros(8, dtype=torch.long), torch.zeros(8, 8, dtype=torch.long)
    for seed in range(runs):
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=2)  # 1 draft, verified or not
        a, b = speculative_generate(t8, prompt, params, draft=d8, gamma=2)
        first[a] += 1
        pairs[a, b] += 1
    assert chi2(first, p0) < CHI2_CRIT_7DOF
    c = int(first.argmax())
    with torch.no_grad():
        p1 = t8(torch.tensor([prompt + [c]]))[0, -1].softmax(-1)
    assert chi2(pairs[c], p1) < CHI2_CRIT_7DOF


def test_padded_vocabularies(draft):
    padded = tiny(0, vocab_size=72)  # a target whose embedding is padded past the tokenizer's 64 tokens
    ref = generate(padded, [1, 2, 3], max_new_tokens=20, temperature=0, vocab_size=64)
    params = SamplingParams(temperature=0, max_new_tokens=20)
    assert list(speculative_generate(padded, [1, 2, 3], params, draft=draft, vocab_size=64)) == ref
    with pytest.raises(UserError, match="vocab sizes differ"):
        speculative_generate(padded, [1, 2, 3], params, draft=draft)
    with pytest.raises(UserError, match=r"the tokenizer has 70 tokens, more than a model's vocabulary \(64\)"):
        speculative_generate(padded, [1, 2, 3], params, draft=draft, vocab_size=70)


def test_refuses_what_it_cannot_do(target, draft):
    params = SamplingParams(temperature=0, max_new_tokens=8)
    with pytest.raises(UserError, match="cannot roll back"):
        speculative_generate(tiny(0, attention="linear"), [1, 2], params, lookup_ngram=2)
    with pytest.raises(UserError, match="the draft model uses linear attention"):
        speculative_generate(target, [1, 2], params, draft=tiny(0, vocab_size=64, attention="linear"))
    with pytest.raises(UserError, match="not both"):
        speculative_generate(target, [1, 2], params, draft=draft, lookup_ngram=2)
    with pytest.raises(UserError, match="positions"):
        speculative_generate(target, [1] * 125, params, draft=draft)
    with pytest.raises(UserError, match="lookup_ngram"):
        speculative_generate(target, [1, 2], params, lookup_ngram=0)
    with pytest.raises(UserError, match="empty"):
        speculative_generate(target, [], params)


def test_draft_tokenizer_check_compares_vocabularies(tmp_path):
    from lmforge.config import UserError
    from lmforge.infer.speculative import check_same_tokenizer
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train_char(["abc"])
    reloaded = Tokenizer.load(tok.save(tmp_path))  # pretty-printed file, same table
    assert tok.fingerprint() == reloaded.fingerprint()
    check_same_tokenizer(tok, reloaded)
    with pytest.raises(UserError, match="must share the target's tokenizer"):
        check_same_tokenizer(tok, Tokenizer.train_char(["abd"]))
