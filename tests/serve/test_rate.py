"""The rating page's back end over HTTP (lmforge/serve/rate.py), without a browser: two raters at once, each with
their own progress and undo, both shown the same samples, and the agreement the page shows recomputed by hand;
`--rate-against`: sample A from the served model, B from the other, each equal to that model's own greedy reply.

    .venv/bin/pytest tests/serve/test_rate.py -q
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

pytest.importorskip("uvicorn")

from test_openai_api import model, serving, tok  # noqa: E402, F401  (fixtures)

from lmforge.align.agreement import cohens_kappa  # noqa: E402
from lmforge.align.pairs import load_pairs  # noqa: E402
from lmforge.align.preferences import pair_seeds  # noqa: E402
from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.engine_loop import EngineLoop  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.model import Transformer  # noqa: E402
from lmforge.serve.rate import RateConfig  # noqa: E402


def prompts_file(tmp_path, n=4):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?"}) + "\n" for i in range(n)))
    return path


def vote(url, rater, side):
    shown = httpx.get(f"{url}/rate/next", params={"rater": rater}, timeout=30).json()
    answer = httpx.post(f"{url}/rate/vote", json={"rater": rater, "prompt_index": shown["prompt_index"], "side": side})
    assert answer.json()["ok"], answer.text
    return shown


def test_two_raters_progress_undo_and_agreement(model, tok, tmp_path):  # noqa: F811
    out = tmp_path / "prefs.jsonl"
    with serving(model, tok, rate=RateConfig(str(prompts_file(tmp_path)), out, n_prompts=4, max_new_tokens=6)) as (
        url,
        _,
    ):
        seen = {"ann": [], "bob": []}
        for side_ann, side_bob in (("left", "left"), ("right", "left"), ("tie", "tie")):
            seen["ann"].append(vote(url, "ann", side_ann))
            seen["bob"].append(vote(url, "bob", side_bob))
        for a, b in zip(seen["ann"], seen["bob"]):  # one pair per prompt, whoever rates it
            assert (a["prompt_index"], a["left"], a["right"]) == (b["prompt_index"], b["left"], b["right"])
        assert httpx.post(f"{url}/rate/undo", json={"rater": "bob"}).json() == {"ok": True, "prompt_index": 2}
        ann = httpx.get(f"{url}/rate/next", params={"rater": "ann"}).json()
        bob = httpx.get(f"{url}/rate/next", params={"rater": "bob"}).json()
        assert (ann["rated"], ann["prompt_index"], bob["rated"], bob["prompt_index"]) == (3, 3, 2, 2)
        records = [json.loads(line) for line in out.read_text().splitlines()]
        labels = {r: {x["prompt_index"]: x["label"] for x in records if x["rater"] == f"human:{r}"} for r in seen}
        shared = sorted(set(labels["ann"]) & set(labels["bob"]))
        same = sum(labels["ann"][i] == labels["bob"][i] for i in shared)
        kappa = cohens_kappa([labels["ann"][i] for i in shared], [labels["bob"][i] for i in shared])
        (shown,) = ann["agreement"]
        assert shown["with"] == "human:bob" and (shown["n"], shown["same"]) == (len(shared), same) == (2, 1)
        assert shown["kappa"] == (None if kappa != kappa else pytest.approx(kappa, abs=1e-3))
        assert httpx.get(f"{url}/rate/next", params={"rater": "no spaces"}).status_code == 400
    assert len(load_pairs(out)) == 4  # two votes of each on a side are preferences; the tie is not one


def sampled(net, tokenizer, prompt, seed, temperature, n):
    """What a fresh engine of `net` samples with that seed: the pair's sample, had that model drawn it alone."""
    params = SamplingParams(max_new_tokens=n, temperature=temperature, seed=seed, stop_ids=tuple(tokenizer.stop_ids))
    with EngineLoop(Engine(net, tokenizer=tokenizer, num_blocks=64)) as loop:
        return loop.submit(prompt, params).result(timeout=30).texts[0]


def test_rate_against_samples_b_from_the_other_model(model, tok, tmp_path):  # noqa: F811
    torch.manual_seed(1)
    other = Transformer(model.cfg).eval()
    with torch.no_grad():
        other.lm_head.weight.mul_(100)  # sharp where the served model is near uniform: its samples differ
    out = tmp_path / "prefs.jsonl"
    cfg = RateConfig(str(prompts_file(tmp_path, 2)), out, n_prompts=2, temperature_a=1.0, temperature_b=1.0,
                     max_new_tokens=6, against="other")  # fmt: skip
    with serving(model, tok, rate=cfg, against=other) as (url, _):
        shown = vote(url, "ann", "left")
    record = json.loads(out.read_text())
    prompt = tok.render_chat([{"role": "user", "content": "What is 0 + 1?"}], add_generation_prompt=True)[0]
    seed_a, seed_b = pair_seeds(0, 0)
    assert record["completion_a"] == sampled(model, tok, prompt, seed_a, 1.0, 6)
    assert record["completion_b"] == sampled(other, tok, prompt, seed_b, 1.0, 6)
    assert record["completion_b"] != sampled(model, tok, prompt, seed_b, 1.0, 6)  # not the served model's
    assert record["rater_detail"]["model_b"] == "other"
    assert shown["left"] in (record["completion_a"], record["completion_b"])


def test_rate_against_without_prompts_is_one_line(capsys):
    from lmforge.cli import main

    assert main(["serve", "no/such/model", "--rate-against", "other/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--rate-prompts" in err and "\n" not in err


def test_replies_are_cut_to_the_context_and_a_prompt_past_it_is_a_400(model, tok, tmp_path):  # noqa: F811
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2 + 3?"}) + "\n" + json.dumps({"prompt": "hello " * 40}) + "\n")
    cfg = RateConfig(str(path), tmp_path / "prefs.jsonl", n_prompts=2, max_new_tokens=500)  # past the 128 context
    with serving(model, tok, rate=cfg) as (url, _):
        first = httpx.get(f"{url}/rate/next", timeout=30)
        assert first.status_code == 200 and first.json()["prompt_index"] == 0
        httpx.post(f"{url}/rate/vote", json={"prompt_index": 0, "side": "tie"}).raise_for_status()
        second = httpx.get(f"{url}/rate/next", timeout=30)
        assert second.status_code == 400 and "past the model's context" in second.json()["error"]["message"]
