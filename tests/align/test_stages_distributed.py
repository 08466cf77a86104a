"""SFT, reward and DPO under torchrun (2 CPU ranks, gloo, DDP): the loop hands each rank its own parts of a step's
batch, so two ranks train on one process's batches — disjoint halves of them — and log its losses step for step
(after the first step this also says their updates were the same); GRPO and PPO refuse torchrun in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def lmforge(args: list[str], ranks: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*TORCHRUN, "-m", "lmforge"] if ranks == 2 else [sys.executable, "-m", "lmforge"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300)


def steps(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_two_ranks_log_the_losses_of_one_process(stage, base_run, tmp_path):
    root, base, chats, pairs = base_run
    command = ["reward", "train"] if stage == "reward" else [stage]
    common = [
        f"base={base}",
        f"data={chats if stage == 'sft' else pairs}",
        f"runs_dir={tmp_path}",
        "train.steps=3",
        "train.batch_size=8",
        "train.precision=fp32",
        "train.progress=false",
        "train.log_every=1",
        "train.eval_every=1000",
        "train.checkpoint_every=1000",
        "train.lr=3e-3",
        "train.warmup_steps=0",
    ]
    if stage == "sft":
        common += ["n_train=64", "n_val=8", "seq_len=32"]  # fmt: skip
    for name, ranks, extra in (("one", 1, []), ("two", 2, ["train.parallel=ddp"])):
        proc = lmforge([*command, *common, f"name={name}", *extra], ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    # the step's tokens over all ranks are one process's: each rank trained on its half (every rank used to take
    # the whole batch, which logs the same losses on twice the tokens); pairs are padded per part, so at most
    for a, b in zip(one, two):
        assert b["tokens"] == a["tokens"] if stage == "sft" else b["tokens"] <= a["tokens"]
    assert not (tmp_path / "unnamed").exists()  # the other rank opened the folder rank 0 made


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rl_stages_refuse_torchrun_in_one_line(stage, base_run, tmp_path):
    _, base, _, _ = base_run
    proc = lmforge([stage, f"base={base}", f"runs_dir={tmp_path}", "name=rl"], 2)
    assert proc.returncode != 0
    assert f"lmforge {stage} runs on one process" in proc.stderr
    assert "/lmforge/" not in proc.stderr  # one line from each rank; the only traceback is torchrun's own summary
    assert not (tmp_path / "rl").exists()
