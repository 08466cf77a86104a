"""The server against the official `openai` client (lmforge/serve/app.py): completions and chat equal the engine's
own greedy generation, streaming with usage, echo log-probs equal a full forward's log-softmax, n and seeds, stop
strings, tokenize/detokenize, and every error status raised as the client's matching exception. Each server binds
127.0.0.1 on a free port, in a thread of this process.

    .venv/bin/pytest tests/serve/test_openai_api.py -q
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.engine_loop import EngineLoop  # noqa: E402
from lmforge.infer.generate import generate_stream  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402
from lmforge.serve.app import build_app  # noqa: E402
from lmforge.serve.server import DrainingServer  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

TEXT = "What is 2 + 3? It is 5. hello there, the quick brown fox. system user assistant"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_char([TEXT])


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=128, n_layer=2, d_model=32, n_head=4, position="rope",
                      ffn="swiglu", norm="rmsnorm", bias=False)  # fmt: skip
    return Transformer(cfg).eval()


@contextlib.contextmanager
def serving(model, tok, *, api_key=None, max_waiting=64, max_batch=8, rate=None, holder=None, against=None):
    """A server on a free 127.0.0.1 port in a thread; `rate` (a RateConfig) turns the rating page on; `holder`
    (a list) receives the server, which is the `lmforge serve` command's DrainingServer; `against` (a model) is
    the rating page's sample B."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = EngineLoop(Engine(model, tokenizer=tok, num_blocks=64, max_batch=max_batch), max_waiting=max_waiting)
    session = None
    if rate is not None:
        from lmforge.serve.rate import RateSession

        other = None
        if against is not None:
            from lmforge.serve.rate import Against

            other = Against(EngineLoop(Engine(against, tokenizer=tok, num_blocks=64, max_batch=max_batch)), tok)
        session = RateSession(loop, tok, rate, other)
    app = build_app(loop, tok, model_name="tiny", api_key=api_key, rate=session)
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"), loop)
    if holder is not None:
        holder.append(server)
    try:
        with in_thread(server):
            yield f"http://127.0.0.1:{port}", loop
    finally:
        loop.close()
        if session is not None and session.against is not None:
            session.against.loop.close()


