"""`make demo` / `lmforge demo`: watch a model learn Python from the standard library in a few minutes.

prepare the stdlib corpus (BPE trained on the train split) → pretrain `configs/pretrain/tiny.yaml` →
samples for a few code prompts → a one-screen summary: the model's val bits per byte beside the token-unigram
floor, `xz -9` and `gzip -9` on each val file alone (the model also sees each file through its own context
window), and `xz -9` on the whole concatenated val split. Everything lands in `runs/demo/`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import time
from pathlib import Path

from lmforge.registry import command

PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef ", "class Stack:\n    def __init__(self", '"""Utilities for']


def compressor_bpb(val_docs: Path) -> dict[str, float]:
    """Bits per byte of xz -9 and gzip -9 on each val document alone, and of xz -9 on all of them joined."""
    docs = [json.loads(line)["text"].encode("utf-8") for line in val_docs.read_text(encoding="utf-8").splitlines()]
    raw = sum(len(d) for d in docs)
    per_file_xz = sum(len(lzma.compress(d, preset=9)) for d in docs)
    per_file_gz = sum(len(gzip.compress(d, compresslevel=9)) for d in docs)
    whole_xz = len(lzma.compress(b"".join(docs), preset=9))
    return {
        "xz -9, each file": 8 * per_file_xz / raw,
        "gzip -9, each file": 8 * per_file_gz / raw,
        "xz -9, whole val split": 8 * whole_xz / raw,
    }


def run_demo(data: str = "data/python-stdlib", config: str = "configs/pretrain/tiny.yaml",
             overrides: tuple[str, ...] = ()) -> dict[str, float]:  # fmt: skip
    from lmforge.config import load_config
    from lmforge.data.loader import TokenData
    from lmforge.data.prepare import PrepareConfig
    from lmforge.data.prepare import run as prepare
    from lmforge.train.artifacts import evaluate, sample
    from lmforge.train.pretrain import PretrainConfig
    from lmforge.train.pretrain import run as pretrain

    start = time.time()
    if not (Path(data) / "meta.json").exists():
        print(f"== 1/4 prepare the Python standard library corpus into {data}")
        prepare(load_config(PrepareConfig, None, [f"out={data}", "vocab_size=4096"]))
    else:
        print(f"== 1/4 corpus already prepared in {data}")
    cfg = load_config(PretrainConfig, config, [f"data={data}", "name=demo", *overrides])
    previous = Path(cfg.runs_dir) / "demo"
    if previous.exists():  # keep the last demo rather than refuse or delete it
        kept = previous.with_name(f"demo-{time.strftime('%Y%m%d-%H%M%S', time.localtime(previous.stat().st_mtime))}")
        previous.rename(kept)
        print(f"   (the previous runs/demo is now {kept})")
    print(f"== 2/4 pretrain {config} → runs/demo")
    run_dir = pretrain(cfg)
    print("== 3/4 samples (temperature 0.8, top-k 50)")
    for prompt in PROMPTS:
        print(f"--- prompt: {prompt!r}")
        print(prompt, end="")
        sample(run_dir.path, prompt, max_new_tokens=80, seed=0)
    print("== 4/4 compression of the held-out val split, bits per byte (lower is better)")
    token_data = TokenData(data)
    result = evaluate(run_dir.path, data)
    rows = {
        "lmforge tiny (this run)": result["val_bpb"],
        "token unigram (same tokenizer)": token_data.meta["unigram_bpb"],
    }
    rows.update(compressor_bpb(Path(data) / "val_docs.jsonl"))
    width = max(map(len, rows))
    for name, bpb in sorted(rows.items(), key=lambda kv: kv[1]):
        print(f"  {name:<{width}}  {bpb:.3f}")
    summary = {**rows, "val_loss": result["val_loss"], "minutes": (time.time() - start) / 60}
    (run_dir.path / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"run folder {run_dir.path}: config.yaml, metrics.jsonl, checkpoints/, loss.png, summary.json "
          f"({summary['minutes']:.1f} min)")  # fmt: skip
    return summary


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/python-stdlib", help="prepared corpus folder (made if missing)")
    p.add_argument("--config", default="configs/pretrain/tiny.yaml", help="pretraining recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.steps=100")


@command("demo", help="prepare the stdlib corpus, pretrain tiny, sample, compare with xz/gzip", arguments=_demo_args)
def demo(args: argparse.Namespace) -> None:
    run_demo(args.data, args.config, tuple(args.overrides))
