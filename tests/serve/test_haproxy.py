"""deploy/haproxy.cfg, as shipped, in front of two lmforge servers: 32 concurrent streaming clients through
Debian's haproxy all get their whole answer, both replicas share them (leastconn), and a drained replica stops
getting new requests (its /health is 503). Skipped only where `haproxy` is not installed (`.ci/run` installs it).

    .venv/bin/pytest tests/serve/test_haproxy.py -q
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("uvicorn")
from test_openai_api import model, serving, tok, wait_healthy  # noqa: E402, F401  (fixtures)

from lmforge.serve.replicas import free_port  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy.cfg"
pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")


def test_haproxy_config_serves_32_streams_over_two_replicas(model, tok):  # noqa: F811
    with serving(model, tok, max_batch=16) as (url_a, loop_a), serving(model, tok, max_batch=16) as (url_b, loop_b):
        port = free_port()
        env = os.environ | {"LMFORGE_BIND": f"127.0.0.1:{port}", "LMFORGE_REPLICA_1": url_a.removeprefix("http://"),
                            "LMFORGE_REPLICA_2": url_b.removeprefix("http://")}  # fmt: skip
        assert subprocess.run(["haproxy", "-c", "-f", str(CONFIG)], env=env, capture_output=True).returncode == 0
        proxy = subprocess.Popen(["haproxy", "-db", "-f", str(CONFIG)], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            front = f"http://127.0.0.1:{port}"
            wait_healthy(front, timeout=20, proc=proxy)

            def stream(i):
                body = {"model": "tiny", "prompt": f"request {i}", "max_tokens": 24, "ignore_eos": True, "stream": True}
                with httpx.stream("POST", f"{front}/v1/completions", json=body, timeout=60) as r:
                    return [line for line in r.iter_lines() if line.startswith("data: ")]

            finished = [loop_a.stats().finished, loop_b.stats().finished]
            with ThreadPoolExecutor(32) as pool:
                answers = list(pool.map(stream, range(32)))
            assert all(a[-1] == "data: [DONE]" for a in answers)
            shares = [loop_a.stats().finished - finished[0], loop_b.stats().finished - finished[1]]
            assert sum(shares) == 32 and min(shares) >= 8, shares  # both replicas took a share

            loop_b.stop_accepting()  # draining: /health 503, and haproxy takes it out within its checks
            time.sleep(2.5)
            before = loop_a.stats().finished
            with ThreadPoolExecutor(8) as pool:
                assert all(a[-1] == "data: [DONE]" for a in pool.map(stream, range(8)))
            assert loop_a.stats().finished - before == 8  # every new request went to the other replica
        finally:
            proxy.terminate()
            proxy.wait(10)
            loop_b._accepting = True
