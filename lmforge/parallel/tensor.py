"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019; sequence parallelism, Korthikanti et al. 2022) applied to a
plain `Transformer` from outside with DTensor plans, as torchtitan does: the model's code never changes.

    mesh = init_device_mesh("cpu", (2,))                 # or the "tp" dimension of a (dp, tp) mesh
    tensor_parallel(model, mesh)                         # in place; the parameters become DTensors

Per block: q, k, v and the FFN's gate/up are split by output columns (each rank holds whole heads, so attention
runs on local heads with no communication: `Attention.forward` reshapes with −1 heads), the output projections
wo and down by input rows, whose partial sums are reduce-scattered along the sequence. Between those, the
residual stream and the norms are sharded along the sequence (sequence parallel): each rank normalises T/tp
tokens and the all-gather before attention and the FFN rebuilds the full sequence. The token embedding is split
by vocabulary rows (each rank looks up the ids it holds, the rest are summed in), the LM head by vocabulary
columns, gathered to full logits for the loss. GQA/MQA need the kv heads divisible by the degree.

What the plan cannot carry is refused in one line (`check_tensor_parallel`): positions added to the embeddings
or biases on the attention logits (learned, sinusoidal, ALiBi, relative: they see the whole sequence or all
heads), norms other than pre-norm, qk_norm over all heads' channels, linear attention's recurrent state.
"""

from __future__ import annotations

import torch.nn as nn

from lmforge.config import ConfigError


def check_tensor_parallel(cfg, degree: int) -> None:
    """A one-line ConfigError for a model this plan cannot split `degree` ways."""
    problems = []
    if cfg.n_head % degree or cfg.n_kv_head % degree:
        problems.append(f"n_head={cfg.n_head} and n_kv_head={cfg.n_kv_head} must both be divisible by tp={degree} "
                        "(each rank holds whole heads)")  # fmt: skip
    if cfg.d_ff % degree:
        problems.append(f"d_ff={cfg.d_ff} must be divisible by tp={degree}")
    if cfg.vocab_size % degree:
        problems.append(f"vocab_size={cfg.vocab_size} must be divisible by tp={degree}")
    if cfg.position not in ("rope", "none"):
        problems.append(f"position={cfg.position} is not split by the plan (rope or none are)")
    if cfg.norm_position != "pre":
        problems.append(f"norm_position={cfg.norm_position}: the plan shards pre-norm blocks")
    if cfg.qk_norm == "full":
        problems.append("qk_norm=full normalises over every head's channels: use qk_norm=head")
    if cfg.attention == "linear":
        problems.append("attention=linear is not split by the plan")
    if problems:
        raise ConfigError(f"tensor parallelism: {'; '.join(problems)}")


def tensor_parallel(model: nn.Module, mesh) -> nn.Module:
    """Shard `model` (a lmforge Transformer) over the 1-D `mesh` in place and return it. The sequence length of
    every batch must be divisible by the mesh size (the sequence-parallel regions split it)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    from lmforge.model import Transformer

    if not isinstance(model, Transformer):  # a reward or value head reads the sequence-sharded hidden states
        raise ConfigError(f"tensor parallelism splits a language model (pretraining, SFT, DPO), not a "
                          f"{type(model).__name__}: use train.parallel=ddp or fsdp for it")  # fmt: skip
    check_tensor_parallel(model.cfg, mesh.size())
    tied = model.lm_head.weight is model.tok_emb.weight
    ffn_in = ["gate", "up"] if hasattr(model.blocks[0].ffn, "gate") else ["up"]
    for block in model.blocks:
        plan = {
            "norm1": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
            "norm2": SequenceParallel(),
            "ffn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            **{f"ffn.{name}": ColwiseParallel() for name in ffn_in},
            "ffn.down": RowwiseParallel(output_layouts=Shard(1)),
        }
        parallelize_module(block, mesh, plan)
    parallelize_module(model, mesh, {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm_f": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })  # fmt: skip
    if tied:  # both split the vocabulary rows of one matrix (Shard(0)): share the one DTensor again
        model.lm_head.weight = model.tok_emb.weight
    return model
