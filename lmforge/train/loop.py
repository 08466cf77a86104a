"""The one training loop. Pretraining, SFT, reward modelling and DPO differ only in the batch they draw and
the loss they compute; both are plugged in:

    trainer = Trainer(model, cfg, run, batch_fn=lambda step, micro, n_micro: ..., loss_fn=lambda m, b: ...)
    trainer.fit()

Each optimizer step: `n_micro` micro-batches (gradient accumulation; DDP syncs only on the last), autocast
in bf16 or fp16 (fp32 master weights; fp16 through a GradScaler), a NaN/inf loss agreed across ranks skips
the step (K in a row stop the run), gradients clipped, AdamW stepped, the schedule advanced. Around it: eval
every N steps, checkpoints every N steps, on SIGINT/SIGTERM and at the end, a progress bar with loss,
tokens/s, MFU and ETA, `metrics.jsonl` (and TensorBoard when installed).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from lmforge.hardware import cpu_has_native_bf16, torch_dtype
from lmforge.runs import RunDir, Stopped

from . import distributed as dist_utils
from .checkpoint import (
    apply_sharded,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

Batch = Any
LossFn = Callable[[nn.Module, Batch], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step, all ranks and micro-batches together
    micro_batch_size: int | None = None  # per rank per forward; None: batch_size / world size (no accumulation)
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False  # sets each Block's `checkpoint` flag (the model has no setting of it)
    # tp: tensor parallel over every rank; fsdp+tp: FSDP over data-parallel groups of `tp` tensor-parallel ranks
    parallel: Literal["auto", "none", "ddp", "fsdp", "tp", "fsdp+tp"] = "auto"
    tp: int | None = None  # the tensor-parallel degree of fsdp+tp (parallel=tp: every rank)
    eval_every: int = 200
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_bad_steps: int = 5  # consecutive NaN/inf steps before the run stops
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip"):
            if not math.isfinite(getattr(self, name)):  # nan passes every comparison below
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"lr must be > 0 and min_lr >= 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.tp is not None and (self.tp < 1 or self.parallel not in dist_utils.TENSOR_PARALLEL):
            raise ValueError(f"tp={self.tp} is the tensor-parallel degree of parallel=fsdp+tp (or tp): set "
                             f"train.parallel, not {self.parallel!r}, or drop train.tp")  # fmt: skip


def seed_everything(seed: int) -> None:
    """Seed every generator a stage draws from. Call it first thing in a stage's run(), before any weights are
    initialised (the model, a value or reward head, LoRA adapters): same seed and config, same losses."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay only on matrices (≥2-D: linear weights, embeddings); norms and biases are not
    decayed (as in GPT-2/nanoGPT: decaying gains and offsets only hurts)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if all(p.is_cuda for p in params) and params else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fused)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' → bf16 where it is fast: CUDA with bf16 (fp16 on older GPUs), a CPU that multiplies bf16 in
    hardware (AVX-512-bf16 or AMX, read from its flags: nothing is measured); else fp32, as on an AVX2-only
    CPU, which emulates bf16 about 100× slower than fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


