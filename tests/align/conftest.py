"""Shared fixtures of the post-training tests: a tiny char-level base run, chats and preference pairs."""

from __future__ import annotations

import json

import pytest

from lmforge.config import load_config


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
    """A tiny char-level model pretrained a few steps on text with digits and the chat words."""
    root = tmp_path_factory.mktemp("sft")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(f"What is {i} + {i + 1}? {2 * i + 1}\n" for i in range(300)))
    (corpus / "b.txt").write_text("".join(f"Reverse abc{i}: {str(i)[::-1]}cba\n" for i in range(300)))
    from lmforge.data.prepare import PrepareConfig
    from lmforge.data.prepare import run as prepare
    from lmforge.train.pretrain import PretrainConfig, run

    data = prepare(load_config(PrepareConfig, None, [f"source=text:{corpus}", f"out={root / 'data'}",
                                                      "tokenizer_kind=char", "val_fraction=0.3"]))  # fmt: skip
    overrides = [f"data={data}", f"runs_dir={root / 'runs'}", "name=base", "model.n_layer=2", "model.d_model=32",
                 "model.n_head=2", "model.max_seq_len=32", "model.position=rope", "model.ffn=swiglu",
                 "model.norm=rmsnorm", "model.bias=false", "train.steps=3", "train.batch_size=4",
                 "train.precision=fp32", "train.progress=false", "eval.batches=1", "eval.batch_size=2"]  # fmt: skip
    run(load_config(PretrainConfig, None, overrides))
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                                      {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                             for i in range(200)))  # fmt: skip
    pairs = root / "pairs.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(120)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, root / "runs" / "base", chats, pairs
