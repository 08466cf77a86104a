"""The inference engine: continuous batching over a paged KV cache (Orca, Yu et al. 2022; vLLM, Kwon et al.
2023). Requests join and leave the running batch at every step; long prompts are prefilled in chunks under a
per-step token budget, so decoding never stalls behind them (Sarathi, Agrawal et al. 2023).

    engine = Engine(model, tokenizer=tok)
    for out in engine.stream(tok.encode("def add(a, b):"), SamplingParams(max_new_tokens=40, temperature=0)):
        print(out.text, end="")
    results = engine.generate([ids_a, ids_b], SamplingParams(temperature=0.8, seed=1))  # batched, in order

Each request's outputs go to its own sink as they are sampled (`add_request(..., sink=)`), so several streams
interleaved in one thread each get exactly their own tokens; `lmforge.infer.engine_loop.EngineLoop` serves many
threads or asyncio tasks from one engine on a background thread the same way. Answering a batch of prompts or
chats to the end is `lmforge.infer.replies.generate_replies`.

One step: (1) every running sequence gets room for one more token — when the pool is out of blocks the newest
sequence is preempted: its blocks are freed and it re-enters the queue to be recomputed later (its prompt is
then prompt + what it generated; draws are counter-based, so it continues with the same tokens); (2) waiting
prompts are admitted in arrival order, prefix-cached blocks attached, and prefilled in chunks within the
token budget; (3) one forward for all decoding rows plus one per prefill chunk; (4) sampling with each
request's own parameters; finished and cancelled sequences free their blocks.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from lmforge.config import UserError

from .context import check_context
from .paged import OutOfBlocks, PagedKVPool, PagedSequence
from .sampling import SamplingParams, TextStream, TokenLogprobs, draw, processed_probs, token_logprobs

Sink = Callable[["Output"], None]


@dataclass
class Sequence:
    """One sample being generated: a paged sequence plus its request's bookkeeping."""

    request: Request
    index: int  # which of the request's n samples (the salt of its draws)
    paged: PagedSequence
    prompt_len: int  # tokens to prefill before the next draw (grows when a preempted sequence is recomputed)
    output: list[int] = field(default_factory=list)
    text: TextStream | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None  # "length" | "stop" | "cancelled"
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    arrival: float
    seqs: list[Sequence] = field(default_factory=list)
    sink: Sink | None = None  # called with each of the request's outputs as it is sampled
    # params.prompt_logprobs: prompt token i's log-prob given the tokens before it (the first has none: None)
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def done(self) -> bool:
        return bool(self.seqs) and all(s.done for s in self.seqs)

    @property
    def scoring_prompt(self) -> bool:
        """Whether prompt log-probs are still to be computed (needs every prompt token's logits: no prefix cache)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt)


@dataclass
class Output:
    """One new token of one sample, as `step` reports it."""

    request_id: int
    index: int
    token: int
    text: str  # the text this token released (UTF-8-safe, stop strings held back); "" without a tokenizer
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None
    time: float = 0.0  # time.perf_counter() when the token was sampled
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on a sample's first output, when asked for


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    prefix_hit_tokens: int = 0
    max_running: int = 0


class Engine:
    def __init__(self, model, *, tokenizer=None, num_blocks: int | None = None, kv_memory_gib: float = 2.0,
                 block_size: int = 16, max_batch: int = 64, token_budget: int = 512, kv_dtype: str | None = None,
                 prefix_caching: bool = True, vocab_size: int | None = None, verbose: bool = False):  # fmt: skip
        self.model, self.cfg = model.eval(), model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, (p.dtype if p.is_floating_point() else torch.float32)
        if num_blocks is None:
            per_block = PagedKVPool.bytes_per_block(self.cfg, block_size, self.dtype, kv_dtype)
            num_blocks = max(int(kv_memory_gib * 2**30 // per_block), 1)
        self.pool = PagedKVPool(self.cfg, num_blocks, block_size=block_size, dtype=self.dtype, device=self.device,
                                kv_dtype=kv_dtype, prefix_caching=prefix_caching)  # fmt: skip
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or (tokenizer.vocab_size if tokenizer is not None else None)
        self.max_batch, self.token_budget = max_batch, token_budget
        self.waiting: deque[Sequence] = deque()  # to prefill (new, or preempted and to be recomputed)
        self.running: list[Sequence] = []  # prefilled, decoding
        self.requests: dict[int, Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        if verbose:
            print(self.capacity_line())

    def capacity_line(self) -> str:
        pool, cfg = self.pool, self.cfg
        per_seq = -(-cfg.max_seq_len // pool.block_size)
        kind = str(pool.store.kv_dtype).removeprefix("torch.")  # what the pool stores: the model's dtype, bf16, int8
        return (f"KV cache: {pool.num_blocks} blocks × {pool.block_size} tokens = {pool.capacity_tokens:,} tokens "
                f"({pool.nbytes() / 2**20:,.0f} MiB, {kind}); {pool.num_blocks // per_seq} concurrent sequences "
                f"of {cfg.max_seq_len} tokens (more when shorter; at most {self.max_batch} per step)")  # fmt: skip

    # ---- requests ---------------------------------------------------------------------------------------
    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise a UserError if the request can never run here (empty, past the context, bigger than the cache).
        Reads only what never changes, so another thread may call it (EngineLoop.submit does)."""
        if not prompt:
            raise UserError("the prompt is empty: give at least one token (a prompt text that encodes to tokens)")
        total = len(prompt) + params.max_new_tokens
        check_context(self.cfg, len(prompt), params.max_new_tokens)
        if -(-total // self.pool.block_size) > self.pool.num_blocks:
            raise UserError(f"prompt + max_new_tokens = {total} tokens cannot fit the KV cache "
                            f"({self.pool.capacity_tokens} tokens): give the engine more KV memory "
                            "(kv_memory_gib, num_blocks) or ask for fewer tokens")  # fmt: skip

    def add_request(self, prompt: list[int], params: SamplingParams | None = None, *, sink: Sink | None = None
                    ) -> Request:  # fmt: skip
        params = params or SamplingParams()
        self.check_request(prompt, params)
        request = Request(next(self._ids), list(prompt), params, time.perf_counter(), sink=sink)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]  # nothing predicts the first token
        seq = Sequence(request, 0, PagedSequence(list(prompt)), len(prompt), text=self._text_stream(params))
        request.seqs.append(seq)
        self.requests[request.id] = request
        self.waiting.append(seq)
        return request

    def cancel(self, request_id: int) -> None:
        """Stop a request now and free its blocks."""
        request = self.requests.get(request_id)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.done:
                self._finish(seq, "cancelled")
        self.waiting = deque(s for s in self.waiting if s.request.id != request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- driving ----------------------------------------------------------------------------------------
    def stream(self, prompt: list[int], params: SamplingParams | None = None) -> Iterator[Output]:
        """Add one request and yield its outputs as they come. Other requests advance in the same steps, and
        their outputs reach their own sinks: two streams interleaved in one thread each get all their tokens."""
        inbox: deque[Output] = deque()
        request = self.add_request(prompt, params, sink=inbox.append)
        try:
            while True:
                while inbox:
                    yield inbox.popleft()
                if request.done:
                    return
                self.step()
        finally:
            if not request.done:  # the consumer stopped early
                self.cancel(request.id)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None):
        """Run every prompt to completion; returns the requests in order (tokens in `req.seqs[i].output`)."""
        many = params if isinstance(params, list) else [params] * len(prompts)
        requests = [self.add_request(p, sp) for p, sp in zip(prompts, many, strict=True)]
        while not all(r.done for r in requests):
            self.step()
        return requests

    @torch.no_grad()
    def step(self) -> list[Output]:
        """One scheduling step; returns the tokens it produced."""
        self.stats.steps += 1
        decoding = self._reserve_decode_slots()
        prefills = self._admit(max(self.token_budget - len(decoding), 0 if decoding else 1))
        outputs: list[Output] = []
        if decoding:
            tokens = [[s.paged.tokens[s.paged.num_cached]] for s in decoding]
            logits = self._forward(decoding, tokens)
            self.stats.decode_tokens += len(decoding)
            outputs += self._sample(decoding, logits)
        last_logits = {}
        for group in prefill_groups(prefills):  # chunks of similar length share a forward
            seqs = [seq for seq, _ in group]
            chunks = [seq.paged.tokens[seq.paged.num_cached : seq.paged.num_cached + n] for seq, n in group]
            last_logits.update(zip(map(id, seqs), self._forward(seqs, chunks)))
        for seq, n in prefills:  # in admission order, as if one by one
            self.stats.prefill_tokens += n
            if seq.paged.num_cached == seq.prompt_len:  # the prompt is in: draw the next token
                outputs += self._fork_and_sample(seq, last_logits[id(seq)][None])
                if not seq.done:
                    self.running.append(seq)
            else:
                self.waiting.appendleft(seq)  # more chunks next step, before anyone else
        self.stats.max_running = max(self.stats.max_running, len(self.running))
        return outputs

    def _forward(self, seqs: list[Sequence], tokens: list[list[int]]) -> torch.Tensor:
        """Feed each row its tokens (right-padded); returns the logits [B, V] of each row's last token only —
        the LM head over a whole prompt chunk would be wasted work (31% of GPT-2's prefill FLOPs)."""
        lengths = [len(t) for t in tokens]
        starts = [s.paged.num_cached for s in seqs]
        T = max(lengths)
        idx = torch.tensor([t + [0] * (T - len(t)) for t in tokens], device=self.device)
        pos = torch.tensor([[s.paged.num_cached + i for i in range(T)] for s in seqs], device=self.device)
        valid = None
        if min(lengths) != T:
            valid = torch.arange(T, device=self.device)[None, :] < torch.tensor(lengths, device=self.device)[:, None]
        cache = self.pool.batch([s.paged for s in seqs], lengths)
        hidden = self.model.hidden_states(idx, positions=pos, cache=cache, attn_mask=valid)
        cache.commit()
        for row, s in enumerate(seqs):
            if s.request.scoring_prompt:
                self._score_prompt(s.request, starts[row], hidden[row, : lengths[row]])
        if self.cfg.window:
            for s in seqs:
                self.pool.free_outside_window(s.paged, self.cfg.window)
        last = torch.tensor(lengths, device=self.device) - 1
        return self.model.lm_head(hidden[torch.arange(len(seqs), device=self.device), last])

    def _score_prompt(self, request: Request, start: int, hidden: torch.Tensor) -> None:
        """Prompt log-probs from one prefill chunk: the hidden state at position j predicts token j + 1 (the
        last prompt position predicts the first new token, which `_sample` reports). A chunk recomputed after
        its blocks were released finds its positions already scored and skips them."""
        first = len(request.prompt_logprobs) - 1  # the position that predicts the next unscored token
        stop = min(start + len(hidden), len(request.prompt) - 1)
        if first >= stop:
            return
        assert first >= start, "prompt positions skipped while scoring (a scoring request takes no cached prefix)"
        logits = self.model.lm_head(hidden[first - start : stop - start])
        if self.vocab_size:
            logits = logits[:, : self.vocab_size]
        targets = request.prompt[first + 1 : stop + 1]
        request.prompt_logprobs += token_logprobs(logits, targets, request.params.prompt_logprobs)

    # ---- scheduling -------------------------------------------------------------------------------------
    def _reserve_decode_slots(self) -> list[Sequence]:
        """Room for one token per running sequence (oldest first), preempting the newest while blocks run out."""
        ready: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            try:
                self.pool.reserve(seq.paged, 1)
                ready.append(seq)
            except OutOfBlocks:
                if queue:
                    self._preempt(queue.pop())  # the newest gives way; try this one again
                    queue.insert(0, seq)
                else:
                    self._preempt(seq)
        self.running = ready
        return list(ready)  # finishing sequences leave self.running while this list is sampled

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption (vLLM): free the blocks; later the prompt + output so far are prefilled again."""
        self.pool.free(seq.paged)
        seq.prompt_len = len(seq.paged.tokens)
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _admit(self, budget: int) -> list[tuple[Sequence, int]]:
        """Prefill chunks for this step, oldest first, within the token budget and the batch limit. A chunk
        shrinks to the free blocks; a prompt that does not fit at all waits for blocks to be freed."""
        chunks: list[tuple[Sequence, int]] = []
        while self.waiting and budget > 0 and len(self.running) + len(chunks) < self.max_batch:
            seq = self.waiting[0]
            if seq.paged.num_cached == 0 and not seq.paged.blocks and not seq.request.scoring_prompt:
                self.stats.prefix_hit_tokens += self.pool.attach_prefix(seq.paged)
            n = min(seq.prompt_len - seq.paged.num_cached, budget)
            while self.pool.fits(seq.paged) < n and self._release_newest_partial_prefill(seq):
                pass  # arrival order is priority: later half-prefilled prompts give their blocks back
            n = min(n, self.pool.fits(seq.paged))
            if n <= 0:
                break
            self.pool.reserve(seq.paged, n)
            self.waiting.popleft()
            chunks.append((seq, n))
            budget -= n
        return chunks

    def _release_newest_partial_prefill(self, head: Sequence) -> bool:
        """Free the blocks of the newest waiting sequence that holds some (a prompt prefilled part-way), so the
        queue's head can progress; without this, half-prefilled prompts could hold every block (deadlock).
        Their full blocks stay in the prefix cache, so the recompute is often free."""
        for seq in reversed(self.waiting):
            if seq is not head and seq.paged.blocks:
                self.pool.free(seq.paged)
                self.stats.preemptions += 1
                return True
        return False

    # ---- sampling ---------------------------------------------------------------------------------------
    def _fork_and_sample(self, seq: Sequence, logits: torch.Tensor) -> list[Output]:
        request = seq.request
        if seq.index == 0 and not seq.output and len(request.seqs) < request.params.n:
            for i in range(1, request.params.n):  # n samples share the prompt's blocks
                twin = Sequence(request, i, self.pool.fork(seq.paged), seq.prompt_len,
                                text=self._text_stream(request.params))  # fmt: skip
                request.seqs.append(twin)
            outputs = self._sample(request.seqs, logits.expand(len(request.seqs), -1))
            self.running += [t for t in request.seqs[1:] if not t.done]
            return outputs
        return self._sample([seq], logits)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Output]:
        if self.vocab_size:
            logits = logits[:, : self.vocab_size]
        row_params = [s.request.params for s in seqs]
        probs = processed_probs(logits, row_params, [s.paged.tokens for s in seqs], [s.output for s in seqs])
        now = time.perf_counter()
        outputs = []
        k = max((p.logprobs or 0) for p in row_params)
        wants_logprobs = any(p.logprobs is not None for p in row_params)
        chosen = [draw(probs[i], s.request.params, len(s.output), salt=s.index) for i, s in enumerate(seqs)]
        lps = token_logprobs(logits, chosen, k) if wants_logprobs else [None] * len(seqs)
        for seq, token, lp in zip(seqs, chosen, lps, strict=True):
            seq.output.append(token)
            seq.paged.tokens.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.token_times.append(now)
            if seq.request.params.logprobs is not None:
                seq.logprobs.append(lp)
            text = seq.text.feed(token) if seq.text else ""
            params = seq.request.params
            stop_token = not params.ignore_eos and (  # ignore_eos: exactly max_new_tokens, as generate_stream
                token in params.stop_ids or (self.tokenizer is not None and token == self.tokenizer.eos_id)
            )
            if stop_token or (seq.text is not None and seq.text.stopped):
                self._finish(seq, "stop")
            elif len(seq.output) >= params.max_new_tokens:
                self._finish(seq, "length")
            if seq.done and seq.text is not None:
                text += seq.text.flush()
            request = seq.request
            first = request.prompt_logprobs if len(seq.output) == 1 else None
            out = Output(request.id, seq.index, token, text, seq.finish_reason, lp, now, first)
            outputs.append(out)
            if request.sink is not None:
                request.sink(out)
        return outputs

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.pool.free(seq.paged)
        if seq in self.running:
            self.running.remove(seq)
        if seq.request.done:  # a long-lived engine (a server) must not keep every request it ever ran
            self.requests.pop(seq.request.id, None)

    def _text_stream(self, params: SamplingParams) -> TextStream | None:
        return TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None


def prefill_groups(chunks: list[tuple], slack: int = 256) -> list[list[tuple]]:
    """Prefill chunks (seq, n tokens) split into groups that run as one right-padded forward each. A forward has a
    fixed cost (tens of module calls, a few ms for a small model on a CPU), so 64 short prompts in one forward
    instead of 64 halved the time of an RL rollout (benchmarks/rlhf.py); but padding costs compute, so a group
    holds chunks of similar length: padded tokens ≤ real tokens + max(a quarter of them, `slack`)."""
    groups: list[list[tuple]] = []
    real = 0
    for chunk in sorted(chunks, key=lambda c: c[1]):
        group = groups[-1] if groups else None
        if group is not None:
            padded, total = (len(group) + 1) * chunk[1], real + chunk[1]
            if padded <= total + max(total // 4, slack):
                group.append(chunk)
                real = total
                continue
        groups.append([chunk])
        real = chunk[1]
    return groups
