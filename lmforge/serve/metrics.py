"""`GET /metrics`: the server's state in Prometheus' text format (prometheus-client), for dashboards and for the
replica router, which reads these names:

| name | kind | what |
|---|---|---|
| `lmforge_requests_running` | gauge | requests that have their first token and are not finished |
| `lmforge_requests_waiting` | gauge | requests queued, no token yet |
| `lmforge_kv_blocks_used`, `lmforge_kv_blocks_total` | gauge | KV cache blocks in use, and in all |
| `lmforge_prefix_cache_hit_tokens_total` | counter | prompt tokens served from the prefix cache |
| `lmforge_prompt_tokens_total`, `lmforge_generation_tokens_total` | counter | tokens in, tokens out |
| `lmforge_requests_total{finish_reason}` | counter | ended requests: stop, length, cancelled, error |
| `lmforge_time_to_first_token_seconds` | histogram | submit to first token, queueing included |
| `lmforge_inter_token_latency_seconds` | histogram | between consecutive tokens of a sample |
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One registry per server (so two servers in one process, as in tests, do not share counters)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("lmforge_requests_running", "requests decoding", registry=r)
        self.waiting = Gauge("lmforge_requests_waiting", "requests queued, no token yet", registry=r)
        self.max_batch = Gauge("lmforge_max_batch", "requests the engine decodes at once (--max-batch)", registry=r)
        self.blocks_used = Gauge("lmforge_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.blocks_total = Gauge("lmforge_kv_blocks_total", "KV cache blocks in all", registry=r)
        self.prefix_hits = Gauge(
            "lmforge_prefix_cache_hit_tokens_total", "prompt tokens from the prefix cache", registry=r
        )  # fmt: skip  (a gauge that only grows: the engine keeps the count)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens", registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "generated tokens", registry=r)
        self.requests = Counter("lmforge_requests", "ended requests", ["finish_reason"], registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)  # fmt: skip
        self.itl = Histogram("lmforge_inter_token_latency_seconds", "inter-token latency", registry=r,
                             buckets=LATENCY_BUCKETS)  # fmt: skip

    def observe(self, handle) -> None:
        """Count an ended request (call once, when its response is done or its client has gone)."""
        self.prompt_tokens.inc(len(handle.prompt))
        for tokens, times, reason in zip(handle.tokens, handle.token_times, handle.finish_reasons):
            self.generation_tokens.inc(len(tokens))
            self.requests.labels(finish_reason=reason or "cancelled").inc()
            for a, b in zip(times, times[1:]):
                self.itl.observe(b - a)
        if handle.ttft is not None:
            self.ttft.observe(handle.ttft)

    def render(self, loop) -> bytes:
        stats = loop.stats()
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.blocks_total.set(stats.blocks_total)
        self.blocks_used.set(stats.blocks_total - stats.blocks_free)
        self.prefix_hits.set(loop.engine.stats.prefix_hit_tokens)
        return generate_latest(self.registry)
