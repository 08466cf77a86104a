"""The engine loop: many threads and asyncio tasks on one engine each get exactly their own tokens, cancellation
frees blocks, the waiting bound, drain, close, errors; prompt log-probs against a full forward."""

import asyncio
import threading

import pytest
import torch

from lmforge.infer.engine import Engine
from lmforge.infer.engine_loop import EngineLoop, QueueFull, ShuttingDown
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
LONG = SamplingParams(temperature=0, max_new_tokens=60)  # to cancel mid-stream


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    fields = dict(vocab_size=96, max_seq_len=128, n_layer=2, d_model=32, n_head=4, n_kv_head=2, position="rope",
                  ffn="swiglu", norm="rmsnorm", init_std=0.2)  # fmt: skip
    fields.update(overrides)
    return Transformer(ModelConfig(**fields)).eval()


def prompts(n: int, lo: int = 3, hi: int = 30, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (int(k),), generator=g).tolist() for k in torch.randint(lo, hi, (n,), generator=g)]


def alone(model, prompt, params) -> list[int]:
    """The oracle: the request on an engine of its own."""
    return Engine(model, num_blocks=32, block_size=8).generate([prompt], params)[0].seqs[0].output


@pytest.fixture(scope="module")
def model():
    return tiny()


def test_many_threads_get_exactly_their_own_tokens_and_cancelled_ones_stop(model):
    batch = prompts(16, seed=1)
    engine = Engine(model, num_blocks=96, block_size=8, token_budget=64)
    results: dict[int, tuple[list[int], str | None]] = {}
    errors = []

    def consumer(t: int):
        try:
            for j in (2 * t, 2 * t + 1):
                cancel = j % 3 == 0  # a third of the requests are cancelled after their third token
                handle = loop.submit(batch[j], LONG if cancel else GREEDY)
                got = []
                for out in handle:
                    got.append(out.token)
                    if cancel and len(got) == 3:
                        handle.cancel()
                results[j] = (got, handle.finish_reasons[0])
                # a cancelled handle may hold a token or two made while the cancel was on its way
                assert handle.tokens[0][: len(got)] == got and (cancel or handle.tokens[0] == got)
                assert len(handle.token_times[0]) == len(handle.tokens[0])
        except Exception as e:  # surfaced below: an assert in a thread would only print
            errors.append(e)

    with EngineLoop(engine, max_waiting=64) as loop:
        threads = [threading.Thread(target=consumer, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        stats = loop.drain(timeout=10)
    assert not errors and len(results) == 16
    cancelled = [j for j in range(16) if j % 3 == 0]
    for j, (got, reason) in results.items():
        if j in cancelled:
            assert reason == "cancelled" and got == alone(model, batch[j], LONG)[:3]
        else:
            assert reason == "length" and got == alone(model, batch[j], GREEDY)
    assert stats.blocks_free == stats.blocks_total == 96  # nothing leaked, cancelled requests included
    assert (stats.running, stats.waiting, stats.finished, stats.cancelled) == (0, 0, 16 - len(cancelled), 6)
    assert engine.stats.max_running > 1 and not engine.requests and not engine.has_work()


def test_a_handle_reports_timing_logprobs_and_prompt_logprobs(model):
    prompt = prompts(1, 20, 21, seed=2)[0]
    params = SamplingParams(temperature=0, max_new_tokens=5, logprobs=2, prompt_logprobs=1)
    with EngineLoop(Engine(model, num_blocks=32, block_size=8)) as loop:
        handle = loop.submit(prompt, params).result(timeout=10)
    assert handle.finish_reasons == ["length"] and handle.tokens[0] == alone(model, prompt, GREEDY)[:5]
    times = handle.token_times[0]
    assert handle.ttft == times[0] - handle.submitted > 0 and times == sorted(times)
    with torch.no_grad():
        logp = model(torch.tensor([prompt + handle.tokens[0]]))[0].log_softmax(-1)
    for k, lp in enumerate(handle.logprobs[0]):  # token k was drawn from the logits at position len(prompt)+k-1
        row = logp[len(prompt) + k - 1]
        assert lp.token == handle.tokens[0][k] and lp.logprob == pytest.approx(float(row[lp.token]), abs=1e-4)
        assert [t for t, _ in lp.top] == row.topk(2).indices.tolist()
    assert handle.prompt_logprobs[0] is None and len(handle.prompt_logprobs) == len(prompt)


@pytest.mark.parametrize("token_budget", [64, 7])  # one prefill chunk; chunks of 7 tokens
def test_prompt_logprobs_equal_a_full_forward_log_softmax(model, token_budget):
    """Prompt token i's log-prob given tokens < i (OpenAI's echo + logprobs), even where the prefix cache holds
    the prompt already: it is not used for a request that scores its prompt."""
    prompt = prompts(1, 30, 31, seed=3)[0]
    engine = Engine(model, num_blocks=32, block_size=8, token_budget=token_budget)
    engine.generate([prompt], GREEDY)  # fills the prefix cache with this prompt's blocks
    params = SamplingParams(temperature=0, max_new_tokens=2, prompt_logprobs=3)
    (request,) = engine.generate([prompt], params)
    with torch.no_grad():
        brute = model(torch.tensor([prompt]))[0].log_softmax(-1)  # row j predicts token j + 1
    got = request.prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    for i in range(1, len(prompt)):
        assert got[i].token == prompt[i]
        assert got[i].logprob == pytest.approx(float(brute[i - 1, prompt[i]]), abs=1e-4)
        top_v, top_i = brute[i - 1].topk(3)
        assert [t for t, _ in got[i].top] == top_i.tolist()
        assert [v for _, v in got[i].top] == pytest.approx(top_v.tolist(), abs=1e-4)
    assert engine.pool.allocator.num_free == 32


def test_submitting_past_max_waiting_raises_queue_full(model):
    engine = Engine(model, num_blocks=64, block_size=8, max_batch=1)  # one sequence at a time: the rest wait
    with EngineLoop(engine, max_waiting=2) as loop:
        first = loop.submit(prompts(1)[0], SamplingParams(temperature=0, max_new_tokens=90))
        next(first)  # started: it no longer counts as waiting, and holds the only batch slot for 90 tokens
        waiting = [loop.submit(p, GREEDY) for p in prompts(2, seed=5)]
        with pytest.raises(QueueFull, match="2 requests are already waiting"):
            loop.submit(prompts(1, seed=6)[0], GREEDY)
        assert loop.stats().waiting == 2 and loop.stats().running == 1
        first.cancel()
        assert [h.result(timeout=10).finish_reasons for h in waiting] == [["length"], ["length"]]
        assert loop.stats().waiting == 0


def test_drain_finishes_what_is_in_flight_and_refuses_new_requests(model):
    loop = EngineLoop(Engine(model, num_blocks=64, block_size=8))
    handles = [loop.submit(p, GREEDY) for p in prompts(4, seed=7)]
    stats = loop.drain(timeout=10)
    assert all(h.done and h.finish_reasons == ["length"] for h in handles)
    assert stats.finished == 4 and stats.blocks_free == 64 and stats.running == stats.waiting == 0
    with pytest.raises(ShuttingDown):
        loop.submit(prompts(1)[0], GREEDY)
    loop.close()
    loop.close()  # idempotent
    assert not loop._thread.is_alive()


def test_close_cancels_in_flight_requests(model):
    engine = Engine(model, num_blocks=64, block_size=8)
    loop = EngineLoop(engine)
    handle = loop.submit(prompts(1)[0], SamplingParams(temperature=0, max_new_tokens=90))
    next(handle)
    loop.close()
    assert handle.finish_reasons == ["cancelled"] and list(handle) == []
    assert engine.pool.allocator.num_free == 64 and not engine.has_work()


def test_asyncio_consumers_stream_concurrently(model):
    batch = prompts(6, seed=8)

    async def consume(loop, prompt, cancel_after=None):
        handle = loop.submit(prompt, LONG if cancel_after else GREEDY)
        got = []
        async for out in handle:
            got.append(out.token)
            if len(got) == cancel_after:
                handle.cancel()
        return got, handle.finish_reasons[0]

    async def main(loop):
        jobs = [consume(loop, p, cancel_after=2 if i == 0 else None) for i, p in enumerate(batch)]
        return await asyncio.gather(*jobs)

    engine = Engine(model, num_blocks=64, block_size=8)
    with EngineLoop(engine) as loop:
        results = asyncio.run(asyncio.wait_for(main(loop), timeout=30))
        stats = loop.drain(timeout=10)
    assert results[0] == (alone(model, batch[0], LONG)[:2], "cancelled")
    for prompt, (got, reason) in zip(batch[1:], results[1:], strict=True):
        assert reason == "length" and got == alone(model, prompt, GREEDY)
    assert stats.blocks_free == 64 and engine.stats.max_running > 1


def test_an_error_in_the_engine_thread_fails_requests_instead_of_hanging_them(model, monkeypatch):
    engine = Engine(model, num_blocks=32, block_size=8)

    def broken():
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "step", broken)
    with EngineLoop(engine) as loop:
        handle = loop.submit(prompts(1)[0], GREEDY)
        with pytest.raises(RuntimeError, match="device lost"):
            list(handle)
        assert handle.finish_reasons == ["error"] and loop.stats().failed == 1
        with pytest.raises(ShuttingDown, match="device lost"):
            loop.submit(prompts(1)[0], GREEDY)


def test_submit_refuses_a_bad_request_on_the_callers_thread(model):
    with EngineLoop(Engine(model, num_blocks=4, block_size=8)) as loop:
        with pytest.raises(ValueError, match="empty"):
            loop.submit([], GREEDY)
        with pytest.raises(ValueError, match="cannot fit the KV cache"):
            loop.submit(list(range(3, 40)), GREEDY)
        assert loop.stats().waiting == 0