@contextlib.contextmanager
def in_thread(server):
    """Run a uvicorn server in a daemon thread until the block ends."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(10)


def wait_healthy(url, timeout=120.0, proc=None):
    """Poll url/health until it answers 200 (a process started elsewhere: a replica, haproxy)."""
    deadline = time.time() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        assert time.time() < deadline and (proc is None or proc.poll() is None), f"{url} did not come up"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server(model, tok):
    with serving(model, tok) as (url, loop):
        yield url, loop


def client(url, key="none"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def greedy_text(model, tok, prompt_ids, n_tokens):
    params = SamplingParams(max_new_tokens=n_tokens, temperature=0, stop_ids=tok.stop_ids)
    ids = [t for t in generate_stream(model, prompt_ids, params) if t not in tok.stop_ids]
    return tok.decode(ids, skip_special=True)


def test_models_and_greedy_completion_equal_the_engine(server, model, tok):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list()] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="What is", max_tokens=12, temperature=0)
    assert r.choices[0].text == greedy_text(model, tok, tok.encode("What is"), 12)
    assert r.usage.prompt_tokens == len(tok.encode("What is")) and r.usage.completion_tokens >= 1
    batch = c.completions.create(model="tiny", prompt=["What is", "hello"], max_tokens=6, temperature=0)
    assert [ch.index for ch in batch.choices] == [0, 1]
    assert batch.choices[1].text == greedy_text(model, tok, tok.encode("hello"), 6)


def test_chat_streamed_equals_chat_whole_with_usage(server, model, tok):
    url, _ = server
    c = client(url)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    prompt = tok.render_chat(messages, add_generation_prompt=True)[0]
    assert whole.choices[0].message.content == greedy_text(model, tok, prompt, 10)
    assert whole.usage.prompt_tokens == len(prompt)
    stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_echo_logprobs_equal_a_full_forward(server, model, tok):
    url, _ = server
    prompt = tok.encode("the quick brown")
    r = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                       logprobs=1)  # fmt: skip
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 1 and lp.token_logprobs[0] is None
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt])).float(), -1)[0]
    expected = [float(full[i - 1, prompt[i]]) for i in range(1, len(prompt))]
    assert lp.token_logprobs[1 : len(prompt)] == pytest.approx(expected, abs=1e-4)
    assert r.choices[0].text.startswith("the quick brown") and len(lp.top_logprobs[1]) >= 1
    streamed = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                              stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices).startswith("the quick brown")
    chunks = [c for c in client(url).completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0,
                                                        echo=True, logprobs=1, stream=True) if c.choices]  # fmt: skip
    echoed = chunks[0].choices[0].logprobs  # the streamed echo carries the prompt's log-probs, as the whole one does
    assert chunks[0].choices[0].text == tok.decode(prompt) and echoed.token_logprobs[0] is None
    assert echoed.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)


def test_n_seeds_and_stop_strings(server):
    url, _ = server
    c = client(url)
    a = c.completions.create(model="tiny", prompt="hello", max_tokens=12, n=3, seed=7, temperature=1.0)
    b = c.completions.create(model="tiny", prompt="hello", max_tokens=12, n=3, seed=7, temperature=1.0)
    assert len(a.choices) == 3 and [x.text for x in a.choices] == [x.text for x in b.choices]
    other = c.completions.create(model="tiny", prompt="hello", max_tokens=12, n=3, seed=8, temperature=1.0)
    assert [x.text for x in other.choices] != [x.text for x in a.choices]
    first = a.choices[0].text
    stop = first[2:4]
    cut = c.completions.create(model="tiny", prompt="hello", max_tokens=12, seed=7, temperature=1.0, stop=[stop])
    assert stop not in cut.choices[0].text and first.startswith(cut.choices[0].text)
    assert cut.choices[0].finish_reason == "stop"


def test_tokenize_reads_special_tokens_and_detokenize_inverts(server, tok):
    url, _ = server
    out = httpx.post(f"{url}/tokenize", json={"prompt": "hi<|end|>"}).json()
    assert out["tokens"] == tok.encode("hi<|end|>", allow_special=True) and out["tokens"][-1] == tok.stop_ids[0]
    assert httpx.post(f"{url}/detokenize", json={"tokens": out["tokens"]}).json()["prompt"] == "hi<|end|>"


def test_errors_are_openai_shaped_with_the_clients_exceptions(server):
    url, _ = server
    c = client(url)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="other", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="hi", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="hi", max_tokens=1000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"temperature": "hot"})
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}], max_tokens=2)
    bad_json = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    ignored = c.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"no_such_field": 1})
    assert ignored.choices  # unknown fields are ignored, as OpenAI does


def test_the_key_is_checked(model, tok):
    with serving(model, tok, api_key="sekret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert [m.id for m in client(url, "sekret").models.list()] == ["tiny"]
        assert httpx.get(f"{url}/health").status_code == 200  # health needs no key


def test_a_full_queue_is_429_and_draining_is_503(model, tok):
    with serving(model, tok, max_waiting=1) as (url, loop):
        gate = threading.Event()
        step = loop.engine.step
        loop.engine.step = lambda: (gate.wait(10), step())[1]  # hold the engine: the first request stays waiting
        waiting = threading.Thread(target=lambda: client(url).completions.create(model="tiny", prompt="hi",
                                                                                 max_tokens=2))  # fmt: skip
        waiting.start()
        deadline = time.time() + 10
        while loop.stats().waiting + loop.stats().running < 1:
            assert time.time() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            client(url).completions.create(model="tiny", prompt="hello", max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
        gate.set()
        waiting.join(10)
        loop.drain(timeout=10)
        with pytest.raises(openai.InternalServerError) as e:
            client(url).completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert e.value.status_code == 503


def test_ctrl_c_drains_the_stream_in_flight_and_answers_new_requests_503(model, tok):
    holder = []
    with serving(model, tok, holder=holder) as (url, loop):
        step = loop.engine.step
        loop.engine.step = lambda: (time.sleep(0.02), step())[1]  # 40 tokens take ~1 s
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 40, "temperature": 1.0, "stream": True,
                "stop": "never-there", "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            events = [next(lines)]
            holder[0].handle_exit(signal.SIGINT, None)  # what Ctrl-C calls on the main thread
            refused = httpx.post(
                f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=10
            )
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        choices = [json.loads(e[6:])["choices"] for e in events[:-1]]
        assert choices[-1][0]["finish_reason"] == "length"  # the stream ran to its 40 tokens
        deadline = time.time() + 10
        while not holder[0].should_exit:  # drained: the server stops by itself
            assert time.time() < deadline
            time.sleep(0.02)


def test_tokenizer_info_is_what_lm_eval_reads(server, tok):
    url, _ = server
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == tok.id_to_token(tok.eos_id) and info["bos_token"] == tok.id_to_token(tok.bos_id)
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == 128
    # lm-eval's RemoteTokenizer finds each special id by tokenizing its string
    for name, token_id in (("eos_token", tok.eos_id), ("bos_token", tok.bos_id)):
        assert httpx.post(f"{url}/tokenize", json={"prompt": info[name]}).json()["tokens"] == [token_id]


def test_a_client_that_leaves_mid_stream_frees_its_blocks(server):
    url, loop = server
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 100, "temperature": 1.0, "stream": True,
            "stop": "never-there"}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        next(r.iter_lines())  # one event, then hang up
    deadline = time.time() + 10
    while (s := loop.stats()).blocks_free != s.blocks_total or s.running or s.waiting:
        assert time.time() < deadline, s
        time.sleep(0.02)


def penalised_greedy(model, prompt, n, presence, frequency, stops):
    """OpenAI's definition by brute force: full forward each step, logit[j] -= c[j]·frequency + (c[j] > 0)·presence
    over the tokens generated so far, argmax."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + out]))[0, -1].float()
            for j in set(out):
                logits[j] -= out.count(j) * frequency + presence
            out.append(int(logits.argmax()))
            if out[-1] in stops:
                break
    return out


