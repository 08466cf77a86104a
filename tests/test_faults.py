"""Fault injection: every command that writes is killed (SIGKILL, no cleanup) right before its k-th file write,
and what the user had before is still intact and loadable.

The hook is lmforge.runs.count_write: every file lmforge writes is counted there, and with
LMFORGE_FAULT_AT_WRITE=k the process kills itself before the k-th. For each command a clean run first counts
its writes N, then k is drawn from 1..N with a fixed seed (LMFORGE_FAULT_SEED=... draws others). The commands
run in processes forked from a fork server that has imported torch once, so a case costs a fork, not a start.
Random-time kills of real training runs are in test_kill_a_real_run_at_random_times (make test-slow).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SEED = int(os.environ.get("LMFORGE_FAULT_SEED", "15"))
KILLS_PER_COMMAND = 3
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.max_seq_len=32", "train.batch_size=2",
        "train.precision=fp32", "train.progress=false", "eval.batches=1", "eval.batch_size=2",
        "train.warmup_steps=1", "train.eval_every=2"]  # fmt: skip


# ---- what each command does, run in the child ----------------------------------------------------------


def _cli(argv: list[str]) -> None:
    from lmforge.cli import main

    status = main(argv)
    assert status in (0, None), f"{argv}: exit {status}"


def act(case: str, root: Path) -> None:
    if case == "checkpoint":  # resume two more steps, a checkpoint after each
        _cli(["pretrain", f"runs_dir={root / 'runs'}", "name=r", "--resume", "train.steps=4",
              "train.checkpoint_every=1"])  # fmt: skip
    elif case == "export":
        _cli(["export", str(root / "runs" / "r"), "--out", str(root / "hf"), "--overwrite"])
    elif case == "prepare":
        _cli(["prepare", "--source", f"text:{root / 'corpus'}", "--out", str(root / "data"), "--char",
              "--val-fraction", "0.3", "--overwrite"])  # fmt: skip
    elif case == "tokenizer":
        _cli(["tokenizer", "train", "--source", f"text:{root / 'corpus'}", "--vocab-size", "300", "--out",
              str(root / "tok"), "--overwrite"])  # fmt: skip
    elif case == "prefs":
        _cli(["prefs", "collect", f"policy={root / 'runs' / 'r'}", "prompts=task:add:digits=1", "n_prompts=4",
              f"out={root / 'prefs.jsonl'}", "rater=program:add:digits=1", "max_new_tokens=2",
              "batch_size=1"])  # fmt: skip
    else:
        raise AssertionError(case)


def child(case: str, root: str, fault_at: int, count_file: str) -> None:
    """Runs in a forked process: the command, under LMFORGE_FAULT_AT_WRITE=fault_at (0: no fault)."""
    import io
    import sys

    import lmforge.runs as runs

    sys.stdout = sys.stderr = io.StringIO()  # a fork server's child has no terminal worth writing to
    os.environ[runs.FAULT_ENV] = str(fault_at) if fault_at else ""
    runs._writes_counted = 0
    act(case, Path(root))
    Path(count_file).write_text(str(runs._writes_counted))


# ---- the state before, and the check that it survived ------------------------------------------------


def _build_state(root: Path) -> None:
    from lmforge.cli import main

    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for i in range(5):
        (corpus / f"f{i}.txt").write_text("".join(f"What is {j} + {i}? {j + i}\n" for j in range(120)))
    assert main(["prepare", "--source", f"text:{corpus}", "--out", str(root / "data"), "--char", "--val-fraction",
                 "0.3"]) in (0, None)  # fmt: skip
    assert main(["pretrain", f"data={root / 'data'}", f"runs_dir={root / 'runs'}", "name=r", *TINY, "train.steps=2",
                 "train.checkpoint_every=1"]) in (0, None)  # fmt: skip
    assert main(["export", str(root / "runs" / "r"), "--out", str(root / "hf")]) in (0, None)
    (root / "hf" / "NOTES.md").write_text("mine, not export's")
    assert main(["tokenizer", "train", "--source", f"text:{corpus}", "--vocab-size", "300", "--out",
                 str(root / "tok")]) in (0, None)  # fmt: skip
    assert main(["prefs", "collect", f"policy={root / 'runs' / 'r'}", "prompts=task:add:digits=1", "n_prompts=2",
                 f"out={root / 'prefs.jsonl'}", "rater=program:add:digits=1", "max_new_tokens=2",
                 "batch_size=1"]) in (0, None)  # fmt: skip


def check_intact(case: str, root: Path, before: Path) -> None:
    """What the command was changing is loadable, and what it had no business touching is unchanged."""
    import torch

    from lmforge.infer.loading import load_for_inference

    ids = torch.tensor([[1, 2, 3]])
    if case == "checkpoint":
        from lmforge.runs import RunDir
        from lmforge.train.pretrain import PretrainConfig

        run = RunDir.open(root / "runs" / "r")
        assert (
            run.load_config(PretrainConfig).model
            == RunDir.open(before / "runs" / "r").load_config(PretrainConfig).model
        )
        run.read_metrics()
        model, _ = load_for_inference(run.path)  # the newest intact checkpoint
        assert torch.isfinite(model(ids)).all()
        _cli(["pretrain", f"runs_dir={root / 'runs'}", "name=r", "--resume", "train.steps=4"])  # and it resumes
    elif case == "export":
        model, tok = load_for_inference(root / "hf")
        assert torch.isfinite(model(ids)).all() and tok.decode(tok.encode("7 + 1")) == "7 + 1"
        assert (root / "hf" / "NOTES.md").read_text() == "mine, not export's"
    elif case == "prepare":
        from lmforge.data.loader import TokenData

        data, old = TokenData(root / "data"), TokenData(before / "data")
        assert len(data.train) == len(old.train) and len(data.val) == len(old.val)
    elif case == "tokenizer":
        from lmforge.tokenizer import Tokenizer

        tok = Tokenizer.load(root / "tok" / "tokenizer.json")
        assert tok.decode(tok.encode("What is 3 + 4? 7")) == "What is 3 + 4? 7"
    elif case == "prefs":
        from lmforge.align.preferences import read_records

        old = read_records(before / "prefs.jsonl")
        assert read_records(root / "prefs.jsonl")[: len(old)] == old
    # every other thing in the folder is as it was
    touched = {"checkpoint": "runs", "export": "hf", "prepare": "data", "tokenizer": "tok", "prefs": "prefs.jsonl"}
    for path in before.rglob("*"):
        rel = path.relative_to(before)
        if path.is_file() and rel.parts[0] != touched[case] and case != "checkpoint":
            assert (root / rel).read_bytes() == path.read_bytes(), rel


@pytest.fixture(scope="module")
def fork(tmp_path_factory):
    """A fork server with torch and lmforge imported, and the state every case starts from."""
    base = tmp_path_factory.mktemp("faults") / "before"
    _build_state(base)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "transformers.models.gpt2.modeling_gpt2",
                                    "transformers.models.llama.modeling_llama", "lmforge.cli", "lmforge.train.pretrain",
                                    "lmforge.model.hf", "lmforge.infer.loading", "lmforge.align.preferences",
                                    "lmforge.data.prepare", "test_faults"])  # fmt: skip
    return context, base


def _run(context, case: str, root: Path, fault_at: int) -> tuple[int, int | None]:
    count_file = root.parent / f"{root.name}.count"
    process = context.Process(target=child, args=(case, str(root), fault_at, str(count_file)))
    process.start()
    process.join(120)
    if process.is_alive():
        process.kill()
        raise AssertionError(f"{case} at write {fault_at} did not finish in 120 s")
    return process.exitcode, int(count_file.read_text()) if count_file.exists() else None


@pytest.mark.parametrize("case", ["checkpoint", "export", "prepare", "tokenizer", "prefs"])
def test_a_kill_at_any_write_leaves_the_previous_state_intact(case, fork, tmp_path):
    context, before = fork
    clean = tmp_path / "clean"
    shutil.copytree(before, clean, symlinks=True)
    status, writes = _run(context, case, clean, 0)
    assert status == 0 and writes, f"a clean {case} run failed (exit {status}) or wrote nothing"
    check_intact(case, clean, before)
    rng = random.Random(f"{SEED}-{case}")
    for k in sorted(rng.sample(range(1, writes + 1), min(KILLS_PER_COMMAND, writes))):
        root = tmp_path / f"kill-{k}"
        shutil.copytree(before, root, symlinks=True)
        status, _ = _run(context, case, root, k)
        assert status == -signal.SIGKILL, f"{case} was to be killed at write {k} of {writes}, exit {status}"
        check_intact(case, root, before)


@pytest.mark.slow
def test_kill_a_real_run_at_random_times(tmp_path):
    """SIGKILL a real `lmforge pretrain` at random moments: every time the run loads and resumes."""
    _build_state(tmp_path)
    rng = random.Random(SEED)
    code = "import sys; from lmforge.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "pretrain", f"runs_dir={tmp_path / 'runs'}", "name=r", "--resume",
            "train.steps=100000", "train.checkpoint_every=1", "train.log_every=1"]  # fmt: skip
    for _ in range(6):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(3.0, 8.0))  # torch's import takes ~3 s: some kills land in it, most in training
        proc.kill()
        proc.wait(30)
        check_intact("checkpoint", tmp_path, tmp_path)
