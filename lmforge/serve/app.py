"""The OpenAI-compatible HTTP API on one `EngineLoop`: `/v1/models`, `/v1/completions`, `/v1/chat/completions`
(streamed as the openai client parses it), vLLM's `/tokenize`, `/detokenize` and `/tokenizer_info`, `/health`,
`/metrics` (Prometheus, `metrics.py`), a chat page at `/` (`pages/chat.html`) and, when asked, an A/B rating page
at `/rate` (`rate.py`, `pages/rate.html`).

    app = build_app(EngineLoop(Engine(model, tokenizer=tok)), tok, model_name="smollm2", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)          # what `lmforge serve MODEL` does

The engine runs on the loop's thread; each request is an asyncio task that submits its prompt and awaits its
tokens, so no request blocks another and none blocks the engine. A streaming client that goes away cancels its
request, which frees its KV blocks before the next step. Every error is OpenAI's shape (`protocol.APIError`): 400
for a bad field (with `param`), `context_length_exceeded`, 401, 404 `model_not_found`, 429 with Retry-After when
the queue is full, 503 while draining; 500 only for a bug.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from lmforge.config import UserError
from lmforge.infer.context import ContextLengthError, context_limit
from lmforge.infer.engine_loop import EngineLoop, QueueFull, RequestHandle, ShuttingDown
from lmforge.infer.sampling import SamplingError, SamplingParams

from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, DetokenizeRequest, Sampling, TokenizeRequest

log = logging.getLogger("lmforge.serve")
PAGES = resources.files("lmforge.serve") / "pages"  # plain HTML + JS, shipped in the package
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


def build_app(loop: EngineLoop, tokenizer, *, model_name: str, api_key: str | None = None, rate=None) -> FastAPI:
    """The server's app; `rate` (a `rate.RateSession`) turns on the A/B rating page at /rate."""
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None)
    limit = context_limit(loop.engine.cfg) or loop.engine.pool.capacity_tokens
    metrics = Metrics()
    metrics.max_batch.set(loop.engine.max_batch)  # a router reads it: past it, a request waits for a slot
    app.state.loop, app.state.tokenizer, app.state.model_name, app.state.metrics = loop, tokenizer, model_name, metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body" and not isinstance(p, int)]
        message = first.get("msg", "invalid request")
        param = where[0] if where else None
        return JSONResponse(APIError(400, f"{param + ': ' if param else ''}{message}", param=param).body(), 400)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        log.exception("internal error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}").body(), status_code=500)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith(("/v1", "/admin")):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                body = APIError(401, "invalid API key: give it as 'Authorization: Bearer KEY'", code="invalid_api_key")
                return JSONResponse(body.body(), status_code=401)
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    def params_of(req: Sampling, max_tokens: int | None, prompt_len: int, field: str, **extra) -> SamplingParams:
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{field} must be ≥ 1, got {max_tokens}", param=field)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        try:
            return SamplingParams(max_new_tokens=max_tokens or max(limit - prompt_len, 1), temperature=req.temperature,
                                  top_p=req.top_p, top_k=max(req.top_k, 0), min_p=req.min_p, n=req.n, seed=req.seed,
                                  presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                  ignore_eos=req.ignore_eos,
                                  stop=stop, stop_ids=tuple(tokenizer.stop_ids), **extra)  # fmt: skip
        except SamplingError as e:
            name = {"max_new_tokens": field, "prompt_logprobs": "logprobs"}.get(e.field, e.field)
            raise APIError(400, f"{name} {e.requirement}", param=name) from None

    def submit(prompt: list[int], params: SamplingParams, field: str) -> RequestHandle:
        try:
            return loop.submit(prompt, params)
        except ContextLengthError as e:
            raise APIError(400, str(e), param=field, code="context_length_exceeded") from None
        except QueueFull as e:
            raise APIError(429, str(e), headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e)) from None
        except UserError as e:
            raise APIError(400, str(e), param=field) from None

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(PAGES.joinpath("chat.html").read_text(encoding="utf-8"))

    def rating():
        if rate is None:
            raise APIError(404, "the rating page is off: start the server with --rate-prompts SPEC")
        return rate

    @app.get("/rate", response_class=HTMLResponse)
    async def rate_page():
        rating()
        return HTMLResponse(PAGES.joinpath("rate.html").read_text(encoding="utf-8"))

    def rater_of(name) -> str:
        from .rate import rater_id

        try:
            if name is not None and not isinstance(name, str):
                raise ValueError("rater must be a name")
            return rater_id(name)
        except ValueError as e:
            raise APIError(400, str(e), param="rater") from None

    @app.get("/rate/next")
    async def rate_next(rater: str | None = None):
        try:
            return await rating().next_pair(rater_of(rater))
        except UserError as e:  # a prompt the model cannot take: one line, not a 500
            raise APIError(400, str(e), param="prompt") from None

    @app.post("/rate/vote")
    async def rate_vote(request: Request):
        body = await request.json()
        side, index = body.get("side"), body.get("prompt_index")
        if side not in ("left", "right", "tie", "both_bad", "skip") or not isinstance(index, int):
            raise APIError(400, "give prompt_index and side: left, right, tie, both_bad or skip", param="side")
        return await rating().vote(rater_of(body.get("rater")), index, side)

    @app.post("/rate/undo")
    async def rate_undo(request: Request):
        body = await request.json() if await request.body() else {}
        return await rating().undo(rater_of(body.get("rater")))

    @app.get("/health")
    async def health():  # 503 while draining: routers and load balancers stop sending new requests here
        if not loop.accepting:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.post("/admin/drain")
    async def admin_drain():
        """Take no new requests (503), let those in flight finish; then this replica can be stopped."""
        loop.stop_accepting()
        stats = loop.stats()
        return {"status": "draining", "in_flight": stats.running + stats.waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(loop), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "lmforge", "max_model_len": limit}
        return {"object": "list", "data": [card]}

    # ---- completions --------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        prompts = _prompt_ids(req.prompt, tokenizer)
        extra = {}
        if req.logprobs is not None:
            extra["logprobs"] = req.logprobs
            if req.echo:
                extra["prompt_logprobs"] = req.logprobs
        handles: list[RequestHandle] = []
        try:
            for p in prompts:
                handles.append(submit(p, params_of(req, req.max_tokens, len(p), "max_tokens", **extra), "prompt"))
        except APIError:  # one prompt refused: the others of the request must not run on for nobody
            for h in handles:
                h.cancel()
            raise
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            return _stream(
                metrics,
                handles,
                req,
                lambda i, h, out: _completion_chunk(rid, created, model_name, i, out, tokenizer),
                "text_completion",
                first=(lambda h, i: _echo_chunk(rid, created, model_name, i, h, tokenizer, req.logprobs is not None))
                if req.echo
                else None,
                first_after_prefill=req.echo and req.logprobs is not None,  # the prompt's log-probs come with it
            )
        try:
            done = [await h.aresult() for h in handles]
        finally:
            for h in handles:
                h.cancel()
                metrics.observe(h)
        choices = []
        for p, h in enumerate(done):
            for i in range(h.params.n):
                text = h.texts[i]
                logprobs = None
                if req.logprobs is not None:
                    logprobs = _completion_logprobs(h, i, tokenizer, req.echo)
                if req.echo:
                    text = tokenizer.decode(h.prompt) + text
                choices.append({"index": p * h.params.n + i, "text": text, "logprobs": logprobs,
                                "finish_reason": FINISH[h.finish_reasons[i]]})  # fmt: skip
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": choices,
                "usage": _usage(done)}  # fmt: skip

    # ---- chat ---------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        check_model(req.model)
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in req.messages]
        try:
            prompt = tokenizer.render_chat(messages, add_generation_prompt=True)[0]
        except (UserError, ValueError) as e:  # lmforge's own template raises ValueError on a bad role
            raise APIError(400, str(e), param="messages") from None
        extra = {"logprobs": req.top_logprobs or 0} if req.logprobs else {}
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        handle = submit(prompt, params_of(req, max_tokens, len(prompt), field, **extra), "messages")
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            return _stream(
                metrics,
                [handle],
                req,
                lambda i, h, out: _chat_chunk(rid, created, model_name, out, req, tokenizer),
                "chat.completion.chunk",
                first=lambda h, i: _chat_first(rid, created, model_name, i),
            )
        try:
            await handle.aresult()
        finally:
            handle.cancel()
            metrics.observe(handle)
        choices = []
        for i in range(handle.params.n):
            logprobs = (
                {"content": [_chat_logprob(lp, tokenizer) for lp in handle.logprobs[i]]} if req.logprobs else None
            )
            choices.append({"index": i, "message": {"role": "assistant", "content": handle.texts[i]},
                            "logprobs": logprobs, "finish_reason": FINISH[handle.finish_reasons[i]]})  # fmt: skip
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name, "choices": choices,
                "usage": _usage([handle])}  # fmt: skip

    # ---- tokenizer ----------------------------------------------------------------------------------------
    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give prompt or messages", param="prompt")
        if req.prompt is not None:
            tokens = tokenizer.encode(req.prompt, allow_special=True)  # special-token strings are their single ids
            if req.add_special_tokens and getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None:
                tokens = [tokenizer.bos_id, *tokens]  # as the model's HF tokenizer would (Llama 3 adds BOS)
        else:
            messages = [{"role": m.role, "content": _text_of(m.content)} for m in req.messages]
            tokens = tokenizer.render_chat(messages, add_generation_prompt=True)[0]
        return {"count": len(tokens), "max_model_len": limit, "tokens": tokens}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return _tokenizer_info(tokenizer, limit)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        try:
            return {"prompt": tokenizer.decode(req.tokens)}
        except ValueError as e:
            raise APIError(400, str(e), param="tokens") from None

    return app


