"""lm-evaluation-harness (0.4.13, `local-completions` with `tokenizer_backend=remote`) against `lmforge serve`, on a
model trained here to score between 20% and 80%: 50 keys of which it has learnt 25 (the rest it can only guess).
Two local tasks over a JSONL this test writes (no download): multiple choice by log-likelihood (lm-eval sends
`echo, logprobs=1, max_tokens=1` and sums the echoed prompt's log-probs) and generate_until with exact match.
Every item's lm-eval result must equal lmforge's own scoring of it: the continuation log-likelihoods of a full
forward, and the greedy reply of `generate_stream`.

    .venv/bin/pytest tests/serve/test_lm_eval.py -q
"""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("uvicorn")

from test_openai_api import serving  # noqa: E402

from lmforge.infer.generate import generate_stream  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

COLOURS = ["red", "blue", "green", "gold"]
N_ITEMS, N_LEARNT = 50, 25


def items() -> list[dict]:
    rng = random.Random(0)
    keys = set()
    while len(keys) < N_ITEMS:
        keys.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3)))
    return [{"key": k, "gold": (g := rng.randrange(4)), "answer": COLOURS[g]} for k in sorted(keys)]


def prompt_of(item: dict) -> str:
    return f"Q: {item['key']} A:"


@pytest.fixture(scope="module")
def trained():
    """A small model that has learnt the first N_LEARNT items (full-batch AdamW, ~2 s on 2 cores)."""
    data = items()
    texts = [f"{prompt_of(it)} {it['answer']}\n" for it in data]
    tok = Tokenizer.train_char(texts)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=32, n_layer=2, d_model=64, n_head=4, position="rope",
                      ffn="swiglu", norm="rmsnorm", bias=False)  # fmt: skip
    model = Transformer(cfg)
    rows = [tok.encode(t) for t in texts[:N_LEARNT]]
    width = max(map(len, rows))
    batch = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])[:, 1:].bool()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[mask], batch[:, 1:][mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok, data


def write_tasks(folder, data) -> None:
    path = folder / "items.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in data))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n  cache_dir: {folder / 'cache'}\n"
              "test_split: test\ndoc_to_text: 'Q: {{key}} A:'\n")  # fmt: skip
    (folder / "keys_mc.yaml").write_text(
        f"task: lmforge_keys_mc\n{common}output_type: multiple_choice\ndoc_to_choice: {json.dumps(COLOURS)}\n"
        "doc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "keys_gen.yaml").write_text(
        f"task: lmforge_keys_gen\n{common}output_type: generate_until\ndoc_to_target: '{{{{answer}}}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        "filter_list:\n  - name: strip\n    filter:\n      - function: remove_whitespace\n"
        "      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n"
    )


@torch.no_grad()
def own_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """lmforge's own score: the continuation's summed log-probs in one full forward (tokenized as lm-eval does:
    the whole string, split at the context's length)."""
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    logp = torch.log_softmax(model(torch.tensor([whole])).double()[0], -1)
    return sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


def own_reply(model, tok, context: str) -> str:
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_ids=tok.stop_ids)
    ids = [t for t in generate_stream(model, tok.encode(context), params) if t not in tok.stop_ids]
    return tok.decode(ids, skip_special=True).split("\n")[0]


def test_lm_eval_scores_equal_lmforge_item_by_item(trained, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok, data = trained
    write_tasks(tmp_path, data)
    with serving(model, tok) as (url, _):
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"base_url={url}/v1/completions,model=tiny,tokenizer_backend=remote,tokenized_requests=True,"
            "num_concurrent=1,max_retries=1",
            tasks=["lmforge_keys_mc", "lmforge_keys_gen"],
            task_manager=TaskManager(include_path=str(tmp_path)),
            log_samples=True,
            cache_requests=False,
        )
    mc = sorted(out["samples"]["lmforge_keys_mc"], key=lambda s: s["doc_id"])
    gen = sorted(out["samples"]["lmforge_keys_gen"], key=lambda s: s["doc_id"])
    assert len(mc) == len(gen) == N_ITEMS
    for s in mc:
        item = data[s["doc_id"]]
        theirs = [r[0][0] for r in s["resps"]]  # per choice: (loglikelihood, is_greedy)
        ours = [own_loglikelihood(model, tok, prompt_of(item), " " + c) for c in COLOURS]
        assert theirs == pytest.approx(ours, abs=1e-4), item
        assert s["acc"] == float(max(range(4), key=ours.__getitem__) == item["gold"]), item
    for s in gen:
        item = data[s["doc_id"]]
        reply = own_reply(model, tok, prompt_of(item)).strip()
        assert s["filtered_resps"][0] == reply, item
        assert s["exact_match"] == float(reply == item["answer"]), item
    accuracy = out["results"]["lmforge_keys_mc"]["acc,none"]
    exact = out["results"]["lmforge_keys_gen"]["exact_match,strip"]
    print(f"lm-eval on lmforge serve: multiple choice acc {accuracy:.2f}, exact match {exact:.2f}")
    assert 0.2 <= accuracy <= 0.8 and 0.2 <= exact <= 0.8, (accuracy, exact)