def test_presence_and_frequency_penalties_as_openai_defines_them(server, model, tok):
    url, _ = server
    prompt = tok.encode("hello")
    expected = penalised_greedy(model, prompt, 16, 0.5, 1.5, tok.stop_ids)
    plain = penalised_greedy(model, prompt, 16, 0.0, 0.0, tok.stop_ids)
    assert expected != plain, "the penalties must change this greedy continuation"
    r = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, logprobs=0,
                                       presence_penalty=0.5, frequency_penalty=1.5)  # fmt: skip
    assert r.choices[0].logprobs.tokens == [tok.decode([t]) for t in expected]  # token by token (bytes: no text)
    params = SamplingParams(max_new_tokens=16, temperature=0, presence_penalty=0.5, frequency_penalty=1.5,
                            stop_ids=tok.stop_ids)  # fmt: skip
    assert list(generate_stream(model, prompt, params)) == expected  # the batch-1 path too
    with pytest.raises(openai.BadRequestError) as e:
        client(url).completions.create(model="tiny", prompt="hi", max_tokens=2, presence_penalty=3)
    assert e.value.body["param"] == "presence_penalty"


def test_a_taken_port_is_one_line_before_the_model_loads(capsys):
    from lmforge.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "no/such/model", "--port", str(port)]) == 2  # the port is checked first
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error: cannot listen on 127.0.0.1:") and "\n" not in err
