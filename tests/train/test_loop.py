"""The training loop: accumulation equals one big batch, exact resume, fp16 scaling, NaN handling, schedule."""

import json
import math
import os
import signal

import pytest
import torch
from train_helpers import batch_fn_for, lm_loss, tiny_model

from lmforge.runs import RunDir, Stopped, read_metrics
from lmforge.train.checkpoint import latest_checkpoint
from lmforge.train.loop import TrainConfig, Trainer, lr_at, make_optimizer


def config(**kw) -> TrainConfig:
    base = dict(
        steps=4,
        batch_size=8,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=1,
        precision="fp32",
        eval_every=1000,
        log_every=1,
        checkpoint_every=1000,
        progress=False,
        grad_clip=1.0,
    )
    base.update(kw)
    return TrainConfig(**base)


def make(run, cfg, seed=0, resume=False, **model_kw):
    model = tiny_model(seed, **model_kw)
    return Trainer(model, cfg, run, batch_fn=batch_fn_for(cfg.batch_size), loss_fn=lm_loss, resume=resume)


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_accumulated_micro_batches_equal_one_batch(tmp_path, micro):
    one = make(RunDir.create(tmp_path, "one"), config(batch_size=8))
    acc = make(RunDir.create(tmp_path, f"acc{micro}"), config(batch_size=8, micro_batch_size=micro))
    assert acc.n_micro == 8 // micro
    # Plain SGD makes the update proportional to the gradient; Adam's first steps (g / (|g| + eps)) would
    # amplify float rounding in near-zero gradients into differences that say nothing about accumulation.
    for t in (one, acc):
        t.optimizer = torch.optim.SGD(t.model.parameters(), lr=0.5)
    for _ in range(3):
        a, b = one.train_step(), acc.train_step()
        one.step += 1
        acc.step += 1
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-5)
    for (name, p), q in zip(one.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_resume_continues_exactly(tmp_path):
    """N steps, stop, resume N more == 2N uninterrupted: the same loss at every step (fp32, dropout on)."""
    straight = RunDir.create(tmp_path, "straight")
    make(straight, config(steps=6), dropout=0.1).fit()
    split = RunDir.create(tmp_path, "split")
    first = make(split, config(steps=6), dropout=0.1)

    def loss_then_sigterm(model, batch):  # SIGTERM arrives during step 3: the loop saves after it and stops
        if first.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return lm_loss(model, batch)

    first.loss_fn = loss_then_sigterm
    with pytest.raises(Stopped, match="SIGTERM at step 3"):  # and the CLI exits 143
        first.fit()
    assert latest_checkpoint(split.checkpoints).name == "step_000003"
    resumed = make(split, config(steps=6), seed=123, resume=True, dropout=0.1)  # other init: must be overwritten
    assert resumed.step == 3
    resumed.fit()
    a = [r["loss"] for r in read_metrics(straight.path)]
    b = [r["loss"] for r in read_metrics(split.path)]
    assert len(a) == len(b) == 6
    assert a == b  # bit-identical
    assert latest_checkpoint(split.checkpoints).name == "step_000006"


def test_checkpoints_keep_the_last_k(tmp_path):
    run = RunDir.create(tmp_path, "k")
    make(run, config(steps=7, checkpoint_every=1, keep_checkpoints=2)).fit()
    names = sorted(p.name for p in run.checkpoints.iterdir())
    assert names == ["step_000006", "step_000007"]
    info = json.loads((run.checkpoints / "step_000007" / "info.json").read_text())
    assert info["step"] == 7


def test_plain_fp16_underflows_and_the_scaler_keeps_gradients():
    model = tiny_model()
    x = torch.randint(0, 37, (4, 16))

    def grads(scale):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(x).float().logsumexp(-1).mean() * 1e-9  # a tiny loss
        (loss * scale).backward()
        return torch.cat([p.grad.flatten() / scale for p in model.parameters() if p.grad is not None])

    assert grads(1.0).abs().max() == 0  # fp16 activations' gradients underflow to zero
    scaled = grads(2.0**24)
    assert (scaled != 0).float().mean() > 0.5


def test_fp16_inf_gradient_skips_the_step_and_halves_the_scale(run_dir):
    cfg = config(precision="fp16", steps=3, grad_clip=0)
    poison = {"step": 1}

    def loss_fn(model, batch):
        loss = lm_loss(model, batch)
        if trainer.step == poison["step"]:
            loss.register_hook(lambda g: g * float("inf"))
        return loss

    trainer = Trainer(tiny_model(), cfg, run_dir, batch_fn=batch_fn_for(8), loss_fn=loss_fn)
    trainer.train_step()
    trainer.step = 1
    before = [p.detach().clone() for p in trainer.model.parameters()]
    scale = trainer.scaler.get_scale()
    trainer.train_step()
    assert trainer.scaler.get_scale() == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    trainer.step = 2
    trainer.train_step()
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_nan_loss_skips_and_k_in_a_row_stop(run_dir):
    def loss_fn(model, batch):
        loss = lm_loss(model, batch)
        return loss * float("nan") if trainer.step >= 2 else loss

    trainer = Trainer(
        tiny_model(), config(steps=20, max_bad_steps=3), run_dir, batch_fn=batch_fn_for(8), loss_fn=loss_fn
    )
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        trainer.fit()
    rows = read_metrics(run_dir.path)
    assert [r.get("skipped", 0) for r in rows] == [0, 0, 1, 1, 1]


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = tiny_model(bias=True, norm="layernorm")
    opt = make_optimizer(model, TrainConfig())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_every_evaluation_is_logged_even_off_the_logging_steps(run_dir):
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=1, eval_every=3, log_every=10,
                      precision="fp32", progress=False)  # fmt: skip
    trainer = Trainer(tiny_model(), cfg, run_dir, batch_fn=batch_fn_for(4), loss_fn=lm_loss,
                      eval_fn=lambda m: {"heldout_accuracy": 0.5})  # fmt: skip
    trainer.fit()
    assert [r["step"] for r in read_metrics(run_dir.path) if "heldout_accuracy" in r] == [3, 6]


