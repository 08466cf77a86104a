"""The replica router (lmforge/serve/router.py) in front of real lmforge servers on 127.0.0.1: answers equal a
replica's own, policies route as they say, a dead replica before the first byte costs no request, draining
finishes what runs and sends new requests elsewhere. Replicas and the router run in threads of this process,
except in the kill test, where the replicas are `lmforge serve` processes and one is SIGKILLed mid-run.

    .venv/bin/pytest tests/serve/test_router.py -q
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from test_openai_api import client, in_thread, model, serving, tok, wait_healthy  # noqa: E402, F401  (fixtures)

from lmforge.serve.policies import make_policy  # noqa: E402
from lmforge.serve.replicas import free_port  # noqa: E402
from lmforge.serve.router import Router, build_router_app  # noqa: E402


@contextlib.contextmanager
def routing(backends, policy="round_robin", health_interval=0.2):
    router = Router(backends, make_policy(policy, backends), health_interval=health_interval)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_router_app(router), host="127.0.0.1", port=port, log_level="error"))
    with in_thread(server):
        yield f"http://127.0.0.1:{port}", router


def stream_text(url, body, headers=None):
    with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}, headers=headers, timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    return events


def sent(router):
    return {r.url: router.m_requests.labels(replica=r.url)._value.get() for r in router.replicas.values()}


@pytest.fixture(scope="module")
def two(model, tok):  # noqa: F811
    with serving(model, tok) as a, serving(model, tok) as b:
        yield a, b


def test_answers_through_the_router_equal_a_replicas_own(two):
    (url_a, _), (url_b, _) = two
    with routing([url_a, url_b]) as (url, router):
        body = {"model": "tiny", "prompt": "the quick brown", "max_tokens": 12, "temperature": 0}
        direct = client(url_a).completions.create(**body)
        for _ in range(2):  # round robin: once on each
            via = client(url).completions.create(**body)
            assert via.choices[0].text == direct.choices[0].text and via.usage == direct.usage
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0}
        assert (client(url).chat.completions.create(**chat).choices[0].message.content
                == client(url_b).chat.completions.create(**chat).choices[0].message.content)  # fmt: skip
        ours, theirs = stream_text(url, body), stream_text(url_a, body)
        strip = [json.loads(e[6:])["choices"] for e in ours[:-1]], [json.loads(e[6:])["choices"] for e in theirs[:-1]]
        assert strip[0] == strip[1] and ours[-1] == theirs[-1] == "data: [DONE]"  # the same events, in order
        assert [m.id for m in client(url).models.list()] == ["tiny"]  # passed to a replica
        with pytest.raises(openai.BadRequestError):  # a 4xx comes back as it is, not retried
            client(url).completions.create(model="tiny", prompt="hi", max_tokens=-1)
        assert sum(sent(router).values()) == 5  # 2 completions, a chat, a stream, the refused one
        metrics = httpx.get(f"{url}/metrics").text
        assert f'lmforge_router_requests_total{{replica="{url_a}"}}' in metrics
        # the health checks read each replica's batch (serving()'s max_batch=8) for cache_aware's spill
        assert router.policy.capacity == {url_a: 8, url_b: 8}


def test_32_concurrent_streams_through_the_router_all_finish(two):
    (url_a, _), (url_b, _) = two
    with routing([url_a, url_b], "least_loaded") as (url, router):
        body = {"model": "tiny", "max_tokens": 16, "ignore_eos": True}
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda i: stream_text(url, body | {"prompt": f"hello {i}"}), range(32)))
        assert all(a[-1] == "data: [DONE]" and len(a) >= 3 for a in answers)
        per = sent(router)
        assert sum(per.values()) == 32 and min(per.values()) >= 8, per  # least loaded spreads them
        assert all(r.in_flight == 0 for r in router.replicas.values())


def test_session_policy_keeps_each_conversation_on_one_replica(two):
    (url_a, _), (url_b, _) = two
    with routing([url_a, url_b], "session") as (url, router):
        where = {}
        for user in [f"user-{i}" for i in range(16)]:
            for turn in range(2):
                before = sent(router)
                client(url).completions.create(model="tiny", prompt=f"turn {turn}", max_tokens=2, user=user)
                (replica,) = [r for r, n in sent(router).items() if n != before[r]]
                assert where.setdefault(user, replica) == replica
        assert set(where.values()) == {url_a, url_b}  # 16 users spread over both


def test_a_dead_replica_costs_no_request_and_is_taken_out(two):
    (url_a, _), _ = two
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with routing([dead, url_a], "round_robin", health_interval=10) as (url, router):
        for _ in range(4):
            assert client(url).completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        replica = router.replicas[dead]
        assert not replica.healthy and replica.failures >= 1 and replica.next_check > time.monotonic()
        assert httpx.get(f"{url}/health").json()["replicas"] == [url_a]


def test_draining_a_replica_finishes_its_stream_and_sends_new_requests_elsewhere(two):
    loops = dict(two)
    with routing(list(loops), "least_loaded") as (url, router):
        steps = {u: lp.engine.step for u, lp in loops.items()}
        for u, lp in loops.items():  # a 40-token stream lasts ~1 s
            lp.engine.step = lambda step=steps[u]: (time.sleep(0.02), step())[1]
        try:
            body = {"model": "tiny", "prompt": "hello", "max_tokens": 40, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                (busy,) = [u for u in loops if router.replicas[u].in_flight == 1]
                (other,) = [u for u in loops if u != busy]
                assert httpx.post(f"{busy}/admin/drain").json() == {"status": "draining", "in_flight": 1}
                before = sent(router)
                for _ in range(3):  # the drained one answers 503 before any byte: each moves to the other
                    assert client(url).completions.create(model="tiny", prompt="hi", max_tokens=2).choices
                rest = [line for line in lines if line.startswith("data: ")]
            after = sent(router)
            assert after[other] - before[other] == 3
            assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
            assert httpx.get(f"{busy}/health").status_code == 503
        finally:
            for u, lp in loops.items():
                lp.engine.step = steps[u]
                lp._accepting = True  # the module's replicas serve the other tests


def test_router_drain_holds_one_backend_and_resume_brings_it_back(two):
    (url_a, _), (url_b, _) = two
    with routing([url_a, url_b]) as (url, router):
        assert httpx.post(f"{url}/admin/drain", json={"backend": url_a}).json()["status"] == "draining"
        before = sent(router)
        for _ in range(4):
            client(url).completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert sent(router)[url_a] == before[url_a] and sent(router)[url_b] == before[url_b] + 4
        assert httpx.post(f"{url}/admin/drain", json={"backend": "http://nowhere"}).status_code == 404
        httpx.post(f"{url}/admin/resume", json={"backend": url_a}).raise_for_status()
        for _ in range(4):
            client(url).completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert sent(router)[url_a] == before[url_a] + 2  # round robin over both again
        httpx.post(f"{url}/admin/drain").raise_for_status()  # the router itself
        with pytest.raises(openai.InternalServerError):
            client(url).completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert httpx.get(f"{url}/health").status_code == 503


def write_run(path, net, tokenizer):
    """A run folder `lmforge serve` reads: the tokenizer, the config and one checkpoint of `net`."""
    from lmforge.config import save_config
    from lmforge.train.checkpoint import save_checkpoint
    from lmforge.train.pretrain import PretrainConfig

    path.mkdir(parents=True)
    tokenizer.save(path)
    cfg = PretrainConfig(model=net.cfg)
    save_config(cfg, path / "config.yaml")
    save_checkpoint(path / "checkpoints", 1, net, {"step": 1})
    return path


def test_a_replica_killed_mid_run_loses_no_request_that_had_not_started_streaming(tok, tmp_path):  # noqa: F811
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=512, n_layer=4, d_model=192, n_head=4, position="rope",
                      ffn="swiglu", norm="rmsnorm", bias=False)  # fmt: skip
    run = write_run(tmp_path / "run", Transformer(cfg), tok)
    ports = [free_port(), free_port()]
    procs = [subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run), "--port", str(p), "--threads", "1",
                               "--max-batch", "2", "--served-model-name", "tiny"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in ports]  # fmt: skip
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for u, p in zip(urls, procs):
            wait_healthy(u, proc=p)
        with routing(urls, "round_robin", health_interval=0.2) as (url, router):
            body = {"model": "tiny", "prompt": "hello", "max_tokens": 300, "ignore_eos": True, "stream": True}
            killed_at, results = [None], {}

            def one(i):
                started, events = None, []
                try:
                    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                        for line in r.iter_lines():
                            if line.startswith("data: "):
                                started = started or time.time()
                                events.append(line)
                except httpx.HTTPError:
                    pass
                results[i] = (started, events[-1:] == ["data: [DONE]"])

            with ThreadPoolExecutor(16) as pool:
                futures = [pool.submit(one, i) for i in range(16)]
                deadline = time.time() + 60
                while router.replicas[urls[0]].in_flight < 8 and time.time() < deadline:
                    time.sleep(0.01)
                time.sleep(0.3)  # A streams 2 (max batch 2) and holds 6 waiting
                a_load = router.replicas[urls[0]].in_flight
                os.kill(procs[0].pid, signal.SIGKILL)
                killed_at[0] = time.time()
                for f in futures:
                    f.result(timeout=120)
        not_started = [i for i, (s, _) in results.items() if s is None or s > killed_at[0]]
        failed = [i for i, (_, ok) in results.items() if not ok]
        print(f"killed a replica holding {a_load} requests: {len(not_started)} of 16 not yet streaming, all "
              f"answered; {len(failed)} failed, every one already streaming")  # fmt: skip
        assert a_load == 8
        assert len(not_started) >= 2 + 8  # A's waiting ones and B's beyond its batch (or all of them)
        assert all(results[i][1] for i in not_started)  # none of them lost
        assert 1 <= len(failed) <= 2  # only what A was streaming when it died
        assert all(results[i][0] is not None and results[i][0] <= killed_at[0] for i in failed)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_serve_replicas_starts_k_replicas_behind_a_router_and_one_ctrl_c_stops_all(model, tok, tmp_path):  # noqa: F811
    run = write_run(tmp_path / "run", model, tok)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run), "--replicas", "2", "--threads", "1",
                             "--port", str(port), "--policy", "least_loaded"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        first = proc.stdout.readline()  # "2 replicas (1 thread each): URL, URL"
        assert first.startswith("2 replicas (1 thread each): "), first
        replicas = first.split(": ", 1)[1].strip().split(", ")
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc=proc)
        assert sorted(httpx.get(f"{url}/health").json()["replicas"]) == sorted(replicas)
        answer = client(url).completions.create(model="run", prompt="hi", max_tokens=3)
        assert answer.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        for r in replicas:  # the replicas are gone too
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"{r}/health", timeout=1)
    finally:
        proc.kill()
        proc.wait()


def test_a_replica_that_does_not_say_its_batch_is_not_taken_for_full():
    """A backend whose /metrics has no lmforge_max_batch (another server) has no capacity in the policy, so
    cache_aware never passes it over as full; an lmforge replica's capacity is read."""
    import asyncio

    def answer(request):
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        body = "lmforge_requests_running 1\n" + ("lmforge_max_batch 4\n" if request.url.host == "a" else "")
        return httpx.Response(200, text=body)

    router = Router(["http://a", "http://b"], make_policy("cache_aware", ["http://a", "http://b"]))

    async def check_both():
        router.client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        for replica in router.replicas.values():
            await router.check(replica)
        await router.client.aclose()

    asyncio.run(check_both())
    assert router.policy.capacity == {"http://a": 4}
