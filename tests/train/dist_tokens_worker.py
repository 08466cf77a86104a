"""Run by test_distributed.py under torchrun (2 ranks) or alone: one train step on SFT-style rows whose loss tokens
are uneven across ranks (rank 0's rows have 1 loss token each, rank 1's every target), normalised by the loss
tokens all-reduced over ranks; writes rank 0's gradients and the logged loss to OUT/grads.pt (safetensors)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import SEQ, VOCAB, tiny_model  # noqa: E402

from lmforge.align.sft import masked_lm_loss  # noqa: E402
from lmforge.runs import RunDir  # noqa: E402
from lmforge.train.loop import TrainConfig, Trainer  # noqa: E402


def rows_and_masks():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g)
    masks = torch.zeros(4, SEQ + 1, dtype=torch.long)
    masks[0, -1] = masks[1, -1] = 1
    masks[2:, 1:] = 1
    return rows, masks


def main(out: str, parallel: str) -> None:
    from safetensors.torch import save_file

    rank = int(os.environ.get("RANK", 0))
    rows, masks = rows_and_masks()

    def batch_fn(step, part, n_parts):
        n = 4 // n_parts
        return rows[part * n : (part + 1) * n], masks[part * n : (part + 1) * n]

    cfg = TrainConfig(steps=1, batch_size=4, lr=1e-2, precision="fp32", progress=False, parallel=parallel,
                      grad_clip=0.0, checkpoint_every=1000)  # fmt: skip
    run = RunDir(os.path.join(out, "run"))
    run.path.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(tiny_model(), cfg, run, batch_fn=batch_fn, loss_fn=masked_lm_loss,
                      loss_tokens_fn=lambda b: int(b[1][:, 1:].sum()))  # fmt: skip
    grads = {}
    trainer.optimizer.step = lambda: grads.update(
        {name: p.grad.detach().clone() for name, p in trainer.raw_model.named_parameters() if p.grad is not None}
    )
    loss = trainer.train_step()["loss"]
    if rank == 0:
        save_file(grads | {"loss": torch.tensor([loss])}, os.path.join(out, "grads.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
