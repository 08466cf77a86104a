"""Sampling: per-request parameters, batched logit processing, reproducible draws, log-probs, stop strings.

    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1, stop=("\\n\\n",), max_new_tokens=64)
    probs = processed_probs(logits, [params], histories=[prompt_ids])  # [B, V], every row its own params
    token = draw(probs[0], params, index=0)                            # the request's 1st new token

Rows of one batch may each have different parameters: the processors are vectorised over per-row
temperature / top-k / top-p / min-p tensors, so a mixed batch costs one sort, not one per request.

Randomness is counter-based: the draw for a request's i-th new token uses a generator seeded from
(seed, i) alone. A request therefore produces the same tokens whatever batch it runs in, and after being
preempted and recomputed — no generator state has to be saved or restored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from lmforge.config import UserError

GREEDY_EPS = 1e-5  # temperatures below this mean argmax


class SamplingError(UserError):
    """A sampling parameter out of range: "`field` `requirement`". The CLI re-words it with the option's name
    (lmforge.infer.commands.sampling_params_from_args), the server with the request field's."""

    def __init__(self, name: str, requirement: str):
        super().__init__(f"{name} {requirement}")
        self.field, self.requirement = name, requirement


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus (Holtzman et al. 2020); 1 = off
    min_p: float = 0.0  # keep tokens with p ≥ min_p · p_max (Nguyen et al. 2024); 0 = off
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019): logits of seen tokens ÷ (or ×) this; 1 = off
    # OpenAI's, on the tokens generated so far only: logit[j] -= count[j] · frequency + (count[j] > 0) · presence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a random seed is drawn once per request (still reproducible inside it)
    stop_ids: tuple[int, ...] = ()  # the stop token is returned, then the request ends
    stop: tuple[str, ...] = ()  # stop strings: text ends before the first match, even across tokens
    ignore_eos: bool = False  # benchmarks: generate exactly max_new_tokens
    logprobs: int | None = None  # None: off; 0: the chosen token's log-prob; k: plus the top-k alternatives
    # None: off; k ≥ 0: each prompt token's log-prob given the tokens before it (+ top-k), as OpenAI's `echo`
    # with logprobs reports them; computed in the engine's prefill, which then skips the prefix cache
    prompt_logprobs: int | None = None
    n: int = 1  # samples per prompt (they share the prompt's KV blocks in the paged engine)

    def __post_init__(self):
        self.stop_ids, self.stop = tuple(self.stop_ids), tuple(self.stop)
        if self.seed is None:
            self.seed = random.randrange(2**31)
        plp, pp, fp = self.prompt_logprobs, self.presence_penalty, self.frequency_penalty
        problems = [  # (bad, field, what it must be): the CLI names the option, the API the field
            (self.max_new_tokens < 1, "max_new_tokens", f"must be ≥ 1, got {self.max_new_tokens}"),
            (self.temperature < 0, "temperature", f"must be ≥ 0 (0 = greedy), got {self.temperature}"),
            (self.top_k < 0, "top_k", f"must be ≥ 0 (0 = off), got {self.top_k}"),
            (not 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}"),
            (not 0 <= self.min_p < 1, "min_p", f"must be in [0, 1), got {self.min_p}"),
            (self.repetition_penalty <= 0, "repetition_penalty", f"must be > 0, got {self.repetition_penalty}"),
            (not -2 <= self.presence_penalty <= 2, "presence_penalty", f"must be in [-2, 2], got {pp}"),
            (not -2 <= self.frequency_penalty <= 2, "frequency_penalty", f"must be in [-2, 2], got {fp}"),
            (self.n < 1, "n", f"must be ≥ 1, got {self.n}"),
            (self.logprobs is not None and self.logprobs < 0, "logprobs", f"must be ≥ 0, got {self.logprobs}"),
            (plp is not None and plp < 0, "prompt_logprobs", f"must be ≥ 0, got {plp}"),
            (any(not s for s in self.stop), "stop", "must not be an empty string"),
        ]
        for bad, name, requirement in problems:
            if bad:
                raise SamplingError(name, requirement)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def penalised(self) -> bool:
        """Whether the logits depend on the tokens seen so far (a history must be passed to sample)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)


def apply_repetition_penalty(logits: torch.Tensor, histories: list, penalties: list[float]) -> torch.Tensor:
    """CTRL's penalty on every token already in the row's history (prompt and output): positive logits are
    divided by the penalty, negative ones multiplied, so a seen token always becomes less likely."""
    logits = logits.clone()
    for row, (seen, penalty) in enumerate(zip(histories, penalties, strict=True)):
        if penalty == 1.0 or not len(seen):
            continue
        ids = torch.as_tensor(list(set(seen)) if not isinstance(seen, torch.Tensor) else seen.unique(),
                              device=logits.device, dtype=torch.long)  # fmt: skip
        picked = logits[row, ids]
        logits[row, ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def apply_presence_frequency(logits: torch.Tensor, outputs: list, params: list[SamplingParams]) -> torch.Tensor:
    """OpenAI's presence and frequency penalties, as its API reference defines them: each token j generated c[j]
    times so far loses c[j] · frequency_penalty + (c[j] > 0) · presence_penalty from its logit."""
    logits = logits.clone()
    for row, (out, p) in enumerate(zip(outputs, params, strict=True)):
        if not (p.presence_penalty or p.frequency_penalty) or not len(out):
            continue
        ids, counts = torch.as_tensor(list(out), dtype=torch.long).unique(return_counts=True)
        ids = ids.to(logits.device)
        logits[row, ids] -= counts.to(logits) * p.frequency_penalty + p.presence_penalty
    return logits


def processed_logits(logits: torch.Tensor, params: list[SamplingParams], histories: list | None = None,
                     outputs: list | None = None):  # fmt: skip
    """Logits [B, V] after every row's repetition penalty (over `histories`: prompt and output), presence and
    frequency penalties (over `outputs`: the generated tokens), temperature, top-k, top-p and min-p; filtered
    tokens are -inf. Greedy rows keep temperature 1 (their argmax is unchanged by the filters)."""
    logits = logits.float()
    if histories is not None and any(p.repetition_penalty != 1.0 for p in params):
        logits = apply_repetition_penalty(logits, histories, [p.repetition_penalty for p in params])
    if outputs is not None and any(p.presence_penalty or p.frequency_penalty for p in params):
        logits = apply_presence_frequency(logits, outputs, params)
    B, V = logits.shape
    dev = logits.device
    temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev)
    logits = logits / temperature[:, None]
    top_k = torch.tensor([p.top_k if p.top_k else V for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    min_p = torch.tensor([p.min_p for p in params], device=dev)
    if bool((top_k < V).any() | (top_p < 1).any() | (min_p > 0).any()):
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        rank = torch.arange(V, device=dev)[None, :]
        drop = rank >= top_k[:, None]
        # Nucleus: drop a token when the tokens ranked before it already hold top_p of the mass.
        drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
        drop |= probs < min_p[:, None] * probs[:, :1]
        drop[:, 0] = False  # the most likely token always survives
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def processed_probs(logits: torch.Tensor, params: list[SamplingParams], histories: list | None = None,
                    outputs: list | None = None):  # fmt: skip
    """The distribution each row samples from, [B, V]: one-hot at the argmax for greedy rows."""
    if all(p.greedy and not p.penalised for p in params):  # nothing to process: the raw argmax
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = processed_logits(logits, params, histories, outputs)
    probs = logits.softmax(-1)
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def generator_for(params: SamplingParams, index: int, salt: int = 0, device="cpu") -> torch.Generator:
    """The generator of a request's `index`-th draw: a function of (seed, index, salt) only. `salt` separates
    independent streams of one request (the n samples, speculative decoding's accept/reject coins)."""
    return torch.Generator(device=device).manual_seed(hash((params.seed, index, salt)) % 2**63)


def draw(probs: torch.Tensor, params: SamplingParams, index: int, salt: int = 0) -> int:
    """Sample one token from a row of `processed_probs` with the request's counter-based generator."""
    if params.greedy:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator_for(params, index, salt, probs.device)))