def test_uneven_micro_batches_give_the_gradient_of_one_big_batch_when_normalised_by_tokens(tmp_path):
    """SFT-style masks: micro-batch 1 has 2 loss tokens, micro-batch 2 has 60. Normalised by the step's loss tokens,
    accumulation gives one big batch's gradient (≤ 1e-6); the mean of micro-batch means (the old convention,
    without loss_tokens_fn) does not."""
    from train_helpers import SEQ, VOCAB

    from lmforge.align.sft import masked_lm_loss

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g)
    masks = torch.zeros(4, SEQ + 1, dtype=torch.long)
    masks[0, -1] = masks[1, -1] = 1  # micro-batch 0: one loss token per row
    masks[2:, 1:] = 1  # micro-batch 1: every target
    micro = [(rows[:2], masks[:2]), (rows[2:], masks[2:])]

    def gradient(loss_tokens_fn, micro_batch_size):
        trainer = Trainer(tiny_model(0), config(batch_size=4, micro_batch_size=micro_batch_size, grad_clip=0.0),
                          RunDir.create(tmp_path, f"r{micro_batch_size}{loss_tokens_fn is None}"),
                          batch_fn=lambda step, i, n: micro[i] if n == 2 else (rows, masks),
                          loss_fn=masked_lm_loss, loss_tokens_fn=loss_tokens_fn)  # fmt: skip
        grads = {}
        trainer.optimizer.step = lambda: grads.update(
            {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        )
        metrics = trainer.train_step()
        return grads, metrics["loss"]

    count = lambda b: int(b[1][:, 1:].sum())  # noqa: E731
    big, big_loss = gradient(None, 4)  # one batch: the mean over all 62 loss tokens
    acc, acc_loss = gradient(count, 2)
    old, _ = gradient(None, 2)
    assert math.isclose(acc_loss, big_loss, rel_tol=1e-6)
    for name in big:
        torch.testing.assert_close(acc[name], big[name], atol=1e-6, rtol=0, msg=name)
    worst = max((old[n] - big[n]).abs().max().item() for n in big)
    assert worst > 1e-3  # the old convention is another gradient: this test tells them apart


def test_activation_checkpointing_finds_the_blocks_of_a_model_that_holds_a_transformer(tmp_path):
    """A reward model or PPO's policy-with-value keeps its Transformer as an attribute: blocks are found by type."""

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = tiny_model()

        def forward(self, x):
            return self.trunk(x)

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    trainer = Trainer(Wrapped(), config(activation_checkpointing=True), run, batch_fn=batch_fn_for(8), loss_fn=lm_loss)
    assert [b.checkpoint for b in trainer.raw_model.trunk.blocks] == [True, True]


def test_a_tensor_parallel_degree_without_a_tensor_parallel_layout_is_refused():
    with pytest.raises(ValueError, match="tp=2 is the tensor-parallel degree"):
        TrainConfig(parallel="ddp", tp=2).validate()
    TrainConfig(parallel="fsdp+tp", tp=2).validate()