def _tokenizer_info(tokenizer, limit: int) -> dict:
    """vLLM's /tokenizer_info: the tokenizer_config fields a remote client rebuilds the tokenizer's behaviour from
    (lm-evaluation-harness's `tokenizer_backend=remote` reads the special tokens and the chat template here)."""

    def name(token_id: int | None) -> str | None:
        return None if token_id is None else tokenizer.id_to_token(token_id)

    return {"tokenizer_class": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size,
            "model_max_length": limit, "bos_token": name(tokenizer.bos_id), "eos_token": name(tokenizer.eos_id),
            "pad_token": name(tokenizer.pad_id), "add_bos_token": bool(getattr(tokenizer, "add_bos", False)),
            "chat_template": getattr(tokenizer, "chat_template", None),
            "stop_tokens": [tokenizer.id_to_token(i) for i in tokenizer.stop_ids]}  # fmt: skip


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = [p.get("text") for p in content if p.get("type") == "text"]
    if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
        raise APIError(400, "only text content parts are supported", param="messages")
    return "".join(parts)


def _prompt_ids(prompt, tokenizer) -> list[list[int]]:
    """A completion's prompt(s) as token ids: a string (special-token strings read as such, as a completion prompt
    is), a list of strings, a list of ids, or a list of id lists."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, list) for p in prompts):
        bad = [t for p in prompts for t in p if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary", param="prompt")
        return [list(p) for p in prompts]
    return [tokenizer.encode(p, allow_special=True) for p in prompts]


def _usage(handles: list[RequestHandle]) -> dict:
    prompt = sum(len(h.prompt) for h in handles)
    completion = sum(len(t) for h in handles for t in h.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(h: RequestHandle, i: int, tokenizer, echo: bool) -> dict:
    entries = []
    if echo:
        entries += [(t, h.prompt_logprobs[j] if h.prompt_logprobs else None) for j, t in enumerate(h.prompt)]
    entries += [(lp.token, lp) for lp in h.logprobs[i]]
    return _logprob_table(tokenizer, entries)


def _logprob_table(tokenizer, entries: list) -> dict:
    """OpenAI's completions `logprobs` object of (token id, TokenLogprobs or None for the first prompt token)."""
    tokens = [tokenizer.decode([t]) for t, _ in entries]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0)) if tokens else []
    return {"tokens": tokens, "token_logprobs": [lp.logprob if lp else None for _, lp in entries],
            "top_logprobs": [({tokenizer.decode([a]): b for a, b in lp.top} if lp else None) for _, lp in entries],
            "text_offset": offsets}  # fmt: skip


