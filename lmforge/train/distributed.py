"""Data parallelism applied to a plain model from outside (as torchtitan does): the model never knows.

The same command runs on one process or under torchrun:

    lmforge pretrain --config configs/pretrain/tiny.yaml                                   # one process
    torchrun --nproc_per_node=2 -m lmforge pretrain --config configs/pretrain/tiny.yaml      # DDP
    torchrun --nproc_per_node=2 -m lmforge pretrain --config ... train.parallel=fsdp         # FSDP2
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
             --nproc_per_node=8 -m lmforge pretrain --config configs/pretrain/gpu-small.yaml  # multi-node

Backend: NCCL on CUDA, gloo on CPU. Each rank reads a disjoint slice of every global batch
(`lmforge.data.loader.sample_batch`), so the ranks together see exactly one process's batch.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def environment() -> DistEnv:
    """Initialise the process group when launched by torchrun (RANK/WORLD_SIZE set); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistEnv(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(leave_process_group)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def leave_process_group(timeout_s: float = 60.0) -> None:
    """Every rank waits for the others, then the process group is destroyed (registered at exit by `environment`).
    A rank that leaves while its peers still talk to it closes their sockets under Gloo's threads, and a process
    that exits with the group alive lets those threads outlive the interpreter: either way a run that succeeded
    could end in SIGABRT ("terminate called without an active exception"; pytorch/pytorch#179291). A peer that
    crashed never arrives: after `timeout_s` the group is destroyed without it."""
    if not dist.is_initialized():
        return
    with contextlib.suppress(RuntimeError):
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    dist.destroy_process_group()


def resolve_parallel(parallel: str, env: DistEnv) -> str:
    if parallel == "auto":
        return "ddp" if env.distributed else "none"
    if parallel != "none" and not env.distributed:
        return "none"  # the same recipe runs on one process
    return parallel


TENSOR_PARALLEL = ("tp", "fsdp+tp")  # layouts that split the model with lmforge.parallel.tensor
SHARDED_LAYOUTS = ("fsdp", *TENSOR_PARALLEL)  # layouts whose parameters are DTensors: their checkpoints are DCP folders


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block inside `model`, found by type: a reward model or PPO's policy-with-value holds its
    Transformer as an attribute, so `model.blocks` would miss them (and FSDP and checkpointing do nothing)."""
    from lmforge.model import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def tp_degree(parallel: str, tp: int | None, env: DistEnv) -> int:
    """The tensor-parallel degree: every rank for parallel=tp, `tp` for fsdp+tp, 1 otherwise; a layout the ranks
    cannot form is a one-line ConfigError."""
    from lmforge.config import ConfigError

    if parallel == "tp":
        if tp not in (None, env.world_size):
            raise ConfigError(f"train.parallel=tp splits the model over every rank ({env.world_size}), not tp={tp}: "
                              "use train.parallel=fsdp+tp for data-parallel groups of tensor-parallel ranks",
                              "tp")  # fmt: skip
        return env.world_size
    if parallel == "fsdp+tp":
        if not tp or tp < 1 or env.world_size % tp:
            raise ConfigError(f"train.parallel=fsdp+tp needs train.tp dividing the {env.world_size} ranks, got "
                              f"tp={tp}", "tp")  # fmt: skip
        return tp
    return 1


def data_coords(tp: int, env: DistEnv) -> tuple[int, int]:
    """(this rank's data-parallel index, how many data-parallel groups): the ranks of one tensor-parallel group
    (consecutive ranks, the inner dimension of the (dp, tp) mesh) train on the same rows."""
    return env.rank // tp, env.world_size // tp


def apply_parallel(model: nn.Module, parallel: str, env: DistEnv, tp: int = 1) -> nn.Module:
    """DDP wraps the model; FSDP2 shards every block, then the root (parameters become DTensors); tp splits it
    over a (dp, tp) mesh's tp dimension first (`lmforge.parallel.tensor`), then fsdp+tp shards that over dp."""
    if parallel in TENSOR_PARALLEL:
        from torch.distributed.device_mesh import init_device_mesh

        from lmforge.parallel import tensor_parallel

        mesh = init_device_mesh(env.device.type, (env.world_size // tp, tp), mesh_dim_names=("dp", "tp"))
        tensor_parallel(model, mesh["tp"])
        if parallel == "fsdp+tp":
            from torch.distributed.fsdp import fully_shard

            for block in transformer_blocks(model):
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.local_rank] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return model


def no_sync(model: nn.Module, skip: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    if skip and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return _restore_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def all_true(flag: bool, env: DistEnv) -> bool:
    """True on every rank only if true on every rank (e.g. "my loss is finite": all ranks skip together)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def any_true(flag: bool, env: DistEnv) -> bool:
    return not all_true(not flag, env)


def mean(value: float, env: DistEnv) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.item() / env.world_size


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj` (e.g. its RNG state), on every rank."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
