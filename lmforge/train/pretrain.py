"""Pretraining: next-token prediction on a prepared corpus (`lmforge prepare`), through the one training loop.

    lmforge pretrain --config configs/pretrain/tiny.yaml [name=my-run] [train.steps=2000] [model.n_layer=4]
    lmforge pretrain --config configs/pretrain/tiny.yaml name=my-run --resume    # continue exactly

Writes `runs/<name>/`: config.yaml, metrics.jsonl, checkpoints/, loss.png. The model's vocab_size comes from
the data's tokenizer (rounded up to a multiple of 64 for matmul-friendly shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.config import ConfigError, UserError
from lmforge.model import ModelConfig, Transformer
from lmforge.runs import RunDir, atomic_write_bytes
from lmforge.tokenizer import Tokenizer

from .loop import TrainConfig, Trainer, seed_everything


@dataclass
class EvalConfig:
    batches: int = 20  # val windows of train.micro_batch_size × seq_len; 0 = the whole split
    batch_size: int = 16


@dataclass
class PretrainConfig:
    data: str = "data/python-stdlib"
    name: str | None = None
    runs_dir: str = "runs"
    resume: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def next_token_loss(model, batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def evaluate_lm(model, data, *, seq_len: int, batch_size: int, max_batches: int | None, env) -> dict[str, float]:
    """Mean next-token loss over consecutive val windows, and bits per byte: loss / ln 2 × tokens / bytes."""
    from lmforge.data.loader import eval_batches

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in eval_batches(
        data.val, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches or None,
        rank=env.rank, world_size=env.world_size,
    ):  # fmt: skip
        logits = model(x.to(device))
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.to(device).view(-1), reduction="sum")
        total, count = total + loss.item(), count + y.numel()
    from .distributed import mean

    if count == 0:  # a loss of 0 over no tokens would read as a perfect model
        raise UserError(
            f"the val split of {data.folder} ({len(data.val)} tokens) holds no window of {seq_len + 1} tokens: "
            "prepare more data or a larger --val-fraction, or use a smaller model.max_seq_len"
        )
    loss = mean(total / count, env)
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / data.bytes_per_token("val")}


def padded_vocab_size(vocab: int) -> int:
    """The model's vocab_size for a tokenizer's: rounded up to a multiple of 64 for matmul-friendly shapes."""
    return 64 * math.ceil(vocab / 64)


def build_model(cfg: PretrainConfig, data) -> Transformer:
    cfg.model.vocab_size = padded_vocab_size(data.vocab_size)
    cfg.model.validate()
    return Transformer(cfg.model)


def run(cfg: PretrainConfig) -> RunDir:
    from lmforge.data.loader import TokenData, sample_batch

    from .distributed import environment

    seed_everything(cfg.train.seed)
    data = TokenData(cfg.data)
    for split in ("train", "val"):  # before the run folder exists: a refused run leaves nothing behind
        if len(getattr(data, split)) <= cfg.model.max_seq_len:
            raise UserError(
                f"the {split} split of {cfg.data} has {len(getattr(data, split))} tokens, fewer than one window of "
                f"model.max_seq_len + 1 = {cfg.model.max_seq_len + 1}: use more data or a smaller model.max_seq_len"
            )
    env = environment()
    model = build_model(cfg, data)
    seq_len, tcfg = cfg.model.max_seq_len, cfg.train
    run_dir = (
        RunDir.create(cfg.runs_dir, cfg.name, cfg, resume=cfg.resume)
        if env.rank == 0
        else RunDir(Path(cfg.runs_dir) / (cfg.name or "unnamed"))
    )
    own = run_dir.path / "tokenizer.json"
    if (
        run_dir.resumed
        and own.is_file()
        and Tokenizer.load(own).fingerprint() != Tokenizer.load(data.tokenizer_path).fingerprint()
    ):
        raise ConfigError(
            f"data={cfg.data} was tokenized with another tokenizer than run {run_dir.path}; "
            "resume it on data prepared with the run's tokenizer (lmforge prepare --tokenizer RUN/tokenizer.json)"
        )
    if env.rank == 0:  # the run carries its tokenizer, so sample/eval/export need only the run folder
        atomic_write_bytes(own, Path(data.tokenizer_path).read_bytes())

    def batch_fn(step: int, part: int, n_parts: int):
        x, y = sample_batch(
            data.train, step, batch_size=tcfg.batch_size, seq_len=seq_len, seed=tcfg.seed, micro=part, n_micro=n_parts
        )  # the loop's parts already span the ranks
        return x.to(env.device), y.to(env.device)

    def eval_fn(m):
        return evaluate_lm(
            m, data, seq_len=seq_len, batch_size=cfg.eval.batch_size, max_batches=cfg.eval.batches, env=env
        )

    if env.rank == 0:
        print(cfg.model.summary())
        print(f"data: {len(data.train):,} train / {len(data.val):,} val tokens; run: {run_dir.path}")
    trainer = Trainer(
        model, tcfg, run_dir, batch_fn=batch_fn, loss_fn=next_token_loss, eval_fn=eval_fn,
        flops_per_token=cfg.model.flops_per_token(seq_len), resume=cfg.resume,
    )  # fmt: skip
    trainer.fit()
    if env.rank == 0:
        from lmforge.report import plot_metrics

        plot_metrics(run_dir)
    return run_dir
