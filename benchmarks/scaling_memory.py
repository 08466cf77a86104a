"""Training memory: `lmforge.scaling.estimate.training_memory` (what `lmforge plan` prints) against the measured
peak of real training steps.

Each case builds a model and lmforge's own `Trainer` (AdamW, clipping, autocast as configured) and runs one
`train_step` — forward, loss, backward, optimizer step, zero_grad — to create the Adam state, then measures a
second step with torch's `MemTracker` (`benchmarks.memory.peak_live_memory`, the model and optimizer tracked,
so weights, gradients, Adam moments, activations and backward temporaries come out apart). The estimate is
made for the same step on this machine (`device="cpu"`: the for-loop AdamW, dropout masks in the activation
dtype). Live tensor bytes, not RSS: the estimator models tensors, not the allocator. Goal: the total within 15%.

The dropout case runs on the CPU's paths, which the estimate follows with `device="cpu"`: masks kept in the
activation dtype (CUDA's fused dropout keeps bools) and sdpa falling back to its math kernel, which saves the
s×s scores (CUDA's flash kernel does its own dropout). bf16 autocast runs on small shapes only: on a CPU
without native bf16 (AVX2) a bf16 matmul is emulated ~100× slower than fp32, and the memory arithmetic does
not depend on the shape.

    python -m benchmarks.scaling_memory             # ~1 minute on 2 cores
    python -m benchmarks.scaling_memory --quick     # the first two cases
    python -m benchmarks.scaling_memory --record    # append one row per case to docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass

import torch

from benchmarks.harness import (
    Table,
    add_common_args,
    apply_common_args,
    command_line,
    environment,
    fmt_bytes,
    format_environment,
    peak_live_memory,
    record,
    verdict,
)
from lmforge.model import ModelConfig, Transformer
from lmforge.runs import RunDir
from lmforge.scaling.estimate import training_memory
from lmforge.train.loop import TrainConfig, Trainer
from lmforge.train.pretrain import next_token_loss

GOAL = 0.15  # |estimate / measured - 1| of the total

# configs/pretrain/tiny.yaml's model (its data's vocabulary: 4096)
TINY = dict(vocab_size=4096, max_seq_len=256, n_layer=4, d_model=256, n_head=4, position="rope", ffn="swiglu",
            norm="rmsnorm", norm_eps=1e-6, bias=False, tie_embeddings=True)  # fmt: skip
GPT = dict(vocab_size=512, max_seq_len=256, n_layer=4, d_model=256, n_head=8, position="learned", ffn="gelu",
           norm="layernorm", bias=True, tie_embeddings=True)  # fmt: skip
GQA = dict(vocab_size=2048, max_seq_len=256, n_layer=4, d_model=256, n_head=8, n_kv_head=2, position="rope",
           ffn="swiglu", norm="rmsnorm", bias=False, tie_embeddings=False)  # fmt: skip
NAIVE = dict(GPT, attention="naive", ffn="relu", norm_position="post", max_seq_len=128)
SMALL = dict(vocab_size=1024, max_seq_len=128, n_layer=2, d_model=128, n_head=4, position="rope", ffn="swiglu",
             norm="rmsnorm", bias=False)  # fmt: skip
SMALL_GPT = dict(GPT, vocab_size=256, max_seq_len=128, n_layer=2, d_model=128, n_head=4)


@dataclass
class Case:
    name: str
    model: dict
    batch: int
    seq_len: int
    precision: str = "fp32"
    checkpointing: bool = False

    def config(self) -> ModelConfig:
        return ModelConfig(**self.model)


CASES = [
    Case("tiny.yaml model, B=8×256", TINY, 8, 256),
    Case("tiny.yaml model, B=8×256, ckpt", TINY, 8, 256, checkpointing=True),
    Case("GPT-style (gelu, LN, bias), V=512", GPT, 8, 256),
    Case("GPT-style, V=512, ckpt", GPT, 8, 256, checkpointing=True),
    Case("GQA 8q/2kv, untied head", GQA, 8, 256),
    Case("naive attn, post-norm, relu, 8×128", NAIVE, 8, 128),
    Case("small, bf16 autocast, 4×128", SMALL, 4, 128, precision="bf16"),
    Case("small, bf16 autocast, 4×128, ckpt", SMALL, 4, 128, precision="bf16", checkpointing=True),
    Case("GPT-style bf16, V=256, 4×128, ckpt", SMALL_GPT, 4, 128, precision="bf16", checkpointing=True),
    Case("GPT-style, dropout 0.1, 4×128", dict(SMALL_GPT, dropout=0.1), 4, 128),
]

# MemTracker category -> the estimate's field
COMPONENTS = {
    "Parameter": "weights",
    "Gradient": "gradients",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "temporary",
}


def measure(case: Case, run_dir: str) -> dict[str, int]:
    """Peak live bytes of the second `Trainer.train_step`, by MemTracker category, and the total."""
    cfg = case.config()
    torch.manual_seed(0)
    model = Transformer(cfg)
    tcfg = TrainConfig(
        batch_size=case.batch,
        precision=case.precision,
        activation_checkpointing=case.checkpointing,
        progress=False,
        warmup_steps=1,
    )
    gen = torch.Generator().manual_seed(0)

    def batch_fn(step: int, micro: int, n_micro: int):  # made inside the step, as the data loader's batch is
        x = torch.randint(cfg.vocab_size, (case.batch, case.seq_len), generator=gen)
        return x, torch.randint(cfg.vocab_size, (case.batch, case.seq_len), generator=gen)

    trainer = Trainer(model, tcfg, RunDir(run_dir), batch_fn=batch_fn, loss_fn=next_token_loss)
    trainer.train_step()  # creates the Adam moments
    trainer.step += 1
    res = peak_live_memory(trainer.train_step, track=(trainer.raw_model, trainer.optimizer))
    cpu = res.detail["cpu"]
    out = {k: int(cpu.get(k, 0)) for k in COMPONENTS}
    out["Other"] = int(res.bytes - sum(out.values()))
    out["Total"] = int(res.bytes)
    return out


def estimate(case: Case):
    return training_memory(
        case.config(),
        micro_batch=case.batch,
        seq_len=case.seq_len,
        precision=case.precision,
        checkpointing=case.checkpointing,
        device="cpu",
    )


def ratio(est: float, meas: float) -> str:
    return f"{est / meas:.3f}" if meas else ("—" if not est else "∞")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = apply_common_args(add_common_args(parser).parse_args())
    env = environment()
    print(format_environment(env))
    cases = CASES[:2] if args.quick else CASES
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            print(
                f"measuring {case.name} ({case.precision}{', checkpointing' if case.checkpointing else ''}) ...",
                flush=True,
            )
            results.append((case, measure(case, tmp), estimate(case)))

    detail = Table(
        ["case", "component", "measured", "estimated", "est/meas"],
        title="peak live memory of one training step, by MemTracker category (estimate at its own peak)",
    )
    for case, meas, est in results:
        for category, name in COMPONENTS.items():
            e = getattr(est, name)
            detail.add(case.name, name, fmt_bytes(meas[category]), fmt_bytes(e), ratio(e, meas[category]))
        if meas["Other"]:
            detail.add(case.name, "other", fmt_bytes(meas["Other"]), "—", "—")
    detail.print()
    print(
        "Categories differ in two places: MemTracker files tensors made during backward as Temp, which with "
        "checkpointing\nincludes part of the recomputed block (the estimate: activations); the estimate files the "
        "current block's\ndown-projection weight gradient as temporary (MemTracker: Gradient). The totals compare "
        "like with like.\n"
    )
    summary = Table(
        ["case", "precision", "measured", "estimated", "est/meas", "estimated peak at", "goal ±15%"],
        title="total per step: estimate vs measured",
    )
    worst = 0.0
    for case, meas, est in results:
        r = est.total / meas["Total"]
        worst = max(worst, abs(r - 1))
        prec = case.precision + (" + ckpt" if case.checkpointing else "")
        summary.add(
            case.name,
            prec,
            fmt_bytes(meas["Total"]),
            fmt_bytes(est.total),
            f"{r:.3f}",
            est.phase,
            verdict(abs(r - 1) <= GOAL),
        )
    summary.print()
    print(f"\ngoal: every total within {GOAL:.0%} of measured: worst {worst:.1%} {verdict(worst <= GOAL)}")
    if args.record:
        cmd = command_line()
        for case, meas, est in results:
            prec = case.precision + (" + ckpt" if case.checkpointing else "")
            record(
                f"training memory estimate vs measured step: {case.name} ({prec})",
                f"{est.total / meas['Total']:.3f} (estimated {fmt_bytes(est.total)}, measured "
                f"{fmt_bytes(meas['Total'])} live tensors, MemTracker; peak at {est.phase})",
                cmd,
                env=env,
            )


if __name__ == "__main__":
    main()
