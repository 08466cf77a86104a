"""Run by test_tensor_parallel.py under torchrun, or alone: STEPS (default 5) training steps of a tiny Llama-style
model (GQA 4/2, tied or untied embeddings; a constant rate, so a run cut in two is one run) with
train.parallel=PARALLEL (none, ddp, tp, or fsdp+tp with train.tp=2), from the run's last checkpoint with `resume`;
the loop writes the logged losses to OUT/run/metrics.jsonl and the final full weights to its last checkpoint."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))
from train_helpers import batch_fn_for, lm_loss, tiny_model  # noqa: E402

from lmforge.runs import RunDir  # noqa: E402
from lmforge.train.loop import TrainConfig, Trainer  # noqa: E402


def main(out: str, parallel: str, tied: bool, steps: int, resume: bool) -> None:
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-2, schedule="constant", warmup_steps=1, precision="fp32",
                      log_every=1, progress=False, parallel=parallel, tp=2 if parallel == "fsdp+tp" else None,
                      checkpoint_every=1000)  # fmt: skip
    run = RunDir(os.path.join(out, "run"))
    run.path.mkdir(parents=True, exist_ok=True)
    model = tiny_model(vocab_size=40, n_kv_head=2, norm="rmsnorm", bias=False, tie_embeddings=tied)
    Trainer(model, cfg, run, batch_fn=batch_fn_for(8), loss_fn=lm_loss, resume=resume).fit()


if __name__ == "__main__":
    extra = sys.argv[4:]
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "tied", int(extra[0]) if extra else 5, "resume" in extra)
