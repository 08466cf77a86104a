"""README.md's tour block, run as written: every line in order, in one folder, each with tiny sizes appended
(options and overrides given later win), nothing left out. If the README changes, this test runs the new
lines; a line it has no tiny sizes for fails here until it gets some."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.max_seq_len=64"]
TINY_TRAIN = ["train.batch_size=2", "train.precision=fp32", "train.progress=false", "train.warmup_steps=1",
              "train.eval_every=2", "train.checkpoint_every=2", "eval.batches=1", "eval.batch_size=2"]  # fmt: skip
TINY_ALIGN = ["train.steps=2", "train.batch_size=2", "train.warmup_steps=1", "train.eval_every=2",
              "train.progress=false", "train.precision=fp32"]  # fmt: skip


def tour_lines() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## A short tour\n.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no tour block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def appended(argv: list[str], corpus: Path) -> tuple[list[str], str | None]:
    """The tiny sizes for one tour line, and its stdin."""
    head = argv[1:3] if argv[0] != "torchrun" else argv[2:5]
    resume = "--resume" in argv
    match head:
        case ["--help"]:
            return [], None
        case ["prepare", *_]:
            return ["--source", f"text:{corpus}", "--vocab-size", "320", "--out", "data/python-stdlib"], None
        case ["tokenizer", "train"]:
            return ["--source", f"text:{corpus}", "--vocab-size", "300"], None
        case ["pretrain", *_] | ["-m", "lmforge", "pretrain"]:
            if resume:
                return ["train.steps=6"], None
            return [*TINY_MODEL, *TINY_TRAIN, "train.steps=4"], None
        case ["sample", *_]:
            return ["--max-new-tokens", "5"], None
        case ["eval", *_]:
            if "--text" in argv:
                return ["--ctx", "16"], None
            return (["--n", "4", "--batch", "4"] if "--tasks" in argv else ["--batches", "1"]), None
        case ["chat", *_]:  # a person's lines, then the end of input
            return ["--max-new-tokens", "5"], "What is 1 + 1?\n/reset\nAnd 2 + 2?\n"
        case ["export", *_] | ["model-info", *_]:
            return [], None
        case ["generate", *_]:
            return ["--max-new-tokens", "12"], None
        case ["sft", *_]:
            return [*TINY_ALIGN, "n_train=40", "n_val=4"], None
        case ["prefs", "collect"]:  # a person's keys, one line each, for `rater=human`
            return ["rater=human-lines", "n_prompts=6", "batch_size=3", "max_new_tokens=3"], "a\nb\na\nb\na\nb\n"
        case ["reward", "train"] | ["dpo", *_]:
            return [*TINY_ALIGN, "val_fraction=0.34"], None
    raise AssertionError(f"README tour line without tiny sizes in {__file__}: {shlex.join(argv)}")


@pytest.fixture
def tour_folder(tmp_path, monkeypatch):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "README.md").symlink_to(REPO / "README.md")
    corpus = tmp_path / "corpus"
    for pkg in ("alpha", "beta", "gamma", "delta", "eps"):
        (corpus / pkg).mkdir(parents=True)
        (corpus / pkg / "m.py").write_text(
            "".join(f"def parse_{pkg}_{j}(x):\n    return x * {j} + 1\n\n\n" for j in range(60))
        )
    monkeypatch.chdir(tmp_path)
    return tmp_path, corpus


def test_the_readme_tour_runs_as_written(tour_folder, capsys, monkeypatch):
    import io

    root, corpus = tour_folder
    lines = tour_lines()
    assert any("--resume" in line for line in lines) and any('--stop "\\n\\n"' in line for line in lines)
    for line in lines:
        argv = shlex.split(line, comments=True)
        extra, stdin = appended(argv, corpus)
        if argv[0] == "torchrun":
            torchrun = Path(sys.executable).with_name("torchrun")
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run([str(torchrun), *argv[1:], *extra, "data=data/python-stdlib"], cwd=root, env=env,
                                  capture_output=True, text=True, timeout=300)  # fmt: skip
            assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
            continue
        assert argv[0] == "lmforge", line
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        try:
            status = main([*argv[1:], *extra])
        except SystemExit as e:  # --help
            status = e.code
        out = capsys.readouterr()
        assert status in (0, None), f"{line}\n{out.err[-3000:]}"
        if "--stop" in argv:  # stops before a blank line: the text it printed holds none
            assert "\n\n" not in out.out.split("def f(", 1)[-1].rstrip("\n"), out.out
    assert (root / "runs" / "mine" / "checkpoints" / "step_000006").is_dir()  # --resume went on to step 6
    assert (root / "exports" / "mine" / "model.safetensors").is_file()
    assert (root / "runs" / "dpo" / "config.yaml").is_file()