def _chat_logprob(lp, tokenizer) -> dict:
    def entry(token: int, logprob: float) -> dict:
        # a token may hold part of a character: its own bytes, not those of its lossy text
        return {"token": tokenizer.decode([token]), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}

    return entry(lp.token, lp.logprob) | {"top_logprobs": [entry(a, b) for a, b in lp.top]}


def _completion_chunk(rid, created, model, base, out, tokenizer) -> dict | None:
    if not out.text and out.finish_reason is None:
        return None
    logprobs = _logprob_table(tokenizer, [(out.logprobs.token, out.logprobs)]) if out.logprobs is not None else None
    choice = {"index": base + out.index, "text": out.text, "logprobs": logprobs,
              "finish_reason": FINISH.get(out.finish_reason) if out.finish_reason else None}  # fmt: skip
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def _echo_chunk(rid, created, model, index, h: RequestHandle, tokenizer, logprobs: bool) -> dict:
    """A streamed completion's echoed prompt; with `logprobs`, its per-token log-probs too (first entry null)."""
    table = None
    if logprobs:
        table = _logprob_table(tokenizer, [(t, h.prompt_logprobs[j] if h.prompt_logprobs else None)
                                           for j, t in enumerate(h.prompt)])  # fmt: skip
    choice = {"index": index, "text": tokenizer.decode(h.prompt), "logprobs": table, "finish_reason": None}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def _chat_first(rid, created, model, index) -> dict:
    delta = {"role": "assistant", "content": ""}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}  # fmt: skip