@dataclass
class TokenLogprobs:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the k most likely tokens and their log-probs


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprobs]:
    """Log-probs of the chosen tokens under the model's own distribution (raw logits: before temperature and
    filters, as OpenAI's API reports them) and the top-k alternatives, for each row of logits [B, V]."""
    logp = logits.float().log_softmax(-1)
    out = []
    top_v, top_i = logp.topk(k, dim=-1) if k else (None, None)
    for row, token in enumerate(tokens):
        top = list(zip(top_i[row].tolist(), top_v[row].tolist(), strict=True)) if k else []
        out.append(TokenLogprobs(token, float(logp[row, token]), top))
    return out


class TextStream:
    """Incremental, UTF-8-safe detokenisation with stop strings, for streaming one sequence.

    `feed(token)` returns the text that can be shown now. Text that might be the start of a stop string is
    held back until it is known not to be one; when a stop string completes (possibly across several
    tokens) the text before it is released and `stopped` becomes True."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_special: bool = True):
        self.decoder = tokenizer.incremental_decoder(skip_special=skip_special)
        self.stop = stop
        self.pending = ""  # decoded but not yet released
        self.text = ""  # released so far
        self.stopped = False

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        return self._release(self.pending + self.decoder.feed(token), final=False)

    def flush(self) -> str:
        """Release whatever is held back (the sequence ended without completing a stop string)."""
        if self.stopped:
            return ""
        return self._release(self.pending + self.decoder.flush(), final=True)

    def _release(self, text: str, final: bool) -> str:
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.pending = True, ""
            out = text[:cut]
        else:
            hold = 0 if final else _longest_stop_prefix_suffix(text, self.stop)
            out, self.pending = text[: len(text) - hold], text[len(text) - hold :]
        self.text += out
        return out


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
