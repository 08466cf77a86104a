"""Speculative decoding: a cheap drafter proposes γ tokens, the target scores them all in one forward, and a
modified rejection sampler keeps a prefix so that the output is distributed exactly as the target's own
samples (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al.
2023, "Accelerating Large Language Model Decoding with Speculative Sampling").

    params = SamplingParams(temperature=0.8, seed=0, max_new_tokens=64, stop_ids=(eos,))
    stream = speculative_generate(target, prompt, params, draft=small_model, gamma=4)
    tokens = list(stream)                         # or iterate to stream tokens as they are accepted
    stream.stats.alpha, stream.stats.tokens_per_step, stream.stats.target_forwards
    stream = speculative_generate(target, prompt, params, lookup_ngram=3)  # draft-free prompt lookup

Two drafters: a small draft model with its own KV cache, or prompt lookup (Saxena 2023, "Prompt Lookup
Decoding"): the tokens that followed the most recent earlier occurrence of the last n tokens, a
deterministic (one-hot) draft that costs no forward at all. With temperature 0 both reproduce the target's
greedy tokens exactly. `expected_tokens_per_step` and `predicted_speedup` give the analytic speed-up the
benchmark compares its measurements with.

Cache invariant: between steps the target cache holds every token of prompt + output except the last one,
which is fed (with the drafts) at the start of the next verify forward; the first forward is the prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.config import UserError

from .context import check_context
from .kv_cache import ContiguousKVCache
from .sampling import SamplingParams, draw, generator_for, processed_probs

SALT_DRAFT, SALT_VERIFY = 1 << 20, (1 << 20) + 1  # streams of their own, apart from the n-sample salts


def verify(p: torch.Tensor, q: torch.Tensor | None, draft_tokens: list[int], generator) -> tuple[list[int], int]:
    """The modified rejection sampling of Leviathan et al. 2023 (Algorithm 1) / Chen et al. 2023.

    p [γ+1, V]: the target's distributions at each draft position and the one after; q [γ, V]: the
    distributions the drafts were drawn from. Draft x_i is kept with probability min(1, p_i(x)/q_i(x)); at
    the first rejection a token is drawn from norm(max(0, p_i − q_i)) and the step stops; if all γ pass, a
    bonus token is drawn from p_γ. Returns (accepted drafts, next token): every emitted token is then
    distributed exactly as if sampled from p one at a time."""
    gamma = len(draft_tokens)
    k = gamma
    if gamma:
        x = torch.tensor(draft_tokens, device=p.device)[:, None]
        px, qx = p[:gamma].gather(1, x)[:, 0], q.gather(1, x)[:, 0]
        coins = torch.rand(gamma, generator=generator, device=p.device)
        # coin < min(1, p/q) ⟺ coin·q < p (coin < 1): no division, and q(x) = 0 accepts exactly when p(x) > 0.
        accept = (coins * qx < px).tolist()
        k = accept.index(False) if False in accept else gamma
    dist = residual_distribution(p[k], q[k]) if k < gamma else p[gamma]
    return list(draft_tokens[:k]), int(torch.multinomial(dist, 1, generator=generator))


def residual_distribution(p_i: torch.Tensor, q_i: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p − q)), what a rejected position is resampled from. It sums to 0 only when p = q (then a
    rejection has probability 0 and only happens through rounding): fall back to p."""
    residual = (p_i - q_i).clamp_min(0)
    total = residual.sum()
    return residual / total if total > 1e-6 else p_i


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """Tokens one verify step emits when each draft is accepted independently with probability α:
    (1 − α^(γ+1)) / (1 − α) (Leviathan et al. 2023, eq. 1); γ + 1 when α = 1."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def predicted_speedup(alpha: float, gamma: int, draft_cost_ratio: float, verify_cost_ratio: float = 1.0) -> float:
    """Walltime speed-up over target-only decoding: tokens per step ÷ the step's cost in target steps,
    γ·c + v. c = draft step / target step; v = the target's (γ+1)-token verify forward / one-token step.
    v = 1 is Leviathan et al. 2023, Theorem 3.8; on a CPU v is well above 1 (FIELD-NOTES: ~1.8 for 5 tokens)."""
    return expected_tokens_per_step(alpha, gamma) / (gamma * draft_cost_ratio + verify_cost_ratio)


def lookup_draft(tokens: list[int], gamma: int, max_ngram: int, min_ngram: int = 1) -> list[int]:
    """Prompt lookup (Saxena 2023): for n = max_ngram down to min_ngram, find the most recent earlier
    occurrence of the last n tokens and propose the (up to) γ tokens that followed it; [] when none match."""
    L = len(tokens)
    if gamma <= 0:
        return []
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        suffix = tokens[L - n :]
        for start in range(L - n - 1, -1, -1):  # an occurrence that ends before the suffix itself
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + gamma]
    return []


def check_same_tokenizer(target_tokenizer, draft_tokenizer, draft: str = "the draft model") -> None:
    """Refuse a draft whose token ids mean other tokens than the target's: its drafts would be judged as other
    text, accepted at random and never speed anything up (and a vocabulary past the target's is an index error)."""
    if target_tokenizer.fingerprint() == draft_tokenizer.fingerprint():
        return
    a, b = (getattr(t, "hf", t).get_vocab(with_added_tokens=True) for t in (target_tokenizer, draft_tokenizer))
    moved = len(set(a.items()) ^ set(b.items())) // 2
    raise UserError(f"{draft} must share the target's tokenizer: its vocabulary differs ({len(b)} tokens vs the "
                    f"target's {len(a)}, ~{moved} ids map to other tokens); use a draft trained with the target's "
                    "tokenizer, or --lookup N for draft-free speculation")  # fmt: skip


@dataclass
class SpeculativeStats:
    target_forwards: int = 0  # verify steps (the first one is also the prefill)
    draft_forwards: int = 0
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept
    rejected: int = 0  # steps that ended at a rejection (the rest accepted every draft)
    emitted: int = 0  # tokens returned, corrections and bonus tokens included

    def record(self, drafted: int, accepted: int, emitted: int) -> None:
        self.target_forwards += 1
        self.drafted += drafted
        self.accepted += accepted
        self.rejected += accepted < drafted
        self.emitted += emitted

    @property
    def alpha(self) -> float:
        """Per-token acceptance rate α: accepted ÷ drafts actually judged (drafts after a rejection never are).
        This is the α of `expected_tokens_per_step`; accepted ÷ drafted underestimates it."""
        judged = self.accepted + self.rejected
        return self.accepted / judged if judged else float("nan")

    @property
    def accepted_fraction(self) -> float:
        """accepted ÷ drafted: the share of draft work that paid off."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens emitted per target forward (accepted drafts + the correction or bonus token)."""
        return self.emitted / self.target_forwards if self.target_forwards else float("nan")

    @property
    def mean_gamma(self) -> float:
        return self.drafted / self.target_forwards if self.target_forwards else float("nan")


class DraftModel:
    """A small model proposing γ tokens autoregressively from its own processed distribution. Its cache holds
    a prefix of prompt + output; `propose` first feeds whatever it has not seen (≥ 1 token)."""

    def __init__(self, model, params: SamplingParams, max_len: int, vocab_size: int, device):
        self.model, self.params, self.vocab_size, self.device = model, params, vocab_size, device
        self.cache = ContiguousKVCache(model.cfg, 1, max_len, dtype=next(model.parameters()).dtype, device=device)
        self.forwards = 0

    def propose(self, seq: list[int], gamma: int, index: int, stop_ids) -> tuple[list[int], torch.Tensor | None]:
        tokens, rows = [], []
        penalised = self.params.repetition_penalty != 1.0
        for i in range(gamma):
            known = self.cache.length
            feed = seq[known:] + tokens if known < len(seq) else tokens[known - len(seq) :]
            logits = self.model(torch.tensor([feed], device=self.device), cache=self.cache)[0, -1:, : self.vocab_size]
            self.forwards += 1
            q = processed_probs(logits, [self.params], [seq + tokens] if penalised else None)[0]
            # Counter-based on the output position: after a rejection at k the next step reuses the streams of
            # positions > k, whose drafts were never judged, so the emitted tokens stay independent of them.
            tokens.append(draw(q, self.params, index + i, SALT_DRAFT))
            rows.append(q)
            if tokens[-1] in stop_ids:  # nothing after a stop token is ever emitted
                break
        return tokens, torch.stack(rows) if rows else None

    def rollback(self, length: int) -> None:
        self.cache.truncate(min(self.cache.length, length))


class PromptLookup:
    """Draft-free drafter: n-gram lookup in prompt + output. q is one-hot, so verify keeps x with prob p(x)."""

    def __init__(self, max_ngram: int, vocab_size: int, device):
        self.max_ngram, self.vocab_size, self.device = max_ngram, vocab_size, device
        self.forwards = 0

    def propose(self, seq: list[int], gamma: int, index: int, stop_ids) -> tuple[list[int], torch.Tensor | None]:
        tokens = lookup_draft(seq, gamma, self.max_ngram)
        cut = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
        tokens = tokens[:cut]
        if not tokens:
            return [], None
        q = torch.zeros(len(tokens), self.vocab_size, device=self.device)
        q[torch.arange(len(tokens)), torch.as_tensor(tokens)] = 1.0
        return tokens, q

    def rollback(self, length: int) -> None:
        pass


class SpeculativeStream:
    """Iterator over the new tokens of one request; `.stats` fills in as it runs. See `speculative_generate`."""

    def __init__(self, target, prompt, params, *, draft, gamma, lookup_ngram, adaptive, gamma_max, vocab_size):
        if not prompt:
            raise UserError("the prompt is empty: give at least one token (a prompt text that encodes to tokens)")
        if draft is not None and lookup_ngram is not None:
            raise UserError("give either a draft model or lookup_ngram, not both")
        if gamma < 1 or (gamma_max is not None and gamma_max < gamma):
            raise UserError(f"need 1 ≤ gamma ≤ gamma_max, got gamma={gamma}, gamma_max={gamma_max}")
        if lookup_ngram is not None and lookup_ngram < 1:
            raise UserError(f"lookup_ngram is the longest n-gram matched, ≥ 1; got {lookup_ngram}")
        models = [target] + ([draft] if draft is not None else [])
        vocabs = {m.cfg.vocab_size for m in models}
        if vocab_size is None and len(vocabs) > 1:
            raise UserError(f"draft and target vocab sizes differ ({sorted(vocabs)}): pass vocab_size= the "
                            "tokenizer's vocabulary (padding past it is cut off)")  # fmt: skip
        vocab_size = vocab_size or target.cfg.vocab_size
        if vocab_size > min(vocabs):
            raise UserError(f"the tokenizer has {vocab_size} tokens, more than a model's vocabulary "
                            f"({min(vocabs)}): give a draft model with the target's tokenizer")  # fmt: skip
        self.max_len = len(prompt) + params.max_new_tokens
        for m in models:
            if m.cfg.attention == "linear" and (draft is not None or lookup_ngram is not None):
                which = "the target" if m is target else "the draft model"
                raise UserError(f"{which} uses linear attention, whose running state cannot roll back rejected "
                                "drafts: generate without speculation (no --draft, no --lookup)")  # fmt: skip
            check_context(m.cfg, len(prompt), params.max_new_tokens)
            m.eval()
        self.target, self.prompt, self.params, self.vocab_size = target, list(prompt), params, vocab_size
        self.device = next(target.parameters()).device
        self.cache = ContiguousKVCache(target.cfg, 1, self.max_len, dtype=next(target.parameters()).dtype,
                                       device=self.device)  # fmt: skip
        if draft is not None:
            self.drafter = DraftModel(draft, params, self.max_len, vocab_size, self.device)
        elif lookup_ngram is not None:
            self.drafter = PromptLookup(lookup_ngram, vocab_size, self.device)
        else:
            self.drafter = None  # target-only: the same loop with γ = 0, a baseline for the benchmark
        self.gamma, self.adaptive = gamma, adaptive
        self.gamma_max = gamma_max or 2 * gamma
        self.stats = SpeculativeStats()
        self._tokens = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> int:
        return next(self._tokens)

    @property
    def draft_cache(self) -> ContiguousKVCache | None:
        return getattr(self.drafter, "cache", None)

    @torch.no_grad()
    def _run(self):
        params, seq = self.params, list(self.prompt)
        stop_ids = () if params.ignore_eos else params.stop_ids
        penalised = params.repetition_penalty != 1.0
        n, gamma = 0, self.gamma
        while n < params.max_new_tokens:
            # Never draft past max_new_tokens: a step emits at most γ + 1 tokens.
            g = min(gamma, params.max_new_tokens - n - 1) if self.drafter is not None else 0
            drafts, q = self.drafter.propose(seq, g, n, stop_ids) if g > 0 else ([], None)
            # One target forward scores the unseen tail (the last emitted token; the prompt on the first step)
            # plus every draft: rows -(γ+1): are p at each draft position and the bonus position.
            feed = seq[self.cache.length :] + drafts
            logits = self.target(torch.tensor([feed], device=self.device), cache=self.cache)
            logits = logits[0, -(len(drafts) + 1) :, : self.vocab_size]
            histories = [seq + drafts[:i] for i in range(len(drafts) + 1)] if penalised else None
            p = processed_probs(logits, [params] * (len(drafts) + 1), histories)
            accepted, token = verify(p, q, drafts, generator_for(params, n, SALT_VERIFY, self.device))
            out = accepted + [token]
            stop_at = next((i + 1 for i, t in enumerate(out) if t in stop_ids), None)
            out = out[:stop_at]
            self.stats.record(len(drafts), len(accepted), len(out))
            seq += out
            # Roll both caches back to everything but the last emitted token (rejected drafts are forgotten).
            self.cache.truncate(len(seq) - 1)
            if self.drafter is not None:
                self.drafter.rollback(len(seq) - 1)
                self.stats.draft_forwards = self.drafter.forwards
            if self.adaptive and drafts:
                # Simple additive rule: grow after a fully accepted step, shrink when the first draft fails.
                if len(accepted) == len(drafts):
                    gamma = min(gamma + 1, self.gamma_max)
                elif not accepted:
                    gamma = max(gamma - 1, 1)
            n += len(out)
            yield from out
            if stop_at is not None:
                return


def speculative_generate(
    target,
    prompt: list[int],
    params: SamplingParams | None = None,
    *,
    draft=None,
    gamma: int = 4,
    lookup_ngram: int | None = None,
    adaptive: bool = False,
    gamma_max: int | None = None,
    vocab_size: int | None = None,
) -> SpeculativeStream:
    """Stream the new tokens of `prompt` from `target`, speculating with a `draft` model or with prompt lookup
    (`lookup_ngram` = longest n-gram matched); neither: plain target-only decoding through the same loop.
    params: sampling (temperature 0 = greedy, reproducing target-only greedy exactly), seed, stop_ids,
    max_new_tokens (never exceeded). gamma: drafts per step; adaptive: γ moves by ±1 within [1, gamma_max]
    (default 2·gamma). vocab_size: the tokenizer's vocabulary, cutting off embedding padding of either model."""
    params = params if params is not None else SamplingParams()
    if params.presence_penalty or params.frequency_penalty:
        raise UserError("presence and frequency penalties are not supported with speculative decoding: drop them, "
                        "or --draft/--lookup")  # fmt: skip
    return SpeculativeStream(target, prompt, params, draft=draft, gamma=gamma, lookup_ngram=lookup_ngram,
                             adaptive=adaptive, gamma_max=gamma_max, vocab_size=vocab_size)  # fmt: skip