def _chat_chunk(rid, created, model, out, req, tokenizer) -> dict | None:
    if not out.text and out.finish_reason is None:
        return None
    logprobs = {"content": [_chat_logprob(out.logprobs, tokenizer)]} if req.logprobs and out.logprobs else None
    choice = {"index": out.index, "delta": {"content": out.text} if out.text else {}, "logprobs": logprobs,
              "finish_reason": FINISH.get(out.finish_reason) if out.finish_reason else None}  # fmt: skip
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def _stream(metrics, handles: list[RequestHandle], req, chunk_of, kind: str, first=None,
            first_after_prefill: bool = False) -> StreamingResponse:  # fmt: skip
    """Server-sent events as the openai client parses them: (the role chunk or the echoed prompt,) one chunk per
    text delta, the finish_reason chunk, the usage chunk when stream_options.include_usage, then `data: [DONE]`.
    `first_after_prefill`: a choice's first chunk waits for its first output (the prompt's log-probs are known
    once the prompt is in)."""

    async def events() -> AsyncIterator[bytes]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, handle: RequestHandle):
            try:
                async for out in handle:
                    await queue.put((i, handle, out))
            finally:
                await queue.put((i, handle, None))

        tasks = [asyncio.create_task(pump(i * h.params.n, h)) for i, h in enumerate(handles)]
        try:
            pending = set()  # (base, index) of the choices whose first chunk waits for their first output
            if first is not None:  # the chat role chunk, or a completion's echoed prompt, per choice
                for k, h in enumerate(handles):
                    for i in range(h.params.n):
                        if first_after_prefill:
                            pending.add((k * h.params.n, i))
                        else:
                            yield _event(first(h, k * h.params.n + i))
            open_ = len(tasks)
            while open_:
                base, handle, out = await queue.get()
                if out is None:
                    open_ -= 1
                    continue
                if (base, out.index) in pending:
                    pending.discard((base, out.index))
                    yield _event(first(handle, base + out.index))
                chunk = chunk_of(base, handle, out)
                if chunk is not None:
                    yield _event(chunk)
            for h in handles:
                if h.error is not None:
                    raise h.error
            if req.stream_options is not None and req.stream_options.include_usage:
                last = {"id": "usage", "object": kind, "created": int(time.time()), "model": req.model,
                        "choices": [], "usage": _usage(handles)}  # fmt: skip
                yield _event(last)
            yield b"data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free every request's KV blocks now
            for h in handles:
                h.cancel()
                metrics.observe(h)
            for t in tasks:
                t.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()
