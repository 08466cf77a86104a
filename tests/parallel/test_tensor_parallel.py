"""Tensor parallelism (lmforge/parallel/tensor.py) on CPU ranks (gloo, torchrun): 2 ranks with train.parallel=tp
and 4 ranks with fsdp+tp (2 data-parallel groups of 2 tensor-parallel ranks) train 5 steps with the losses and the
final weights of one process; what the plan cannot split is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmforge.config import ConfigError
from lmforge.model import ModelConfig
from lmforge.parallel import check_tensor_parallel

WORKER = Path(__file__).with_name("tp_worker.py")


def train(out: Path, parallel: str, nproc: int, tied: bool, *extra: str) -> tuple[list[float], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, str(WORKER)] if nproc == 1 else [*torchrun, str(WORKER)]
    proc = subprocess.run([*cmd, str(out), parallel, "tied" if tied else "untied", *extra], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    last = sorted((out / "run" / "checkpoints").glob("step_*"))[-1]
    weights = load_file(last / "model.safetensors")
    if tied:  # one tensor, saved under either of its names (safetensors' choice, or the first one)
        if "lm_head.weight" in weights:
            weights["tok_emb.weight"] = weights.pop("lm_head.weight")
    return [r["loss"] for r in rows if "loss" in r], weights


@pytest.mark.parametrize(("parallel", "nproc", "tied"), [("tp", 2, False), ("tp", 2, True), ("fsdp+tp", 4, False)])
def test_tensor_parallel_training_equals_one_process(tmp_path, parallel, nproc, tied):
    one_losses, one_weights = train(tmp_path / "one", "none", 1, tied)
    losses, weights = train(tmp_path / parallel, parallel, nproc, tied)
    assert len(losses) == 5
    assert losses == pytest.approx(one_losses, abs=1e-5)
    assert weights.keys() == one_weights.keys()
    for name, w in one_weights.items():  # Adam's normalised steps (lr 1e-2) carry rounding differences further
        assert (weights[name] - w).abs().max().item() <= 1e-4, name


@pytest.mark.slow
@pytest.mark.parametrize(("parallel", "nproc"), [("none", 1), ("ddp", 2)])
def test_an_fsdp_tp_checkpoint_of_4_ranks_resumes_on_another_layout(tmp_path, parallel, nproc):
    """DCP reshards: 3 steps on a (2, 2) fsdp+tp mesh, then steps 4-5 on 2 DDP ranks or one process, give the
    losses and weights of 5 steps on one process."""
    straight_losses, straight_weights = train(tmp_path / "straight", "none", 1, False)
    train(tmp_path / "run", "fsdp+tp", 4, False, "3")
    losses, weights = train(tmp_path / "run", parallel, nproc, False, "5", "resume")
    assert losses[-2:] == pytest.approx(straight_losses[-2:], abs=1e-5)
    for name, w in straight_weights.items():
        assert (weights[name] - w).abs().max().item() <= 1e-4, name


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=64, max_seq_len=16, n_layer=1, d_model=32, n_head=4, n_kv_head=2, position="rope")
    return ModelConfig(**(base | kw))


@pytest.mark.parametrize(("kw", "says"), [
    (dict(n_kv_head=1), "n_kv_head=1 must both be divisible by tp=2"),
    (dict(vocab_size=63), "vocab_size=63 must be divisible"),
    (dict(position="alibi"), "position=alibi is not split"),
    (dict(qk_norm="full"), "use qk_norm=head"),
])  # fmt: skip
def test_what_the_plan_cannot_split_is_refused_in_one_line(kw, says):
    check_tensor_parallel(config(), 2)  # the base config splits
    with pytest.raises(ConfigError, match=says) as e:
        check_tensor_parallel(config(**kw), 2)
    assert "\n" not in str(e.value)
