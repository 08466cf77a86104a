"""One engine, many consumers: `EngineLoop` owns an `Engine` on a background thread and streams each request's
outputs to whoever submitted it, from plain threads or asyncio tasks (an HTTP server streaming many requests at
once), as vLLM's AsyncLLMEngine does for its engine core.

    with EngineLoop(Engine(model, tokenizer=tok), max_waiting=64) as loop:
        handle = loop.submit(prompt_ids, SamplingParams(max_new_tokens=64, logprobs=2, prompt_logprobs=0))
        for out in handle:                          # blocks this thread only; `async for out in handle` in a task
            print(out.text, end="")
        handle.finish_reasons, handle.ttft, handle.token_times[0], handle.prompt_logprobs
        handle.cancel()                             # any time: frees its KV blocks (no-op once finished)
        loop.stats()                                # running, waiting, blocks free / total, finished, ...
        loop.drain()                                # refuse new requests, finish the others, return when idle

Only the loop's thread touches the engine. `submit` validates on the caller's thread (a bad request raises there,
for the server's 4xx) and queues the request; the thread adds queued requests and cancellations between steps,
steps while there is work and sleeps when there is none. Each request's outputs go to its handle as they are
sampled (the engine's per-request sink), so no consumer sees another's tokens, and a slow one holds up nobody.
Submitting past `max_waiting` requests not yet started raises QueueFull (HTTP 429); after `drain` or `close`,
submitting raises ShuttingDown (HTTP 503). A request runs on when its consumer stops listening (an asyncio task
cancelled when a client disconnects): a server calls `handle.cancel()` in a `finally` around its iteration.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass

from lmforge.config import UserError

from .engine import Engine, Output
from .sampling import SamplingParams, TokenLogprobs


class QueueFull(UserError):
    """max_waiting requests are already waiting to start: try again later (a server answers 429)."""

    status = 429


class ShuttingDown(UserError):
    """The loop is draining or closed and takes no new requests (a server answers 503)."""

    status = 503


@dataclass
class LoopStats:
    running: int  # requests started (a first token out) and not finished
    waiting: int  # submitted, not yet started
    blocks_free: int
    blocks_total: int
    finished: int  # requests that ended by a stop or the token limit
    cancelled: int
    failed: int  # ended by an error in the engine thread
    steps: int


class RequestHandle:
    """One submitted request: iterate it (from a thread, or `async for` in a task) for its `Output`s in order;
    what has come so far is also kept per sample (tokens, texts, logprobs, finish_reasons, token_times)."""

    def __init__(self, loop: EngineLoop, id: int, prompt: list[int], params: SamplingParams):
        self.loop, self.id, self.prompt, self.params = loop, id, prompt, params
        self.submitted = time.perf_counter()
        n = params.n
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.texts: list[str] = [""] * n
        self.logprobs: list[list[TokenLogprobs]] = [[] for _ in range(n)]  # when params.logprobs asks
        self.token_times: list[list[float]] = [[] for _ in range(n)]  # time.perf_counter() of each token
        self.finish_reasons: list[str | None] = [None] * n  # "stop" | "length" | "cancelled" | "error"
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None  # params.prompt_logprobs; [0] is None
        self.first_token_time: float | None = None
        self.error: BaseException | None = None
        self._cond = threading.Condition(loop._lock)
        self._unread: deque[Output] = deque()
        self._aio: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    # ---- what a server reports ----------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    @property
    def started(self) -> bool:
        return self.first_token_time is not None

    @property
    def ttft(self) -> float | None:
        """Seconds from submit to the first token (queueing included, as a client sees it)."""
        return None if self.first_token_time is None else self.first_token_time - self.submitted

    def cancel(self) -> None:
        """Stop now: iteration ends, and the loop frees the request's KV blocks before its next step."""
        self.loop._cancel(self)

    # ---- consuming ----------------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> Output:
        with self._cond:
            self._cond.wait_for(lambda: self._unread or self.done)
            return self._take(StopIteration)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Output:
        while True:
            with self._cond:
                if self._unread or self.done:
                    return self._take(StopAsyncIteration)
                if self._aio is None:
                    self._aio = (asyncio.get_running_loop(), asyncio.Event())
                event = self._aio[1]
                event.clear()  # under the lock: a delivery after this sets it again
            await event.wait()

    def result(self, timeout: float | None = None) -> RequestHandle:
        """Wait until every sample has ended (outputs not iterated stay readable in the fields above)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
            return self._raise_or(self)

    async def aresult(self) -> RequestHandle:
        async for _ in self:
            pass
        return self._raise_or(self)

    def _take(self, stop: type[Exception]) -> Output:
        if self._unread:
            return self._unread.popleft()
        self._raise_or(None)
        raise stop

    def _raise_or(self, value):
        if self.error is not None:
            raise self.error
        return value

    # ---- called by the loop's thread, holding the lock ----------------------------------------------------
    def _deliver(self, out: Output) -> bool:
        """Record one output; False when it was dropped (the request was cancelled while the step ran)."""
        i = out.index
        if self.finish_reasons[i] is not None:
            return False
        if self.first_token_time is None:
            self.first_token_time = out.time
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.tokens[i].append(out.token)
        self.texts[i] += out.text
        self.token_times[i].append(out.time)
        if out.logprobs is not None:
            self.logprobs[i].append(out.logprobs)
        self.finish_reasons[i] = out.finish_reason
        self._unread.append(out)
        self._wake()
        return True

    def _end(self, reason: str, error: BaseException | None = None) -> None:
        """Every unfinished sample ends with `reason`; iteration stops (after raising `error`, if any)."""
        self.finish_reasons = [r if r is not None else reason for r in self.finish_reasons]
        if error is not None:
            self.error = error
            self._unread.clear()
        if reason == "cancelled":
            self._unread.clear()  # a consumer who cancels wants nothing more
        self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        if self._aio is not None:
            aio_loop, event = self._aio
            try:
                aio_loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop is closed: nobody is waiting there any more
                self._aio = None


class EngineLoop:
    """An `Engine` driven by one background thread; see the module docstring."""

    def __init__(self, engine: Engine, *, max_waiting: int = 256, idle_wait: float = 0.5):
        if max_waiting < 1:
            raise UserError(f"max_waiting must be ≥ 1, got {max_waiting}")
        self.engine, self.max_waiting, self.idle_wait = engine, max_waiting, idle_wait
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the thread sleeps on it; submit, cancel and close wake it
        self._idle = threading.Condition(self._lock)  # drain waits on it
        self._inbox: list[RequestHandle] = []  # submitted, not yet added to the engine
        self._cancels: list[RequestHandle] = []
        self._live: dict[int, RequestHandle] = {}  # handle id -> handle, submitted and not ended
        self._engine_ids: dict[int, int] = {}  # handle id -> engine request id, once added
        self._ids = itertools.count()
        self._accepting, self._stopping = True, False
        self._failure: BaseException | None = None
        self._counts = {"finished": 0, "cancelled": 0, "failed": 0}
        self._snapshot = (0, engine.pool.allocator.num_free)  # (steps, blocks free) after the last step
        self._engine_busy = False  # the engine has work: written by the loop's thread, under the lock
        self._thread = threading.Thread(target=self._run, name="lmforge-engine-loop", daemon=True)
        self._thread.start()

    # ---- any thread -----------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request; returns its handle at once. Raises a UserError for a request that can never run,
        QueueFull past max_waiting, ShuttingDown after drain or close."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        self.engine.check_request(prompt, params)
        with self._lock:
            if self._failure is not None:
                raise ShuttingDown(f"the engine loop stopped after an error: {self._failure!r}")
            if not self._accepting:
                raise ShuttingDown("the engine is shutting down and takes no new requests")
            if self._waiting() >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting to start: try again later")
            handle = RequestHandle(self, next(self._ids), prompt, params)
            self._live[handle.id] = handle
            self._inbox.append(handle)
            self._work.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        handle.cancel()

    def stats(self) -> LoopStats:
        with self._lock:
            steps, free = self._snapshot
            live = [h for h in self._live.values() if not h.done]
            started = sum(h.started for h in live)
            return LoopStats(started, len(live) - started, free, self.engine.pool.num_blocks,
                             self._counts["finished"], self._counts["cancelled"], self._counts["failed"],
                             steps)  # fmt: skip

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (ShuttingDown); those in flight run on. `drain` also waits for them."""
        with self._lock:
            self._accepting = False
            self._work.notify()

    def drain(self, timeout: float | None = None) -> LoopStats:
        """Take no new requests; wait until those in flight have finished (and their blocks are freed)."""
        with self._lock:
            self._accepting = False
            self._work.notify()
            if not self._idle.wait_for(lambda: not self._busy(), timeout):
                raise TimeoutError(f"{len(self._live)} requests still running after {timeout} s")
        return self.stats()

    def close(self) -> None:
        """Cancel whatever is in flight and stop the thread (idempotent)."""
        with self._lock:
            self._accepting, self._stopping = False, True
            self._work.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> EngineLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            if handle.done:
                return
            handle._end("cancelled")
            self._cancels.append(handle)
            self._work.notify()

    def _waiting(self) -> int:
        return sum(not h.started for h in self._live.values() if not h.done)

    def _busy(self) -> bool:
        return bool(self._live or self._inbox or self._cancels or self._engine_busy)

    # ---- the loop's thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._tick():
                pass
        except BaseException as e:  # a bug or an exhausted device: fail every request instead of hanging them
            with self._lock:
                self._failure = e
                self._accepting = False
                for handle in list(self._live.values()):
                    handle._end("error", e)
                    self._counts["failed"] += 1
                self._live.clear()
                self._inbox, self._cancels, self._engine_busy = [], [], False
                self._idle.notify_all()

    def _tick(self) -> bool:
        """Apply what was queued, run one engine step; False when the loop is to stop."""
        engine = self.engine
        with self._lock:
            while not (self._inbox or self._cancels or self._stopping or engine.has_work()):
                self._idle.notify_all()
                self._work.wait(self.idle_wait)
            inbox, cancels, stopping = self._inbox, self._cancels, self._stopping
            self._inbox, self._cancels = [], []
        for handle in cancels:
            if handle.id in self._engine_ids:
                engine.cancel(self._engine_ids.pop(handle.id))
            self._retire(handle, "cancelled")
        for handle in inbox:
            if handle.done or stopping:  # cancelled before it reached the engine
                continue
            request = engine.add_request(handle.prompt, handle.params, sink=self._sink(handle))
            self._engine_ids[handle.id] = request.id
        if stopping:
            for request_id in self._engine_ids.values():
                engine.cancel(request_id)
            self._engine_ids.clear()
            with self._lock:
                for handle in list(self._live.values()):
                    handle._end("cancelled")
                    self._counts["cancelled"] += 1
                self._live.clear()
                self._snapshot = (engine.stats.steps, engine.pool.allocator.num_free)
                self._engine_busy = False
                self._idle.notify_all()
            return False
        if engine.has_work():
            engine.step()
        with self._lock:
            self._snapshot = (engine.stats.steps, engine.pool.allocator.num_free)
            self._engine_busy = engine.has_work()
            if not self._busy():
                self._idle.notify_all()
        return True

    def _sink(self, handle: RequestHandle):
        def deliver(out: Output) -> None:  # on the loop's thread, inside engine.step()
            with self._lock:
                if handle._deliver(out) and handle.done:
                    self._engine_ids.pop(handle.id, None)
                    if self._live.pop(handle.id, None) is not None:
                        self._counts["finished"] += 1

        return deliver

    def _retire(self, handle: RequestHandle, reason: str) -> None:
        with self._lock:
            if self._live.pop(handle.id, None) is not None:
                self._counts[reason] += 1