class Trainer:
    """Runs `cfg.steps` optimizer steps of `loss_fn(model, batch_fn(step, part, n_parts))`.

    batch_fn(step, part, n_parts) returns part `part` of step `step`'s batch cut into n_parts equal parts, one per
    micro-batch of every rank (n_parts = ranks × micro-batches; rank r trains parts r·n_micro … r·n_micro +
    n_micro − 1), as anything loss_fn understands: a stage that cuts its step's batch by (part, n_parts) is
    sharded over ranks without knowing of them, and a step's batch is the same on 1 process or on N ranks.
    tokens_fn(batch) counts the
    tokens it trains on (for tokens/s and MFU); eval_fn(model) returns metrics to log; flops_per_token
    enables MFU.

    loss_tokens_fn(batch), when given, counts the tokens loss_fn averages over (an SFT batch's assistant tokens):
    the step's loss is then the mean over every loss token of all micro-batches on all ranks, as one big batch
    would give, not the mean of micro-batch means, which weighs a token of a short micro-batch more than one of a
    long one (the gradient-accumulation fix HF transformers and TRL made in 2024). Each micro-batch's mean is
    weighted by its count, and the summed gradients divided by the count all-reduced over ranks.

    stateful: objects with state_dict() / load_state_dict() of plain values that change as the stage trains (PPO's
    adaptive KL coefficient): checkpointed with the model and restored on resume, so a resumed run is the same run."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        run: RunDir,
        *,
        batch_fn: Callable[[int, int, int], Batch],
        loss_fn: LossFn,
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        tokens_fn: Callable[[Batch], int] = lambda b: b[0].numel(),
        loss_tokens_fn: Callable[[Batch], int] | None = None,
        flops_per_token: float | None = None,
        stateful: dict[str, Any] | None = None,
        resume: bool = False,
    ):
        self.cfg, self.run = cfg, run
        self.env = dist_utils.environment()
        self.device = self.env.device
        self.precision = resolve_precision(cfg.precision, self.device)
        self.parallel = dist_utils.resolve_parallel(cfg.parallel, self.env)
        self.tp = dist_utils.tp_degree(self.parallel, cfg.tp, self.env)
        # the ranks of a tensor-parallel group share their rows: data is cut over the data-parallel groups only
        self.data_rank, self.data_world = dist_utils.data_coords(self.tp, self.env)
        world = self.data_world
        micro = cfg.micro_batch_size or cfg.batch_size // world
        if cfg.batch_size % (micro * world):
            raise ValueError(
                f"batch_size {cfg.batch_size} is not divisible by micro_batch_size {micro} × {world} data-parallel "
                "ranks"
            )
        self.n_micro = cfg.batch_size // (micro * world)
        self.batch_fn, self.loss_fn, self.eval_fn, self.tokens_fn = batch_fn, loss_fn, eval_fn, tokens_fn
        self.loss_tokens_fn = loss_tokens_fn
        self.flops_per_token = flops_per_token
        self.stateful = stateful or {}
        self._peak: float | None = None  # matmul peak for MFU, looked up at the first step

        torch.manual_seed(cfg.seed + self.data_rank)  # a tensor-parallel group draws the same dropout masks
        if cfg.activation_checkpointing:
            for block in dist_utils.transformer_blocks(model):
                block.checkpoint = True
        self.raw_model = model.to(self.device)
        self.model = dist_utils.apply_parallel(self.raw_model, self.parallel, self.env, self.tp)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.step = 0
        self.bad_steps = 0
        self._stop_signal: int | None = None
        if resume:
            self._resume()
        if run.resumed and self.env.rank == 0:
            run.save_config()  # only now: the model was rebuilt from it and its checkpoint loaded

    # ---- checkpoints --------------------------------------------------------------------------------
    def _resume(self) -> None:
        path = latest_checkpoint(self.run.checkpoints)
        if path is None:
            if self.run.resumed:
                self._log(f"--resume: {self.run.path} has no checkpoint yet, so training starts from step 0")
            return
        state = load_checkpoint(path, self.raw_model, verified=True)  # latest_checkpoint verified it
        if "sharded_path" in state:
            apply_sharded(state["sharded_path"], self.model, self.optimizer)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("world_size") == self.env.world_size:  # RNG streams are per rank
            set_rng_state(state["rng"][self.env.rank])
        for name, saved in state.get("stateful", {}).items():
            self.stateful[name].load_state_dict(saved)
        self.step = int(state["step"])
        if self.env.rank == 0:  # the steps after the checkpoint are trained again: their old records go
            self.run.drop_metrics_after(self.step)
        self._log(f"resumed from {path} at step {self.step}")

    def save(self) -> None:
        sharded = self.parallel in dist_utils.SHARDED_LAYOUTS
        rngs = dist_utils.gather_objects(rng_state(), self.env)
        state = {
            "step": self.step,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rngs,
            "world_size": self.env.world_size,
            "stateful": {name: obj.state_dict() for name, obj in self.stateful.items()},
        }
        if sharded:
            state["optimizer_object"] = self.optimizer
        elif self.env.rank == 0:
            state["optimizer"] = self.optimizer.state_dict()
        if sharded or self.env.rank == 0:
            save_checkpoint(
                self.run.checkpoints, self.step, self.raw_model, state, keep=self.cfg.keep_checkpoints,
                sharded=sharded, rank=self.env.rank, info={"precision": self.precision},
            )  # fmt: skip
        dist_utils.barrier(self.env)

    # ---- the loop -----------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        last: dict[str, float] = {}
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = self._progress_bar()
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                metrics = self.train_step()
                dt = time.perf_counter() - t0
                self.step += 1
                metrics.update(self._speed(metrics.pop("tokens"), dt))
                evaluated = bool(self.eval_fn) and (self.step % cfg.eval_every == 0 or self.step == cfg.steps)
                if evaluated:
                    metrics.update(self.evaluate())
                if self.step % cfg.log_every == 0 or evaluated or self.step == cfg.steps:
                    self._record(metrics)
                last = metrics
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(self._postfix(metrics), refresh=False)
                if self.bad_steps >= cfg.max_bad_steps:
                    raise FloatingPointError(f"{self.bad_steps} steps in a row had a NaN/inf loss: stopping")
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save()
                if dist_utils.any_true(self._stop_signal is not None, self.env):
                    self._log(f"signal received: checkpoint at step {self.step}, then stop")
                    break
            self.save()
            if self._stop_signal is not None:  # stopped early: the caller must not go on as if it finished
                raise Stopped(self._stop_signal, self.step, self.run.path)
        finally:
            if bar is not None:
                bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return last

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total_loss, tokens, loss_tokens, extra = torch.zeros((), device=self.device), 0, 0, {}
        for micro in range(self.n_micro):
            batch = self.batch_fn(self.step, self.data_rank * self.n_micro + micro, self.data_world * self.n_micro)
            tokens += self.tokens_fn(batch)
            weight = 1 / self.n_micro  # equal micro-batches: the mean of their means is the batch mean
            if self.loss_tokens_fn is not None:
                count = int(self.loss_tokens_fn(batch))
                loss_tokens += count
                weight = count  # a sum over tokens now; divided by the step's whole count below
            sync = micro == self.n_micro - 1
            with dist_utils.no_sync(self.model, skip=not sync), self._autocast():
                out = self.loss_fn(self.model, batch)
                loss, extra = out if isinstance(out, tuple) else (out, {})
                loss = loss * weight
            self.scaler.scale(loss).backward()
            total_loss += loss.detach().float()
        total_loss = total_loss.item()  # one host sync per step, not one per micro-batch
        if self.loss_tokens_fn is not None:
            total_loss = self._normalise_by_tokens(total_loss, loss_tokens)
        finite = dist_utils.all_true(math.isfinite(total_loss), self.env)
        grad_norm = float("nan")
        if finite:
            self.scaler.unscale_(self.optimizer)
            if cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # TP: a DTensor
            if self.scaler.is_enabled() or math.isfinite(grad_norm) or cfg.grad_clip <= 0:
                self.scaler.step(self.optimizer)  # the scaler itself skips steps whose gradients hold inf
            else:
                finite = False
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps = 0 if finite else self.bad_steps + 1
        loss_value = dist_utils.mean(total_loss, self.env) if finite else float("nan")
        metrics = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, **extra}
        if not finite:
            metrics["skipped"] = True
            self._log(f"step {self.step}: non-finite loss or gradient, step skipped")
        if self.scaler.is_enabled():
            metrics["loss_scale"] = float(self.scaler.get_scale())
        return metrics

    @torch.no_grad()
    def _normalise_by_tokens(self, loss_sum: float, count: int) -> float:
        """Divide the summed gradients by the step's loss tokens on all ranks; returns this rank's share of the
        mean loss (the logged loss is its mean over ranks). DDP and FSDP average gradients over the data-parallel
        ranks, so the factor is their number / count (a tensor-parallel group counts its shared rows once)."""
        world = self.data_world
        total = dist_utils.mean(float(count), self.env) * world
        if total == 0:  # no loss token anywhere this step: nothing to learn, and no division by zero
            for p in self.model.parameters():
                p.grad = None
            return 0.0
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(world / total)
        return loss_sum * world / total

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with self._autocast():
            result = self.eval_fn(self.model)
        self.model.train()
        return result

    # ---- helpers ------------------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch_dtype(self.precision))

    def _speed(self, tokens: int, dt: float) -> dict[str, float]:
        global_tokens = tokens * self.data_world
        out = {"tokens": global_tokens, "tokens_per_s": global_tokens / dt, "step_time": dt}  # tokens: all ranks
        if self.flops_per_token:
            if self._peak is None:
                from .mfu import device_peak

                self._peak, _ = device_peak(self.device, self.precision)
            peak = self._peak
            out["mfu"] = self.flops_per_token * global_tokens / dt / (peak * self.env.world_size)
        return out

    def _record(self, metrics: dict[str, float]) -> None:
        if self.env.rank == 0:
            self.run.log_metrics(self.step, **{k: v if isinstance(v, bool) else float(v) for k, v in metrics.items()})
            _tensorboard_log(self.run, self.step, metrics)

    def _postfix(self, m: dict[str, float]) -> str:
        parts = [f"loss {m['loss']:.3f}", f"{m['tokens_per_s']:,.0f} tok/s"]
        if "mfu" in m:
            parts.append(f"MFU {m['mfu']:.0%}")
        if "val_loss" in m:
            parts.append(f"val {m['val_loss']:.3f}")
        return " | ".join(parts)

    def _progress_bar(self):
        if not self.cfg.progress or self.env.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _log(self, message: str) -> None:
        if self.env.rank == 0:
            from tqdm.auto import tqdm

            tqdm.write(message)


_TB_WRITERS: dict[str, Any] = {}


def _tensorboard_log(run: RunDir, step: int, metrics: dict[str, float]) -> None:
    """TensorBoard event files beside metrics.jsonl, when the tensorboard package is installed."""
    key = str(run.path)
    if key not in _TB_WRITERS:
        try:
            from torch.utils.tensorboard import SummaryWriter

            _TB_WRITERS[key] = SummaryWriter(log_dir=str(run.path / "tensorboard"))
        except ImportError:
            _TB_WRITERS[key] = None
    writer = _TB_WRITERS[key]
    if writer is not None:
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)
