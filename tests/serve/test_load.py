"""A bounded load test of the server: 32 concurrent streaming clients, 10 of them hanging up mid-stream, with
malformed requests among them. Every valid request is answered to `[DONE]`, every bad one is a 4xx in OpenAI's
shape, nothing is a 500, and afterwards the KV pool is wholly free and /metrics counts what happened.

    .venv/bin/pytest tests/serve/test_load.py -q
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("uvicorn")
from test_openai_api import model, serving, tok  # noqa: E402, F401  (fixtures)

CLIENTS, LEAVERS = 32, 10
BAD = [
    (b"{not json", "bad JSON"),
    (json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": "16"}).encode(), "a string for an int"),
    (json.dumps({"model": "tiny", "prompt": "hi " * 400, "max_tokens": 8}).encode(), "a prompt past the context"),
    (json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": -3}).encode(), "negative max_tokens"),
    (json.dumps({"model": "tiny", "prompt": 7}).encode(), "a number for a prompt"),
    (json.dumps({"model": "tiny"}).encode(), "no prompt"),
    (json.dumps({"model": "tiny", "prompt": [[1, 2], "x"]}).encode(), "mixed prompt list"),
]


def test_concurrent_streams_leavers_and_malformed_requests(model, tok):  # noqa: F811
    with serving(model, tok, max_waiting=64, max_batch=8) as (url, loop):

        def stream(i: int):
            body = {"model": "tiny", "prompt": f"hello {i}", "max_tokens": 16, "temperature": 1.0, "seed": i,
                    "stream": True, "extra_field_ignored": True}  # fmt: skip
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                if r.status_code != 200:
                    return ("status", r.status_code)
                lines = []
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                    if i < LEAVERS and len(lines) == 1:
                        return ("left", None)  # hang up mid-stream
                return ("done", lines[-1])

        def bad(payload: bytes):
            r = httpx.post(f"{url}/v1/completions", content=payload, headers={"content-type": "application/json"},
                           timeout=60)  # fmt: skip
            return r.status_code, r.json()

        with ThreadPoolExecutor(max_workers=CLIENTS + len(BAD)) as pool:
            streams = [pool.submit(stream, i) for i in range(CLIENTS)]
            bads = [pool.submit(bad, payload) for payload, _ in BAD]
            results = [f.result(timeout=120) for f in streams]
            answers = [f.result(timeout=120) for f in bads]
        assert sum(r == ("left", None) for r in results) == LEAVERS
        assert all(r == ("done", "data: [DONE]") for r in results[LEAVERS:]), results
        for (status, body), (_, what) in zip(answers, BAD):
            assert 400 <= status < 500, (what, status, body)
            assert set(body["error"]) == {"message", "type", "param", "code"}, what
        deadline = time.time() + 20
        while (s := loop.stats()).blocks_free != s.blocks_total or s.running or s.waiting:
            assert time.time() < deadline, s
            time.sleep(0.05)
        while True:  # a leaver's response is counted when its stream's cleanup has run, a moment after it left
            text = httpx.get(f"{url}/metrics").text
            finished = sum(float(line.split()[-1]) for line in text.splitlines()
                           if line.startswith("lmforge_requests_total{"))  # fmt: skip
            if finished == CLIENTS or time.time() > deadline:
                break
            time.sleep(0.05)
        assert "lmforge_kv_blocks_used 0.0" in text and "lmforge_requests_waiting 0.0" in text
        assert finished == CLIENTS
        assert "lmforge_time_to_first_token_seconds_count" in text
