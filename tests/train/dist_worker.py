"""Run under torchrun by test_distributed.py: train the tiny model for a few steps with DDP or FSDP2 and
write each rank's losses and the global batch rows it saw to OUT/rank{r}.json."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import batch_fn_for, lm_loss, tiny_model  # noqa: E402

from lmforge.runs import RunDir  # noqa: E402
from lmforge.train.loop import TrainConfig, Trainer  # noqa: E402


def main(out: str, parallel: str, steps: int, resume: bool) -> None:
    rank = int(os.environ.get("RANK", 0))
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=1, precision="fp32",
                      log_every=1, progress=False, parallel=parallel, checkpoint_every=1000)  # fmt: skip
    run = RunDir(os.path.join(out, "run"))
    run.path.mkdir(parents=True, exist_ok=True)
    seen = []
    inner = batch_fn_for(8)

    def batch_fn(step, part, n_parts):
        n = 8 // n_parts
        seen.extend((step, part * n + i) for i in range(n))
        return inner(step, part, n_parts)

    losses = []

    def loss_fn(model, batch):
        loss = lm_loss(model, batch)
        losses.append(loss.item())
        return loss

    trainer = Trainer(tiny_model(), cfg, run, batch_fn=batch_fn, loss_fn=loss_fn, resume=resume)
    start = trainer.step
    trainer.fit()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "seen": seen, "start": start}, f)
    # The process group is left at exit by lmforge (train/distributed.py: leave_process_group), as in a user's run.


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume")
