"""The replica router: one OpenAI-compatible address in front of many `lmforge serve` replicas, routing each
request by a policy (`policies.py`), streaming the replica's answer through byte for byte.

    router = Router(["http://127.0.0.1:8001", "http://127.0.0.1:8002"], make_policy("cache_aware", urls))
    app = build_router_app(router)                     # what `lmforge router --backend URL ...` serves

Health: every replica's `/health` is checked every `health_interval` seconds (its `/metrics` read for the requests
it runs and queues); one that fails is taken out and checked again with exponential backoff (up to 30 s); one that
answers 503 is draining and gets no new requests. A request goes to another replica only while no byte of the answer
has reached the client (the router holds the answer until the replica's first byte) and never after a 4xx: a
refused connection, a 5xx, or a replica that dies before its first byte all move the request on; a replica that
dies mid-stream cuts that stream (its client sees the stream end without `[DONE]`). `POST /admin/drain` on the
router stops it taking requests; with `{"backend": URL}` it stops sending new ones to that replica only;
`POST /admin/resume` (with the same body) undoes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .metrics import LATENCY_BUCKETS
from .policies import Policy, Route
from .protocol import APIError

log = logging.getLogger("lmforge.router")
ROUTED = ("/v1/completions", "/v1/chat/completions")
PASSED = ("/tokenize", "/detokenize", "/tokenizer_info", "/v1/models")  # to any healthy replica
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}
MAX_BACKOFF = 30.0


@dataclass
class Replica:
    url: str
    healthy: bool = True  # answers /health (optimistic until the first check)
    draining: bool = False  # its /health answered 503: it is draining
    held: bool = False  # drained through the router's /admin/drain: no new requests from this router
    in_flight: int = 0  # the router's own count of requests it has there
    scraped: int = 0  # running + waiting from the replica's /metrics (other routers' work included)
    failures: int = 0
    next_check: float = 0.0

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining and not self.held

    @property
    def load(self) -> int:
        return max(self.in_flight, self.scraped)


def route_of(path: str, body: dict, session_header: str | None) -> Route:
    """The text a policy routes on: a completion's whole prompt; a chat's every message in order (the rendered
    conversation, as far as the router can render it without the model's template), so a growing history keeps
    its prefix."""
    if path.endswith("/chat/completions"):
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        parts = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else ""
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"<|{m.get('role', '') if isinstance(m, dict) else ''}|>{content or ''}")
        text = "".join(parts)
    else:
        prompt = body.get("prompt", "")
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    user = body.get("user") if isinstance(body.get("user"), str) else None
    return Route(text=text, session=session_header or user)


class Router:
    def __init__(self, backends: list[str], policy: Policy, *, health_interval: float = 1.0,
                 timeout: float = 600.0, session_header: str = "x-session-id"):  # fmt: skip
        self.replicas = {url.rstrip("/"): Replica(url.rstrip("/")) for url in backends}
        self.policy, self.health_interval, self.session_header = policy, health_interval, session_header.lower()
        self.timeout = timeout
        self.accepting = True
        self.client: httpx.AsyncClient | None = None
        r = self.registry = CollectorRegistry()
        self.m_requests = Counter("lmforge_router_requests", "requests sent", ["replica"], registry=r)
        self.m_errors = Counter("lmforge_router_errors", "failed sends and cut streams", ["replica"], registry=r)
        self.m_retries = Counter("lmforge_router_retries", "requests moved to another replica", registry=r)
        self.m_in_flight = Gauge("lmforge_router_in_flight", "requests in flight", ["replica"], registry=r)
        self.m_healthy = Gauge("lmforge_router_replica_routable", "1 when it gets new requests", ["replica"],
                               registry=r)  # fmt: skip
        self.m_ttft = Histogram("lmforge_router_time_to_first_byte_seconds", "request in to first byte out",
                                ["replica"], registry=r, buckets=LATENCY_BUCKETS)  # fmt: skip

    # ---- health -------------------------------------------------------------------------------------------
    async def check(self, replica: Replica) -> None:
        was_failed = not replica.healthy
        try:
            answer = await self.client.get(f"{replica.url}/health", timeout=2.0)
            replica.healthy = answer.status_code in (200, 503)
            replica.draining = answer.status_code == 503
            if answer.status_code == 200:
                metrics = (await self.client.get(f"{replica.url}/metrics", timeout=2.0)).text
                replica.scraped = _gauge(metrics, "lmforge_requests_running") + _gauge(
                    metrics, "lmforge_requests_waiting"
                )
                capacity = _gauge(metrics, "lmforge_max_batch")  # 0: the replica does not say (not an lmforge one)
                if capacity:
                    self.policy.capacity[replica.url] = capacity
                else:
                    self.policy.capacity.pop(replica.url, None)
        except httpx.HTTPError:
            replica.healthy = False
        if replica.healthy:
            replica.failures, replica.next_check = 0, time.monotonic() + self.health_interval
            if was_failed:  # it restarted: its KV cache is empty
                forget = getattr(self.policy, "forget", None)
                if forget:
                    forget(replica.url)
        else:
            self.failed(replica)

    def failed(self, replica: Replica) -> None:
        replica.healthy = False
        replica.failures += 1
        replica.next_check = time.monotonic() + min(MAX_BACKOFF, self.health_interval * 2 ** (replica.failures - 1))

    async def health_loop(self) -> None:
        while True:
            now = time.monotonic()
            due = [r for r in self.replicas.values() if r.next_check <= now]
            await asyncio.gather(*(self.check(r) for r in due))
            for r in self.replicas.values():
                self.m_healthy.labels(replica=r.url).set(int(r.routable))
            await asyncio.sleep(min(self.health_interval, 0.25))

    # ---- routing ------------------------------------------------------------------------------------------
    async def forward(self, path: str, request: Request) -> Response:
        if not self.accepting:
            raise APIError(503, "the router is draining and takes no new requests")
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            raise APIError(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        route = route_of(path, body, request.headers.get(self.session_header))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        start, tried = time.perf_counter(), set()
        while True:
            load = {r.url: r.load for r in self.replicas.values() if r.routable and r.url not in tried}
            if not load:
                raise APIError(503, "no replica can take the request now: try again later",
                               headers={"Retry-After": "1"})  # fmt: skip
            if tried:
                self.m_retries.inc()
            replica = self.replicas[self.policy.choose(route, load)]
            tried.add(replica.url)
            answer = await self._first_byte(replica, path, raw, headers, route)
            if answer is None:
                continue
            upstream, first = answer
            self.m_ttft.labels(replica=replica.url).observe(time.perf_counter() - start)
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            return StreamingResponse(self._relay(replica, upstream, first), status_code=upstream.status_code,
                                     headers=out_headers)  # fmt: skip

    async def _first_byte(self, replica: Replica, path, raw, headers, route):
        """(the replica's open answer, its first bytes), or None when the request should move on."""
        replica.in_flight += 1
        self.m_in_flight.labels(replica=replica.url).set(replica.in_flight)
        self.m_requests.labels(replica=replica.url).inc()
        upstream = None
        try:
            req = self.client.build_request("POST", f"{replica.url}{path}", content=raw, headers=headers,
                                            timeout=self.timeout)  # fmt: skip
            upstream = await self.client.send(req, stream=True)
            if upstream.status_code >= 500:  # draining (503) or broken: elsewhere, nothing was sent yet
                if upstream.status_code == 503:
                    replica.draining = True
                    replica.next_check = time.monotonic() + self.health_interval
                raise _MoveOn
            self.policy.routed(replica.url, route)
            chunks = upstream.aiter_raw()
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                first = b""
            return upstream, (first, chunks)
        except (_MoveOn, httpx.HTTPError) as e:
            if not isinstance(e, _MoveOn):
                self.m_errors.labels(replica=replica.url).inc()
                self.failed(replica)
            self._done(replica)
            if upstream is not None:
                await upstream.aclose()
            return None

    async def _relay(self, replica: Replica, upstream: httpx.Response, first):
        head, chunks = first
        try:
            if head:
                yield head
            async for chunk in chunks:
                yield chunk
        except httpx.HTTPError:  # the replica died mid-stream: the stream ends here
            self.m_errors.labels(replica=replica.url).inc()
            self.failed(replica)
        finally:
            await upstream.aclose()
            self._done(replica)

    def _done(self, replica: Replica) -> None:
        replica.in_flight -= 1
        self.m_in_flight.labels(replica=replica.url).set(replica.in_flight)

    async def passthrough(self, method: str, path: str, request: Request) -> Response:
        for replica in sorted(self.replicas.values(), key=lambda r: r.load):
            if not replica.routable:
                continue
            try:
                answer = await self.client.request(method, f"{replica.url}{path}", content=await request.body(),
                                                   headers={k: v for k, v in request.headers.items()
                                                            if k.lower() not in HOP_HEADERS}, timeout=30)  # fmt: skip
            except httpx.HTTPError:
                self.failed(replica)
                continue
            return Response(answer.content, status_code=answer.status_code,
                            media_type=answer.headers.get("content-type"))  # fmt: skip
        raise APIError(503, "no replica can take the request now: try again later", headers={"Retry-After": "1"})


class _MoveOn(Exception):
    """The replica refused before sending anything: try the next one."""


def _gauge(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    return 0


def build_router_app(router: Router) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        router.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256))
        health = asyncio.create_task(router.health_loop())
        try:
            yield
        finally:
            health.cancel()
            await router.client.aclose()

    app = FastAPI(title="lmforge router", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.router = router

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    for path in ROUTED:
        app.add_api_route(path, _routed(router, path), methods=["POST"])
    for path in PASSED:
        app.add_api_route(path, _passed(router, path), methods=["GET", "POST"])

    @app.get("/health")
    async def health():
        routable = [r.url for r in router.replicas.values() if r.routable]
        if not router.accepting or not routable:
            return JSONResponse({"status": "draining" if not router.accepting else "no replica"}, status_code=503)
        return {"status": "ok", "replicas": routable}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(router.registry), media_type="text/plain; version=0.0.4")

    @app.get("/admin/replicas")
    async def replicas():
        return [vars(r) | {"routable": r.routable, "load": r.load} for r in router.replicas.values()]

    async def backend_of(request: Request) -> Replica | None:
        """The replica an admin body names (`{"backend": URL}`), or None for the router itself (no body)."""
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise APIError(400, 'the body is not JSON: give {"backend": URL} or nothing') from None
        url = body.get("backend") if isinstance(body, dict) else None
        if url is None:
            return None
        replica = router.replicas.get(str(url).rstrip("/"))
        if replica is None:
            raise APIError(404, f"no backend {url!r}: the backends are {', '.join(router.replicas)}", param="backend")
        return replica

    @app.post("/admin/drain")
    async def drain(request: Request):
        """No new requests for the router (no body) or for one backend; what is in flight finishes."""
        replica = await backend_of(request)
        if replica is None:
            router.accepting = False
            return {"status": "draining", "in_flight": sum(r.in_flight for r in router.replicas.values())}
        replica.held = True
        return {"status": "draining", "backend": replica.url, "in_flight": replica.in_flight}

    @app.post("/admin/resume")
    async def resume(request: Request):
        """Undo /admin/drain: the router (no body) or one backend takes requests again."""
        replica = await backend_of(request)
        if replica is None:
            router.accepting = True
            return {"status": "ok"}
        replica.held = False
        return {"status": "ok", "backend": replica.url}

    return app


def _routed(router: Router, path: str):
    async def handler(request: Request):
        return await router.forward(path, request)

    return handler


def _passed(router: Router, path: str):
    async def handler(request: Request):
        return await router.passthrough(request.method, path, request)

    return handler
