"""Data parallel on 2 CPU ranks (gloo, torchrun): disjoint samples, the same losses as one process with the
same global batch, and a sharded (DCP) checkpoint from 2 ranks that resumes on 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_worker.py")


def launch(out: Path, parallel: str, steps: int, nproc: int, resume: bool = False) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER)]
    proc = subprocess.run(
        [*cmd, str(out), parallel, str(steps), "resume" if resume else "fresh"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, parallel):
    single = launch(tmp_path / "one", "none", 3, 1)[0]
    ranks = launch(tmp_path / parallel, parallel, 3, 2)
    a, b = (set(map(tuple, r["seen"])) for r in ranks)
    assert not a & b  # disjoint rows of every global batch
    assert a | b == set(map(tuple, single["seen"]))  # together: exactly one process's batches
    for step in range(3):
        mean_of_ranks = (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2
        assert mean_of_ranks == pytest.approx(single["losses"][step], abs=1e-5)


def test_fsdp_checkpoint_from_two_ranks_resumes_on_one(tmp_path):
    launch(tmp_path, "fsdp", 2, 2)  # saves a DCP checkpoint at step 2
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / "dcp").is_dir()
    resumed = launch(tmp_path, "none", 3, 1, resume=True)[0]
    straight = launch(tmp_path / "straight", "none", 3, 1)[0]
    assert resumed["start"] == 2
    assert resumed["losses"][0] == pytest.approx(straight["losses"][2], abs=1e-5)


def test_loss_tokens_are_counted_over_all_ranks(tmp_path):
    """Two ranks whose rows hold 2 and 60 loss tokens: the step's gradient is one process's over all 62 tokens."""
    from safetensors.torch import load_file

    worker = Path(__file__).with_name("dist_tokens_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, cmd in (("one", [sys.executable, str(worker)]),
                      ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(worker)])):  # fmt: skip
        proc = subprocess.run([*cmd, str(tmp_path / name), "none" if name == "one" else "ddp"], capture_output=True,
                              text=True, env=env, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (load_file(tmp_path / n / "grads.safetensors") for n in ("one", "two"))
    assert set(one) == set(two)
    for key in one:
        assert (one[key] - two[key]).abs().max().item() <= 1e-6, key


@pytest.mark.slow
def test_two_nodes_on_loopback_rendezvous_with_c10d_and_match_one_process(tmp_path):
    """Two torchrun "nodes" of one rank each on 127.0.0.1 (c10d rendezvous, gloo over lo), as on two hosts."""
    from lmforge.serve.replicas import free_port

    single = launch(tmp_path / "one", "none", 3, 1)[0]
    out = tmp_path / "nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=lmforge-test",
                               f"--node-rank={rank}", str(WORKER), str(out), "ddp", "3", "fresh"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]  # fmt: skip
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    a, b = (set(map(tuple, r["seen"])) for r in ranks)
    assert not a & b and a | b == set(map(tuple, single["seen"]))
    for step in range(3):
        assert (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2 == pytest.approx(
            single["losses"][step], abs=1e-5
        )
