"""Checkpoints survive a SIGKILL mid-write, and hold only safetensors and weights_only-loadable state."""

import subprocess
import sys
import textwrap

import pytest
import torch
from train_helpers import tiny_model

from lmforge.config import UserError
from lmforge.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_sigkill_during_a_write_leaves_the_previous_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(__file__.rsplit("/", 1)[0])!r})
        import torch
        from train_helpers import tiny_model
        import lmforge.train.checkpoint as ck
        model = tiny_model()
        ck.save_checkpoint({str(tmp_path)!r}, 1, model, {{"step": 1}})
        real_save = ck.save_model
        def dying_save(m, path):
            real_save(m, path)
            os.kill(os.getpid(), signal.SIGKILL)   # weights written, state and rename not yet
        ck.save_model = dying_save
        ck.save_checkpoint({str(tmp_path)!r}, 2, model, {{"step": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert (tmp_path / "step_000002.tmp").exists()  # the half-written one is there, and ignored
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_000001"
    model = tiny_model(seed=5)
    assert load_checkpoint(latest, model)["step"] == 1
    torch.testing.assert_close(model.state_dict(), tiny_model().state_dict())


def test_state_loads_with_weights_only_and_rng_round_trips(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    torch.manual_seed(7)
    state = {"optimizer": opt.state_dict(), "rng": rng_state(), "step": 3}
    path = save_checkpoint(tmp_path, 3, model, state)
    expected = torch.rand(3)
    loaded = torch.load(path / "trainer.pt", weights_only=True)  # would raise on arbitrary pickles
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected)
    assert sorted(p.name for p in path.iterdir()) == ["info.json", "model.safetensors", "trainer.pt"]


def test_fsdp_save_gathers_the_weights_into_model_safetensors(tmp_path):
    """2 gloo ranks under FSDP2 write DCP shards and, from rank 0, the full weights as model.safetensors: the
    same tensors as the shards hold, loadable into a plain model without reading DCP."""
    import torch.distributed.checkpoint as dcp
    from test_distributed import launch

    from lmforge.train.checkpoint import load_weights

    launch(tmp_path, "fsdp", 1, 2)
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    gathered = tiny_model(seed=5)
    load_weights(ckpt, gathered)
    shards = {"model": tiny_model(seed=6).state_dict()}
    dcp.load(shards, checkpoint_id=str(ckpt / "dcp"), no_dist=True)  # our own test checkpoint: trusted
    torch.testing.assert_close(gathered.state_dict(), shards["model"], atol=0, rtol=0)
    assert not torch.equal(gathered.tok_emb.weight, tiny_model().tok_emb.weight)  # trained, not the init


# ---- checksums: a damaged newest checkpoint falls back to the newest intact one ----------------------------
def flip_bytes(path):
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # the last tensor's bytes: still a valid safetensors file
    path.write_bytes(bytes(data))


DAMAGES = {
    "flipped bytes": lambda ckpt: flip_bytes(ckpt / "model.safetensors"),
    "truncated": lambda ckpt: (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:99]),
    "missing weights": lambda ckpt: (ckpt / "model.safetensors").unlink(),
    "damaged info.json": lambda ckpt: (ckpt / "info.json").write_text('{"step": 2, "fil'),
    "damaged trainer.pt": lambda ckpt: flip_bytes(ckpt / "trainer.pt"),
}


def test_save_records_size_and_sha256_of_every_file(tmp_path):
    import hashlib
    import json

    path = save_checkpoint(tmp_path, 1, tiny_model(), {"step": 1})
    files = json.loads((path / "info.json").read_text())["files"]
    assert sorted(files) == ["model.safetensors", "trainer.pt"]
    for name, record in files.items():
        data = (path / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_for_inference(tmp_path, capsys, damage):
    from test_artifacts import tiny_run, weights_of_step

    from lmforge.infer.loading import load_for_inference

    run = tiny_run(tmp_path / "run", steps=(1, 2))
    DAMAGES[damage](run / "checkpoints" / "step_000002")
    capsys.readouterr()
    model, _ = load_for_inference(run)
    torch.testing.assert_close(model.state_dict(), weights_of_step(1))
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "step_000002" in err and str(run / "checkpoints" / "step_000001") in err, err


def test_a_damaged_checkpoint_given_by_name_is_refused_in_one_line(tmp_path):
    from test_artifacts import tiny_run

    from lmforge.infer.loading import load_for_inference

    ckpt = tiny_run(tmp_path / "run", steps=(1,)) / "checkpoints" / "step_000001"
    flip_bytes(ckpt / "model.safetensors")
    with pytest.raises(UserError, match="sha256") as e:
        load_for_inference(ckpt)
    assert str(ckpt / "model.safetensors") in str(e.value) and "\n" not in str(e.value)


def test_no_intact_checkpoint_is_one_line(tmp_path):
    from test_artifacts import tiny_run

    run = tiny_run(tmp_path / "run", steps=(1, 2))
    for step in (1, 2):
        flip_bytes(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors")
    with pytest.raises(UserError, match="no intact checkpoint") as e:
        latest_checkpoint(run / "checkpoints")
    assert "step_000001" in str(e.value) and "step_000002" in str(e.value) and "\n" not in str(e.value)


def test_resume_goes_on_from_the_previous_checkpoint_when_the_newest_is_damaged(tmp_path, capsys):
    from train_helpers import batch_fn_for, lm_loss

    from lmforge.runs import RunDir, read_metrics
    from lmforge.train.loop import TrainConfig, Trainer

    def make(run, seed=0, resume=False, **kw):
        cfg = TrainConfig(steps=4, batch_size=8, lr=1e-2, warmup_steps=1, min_lr=1e-3, precision="fp32",
                          eval_every=1000, log_every=1, progress=False, **kw)  # fmt: skip
        return Trainer(tiny_model(seed), cfg, run, batch_fn=batch_fn_for(8), loss_fn=lm_loss, resume=resume)

    straight = RunDir.create(tmp_path, "straight")
    make(straight).fit()
    run = RunDir.create(tmp_path, "damaged")
    make(run, checkpoint_every=2).fit()  # checkpoints at steps 2 and 4
    flip_bytes(run.checkpoints / "step_000004" / "model.safetensors")
    capsys.readouterr()
    resumed = make(RunDir(run.path), seed=9, resume=True)
    assert resumed.step == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "step_000004" in line]
    assert len(err) == 1 and "sha256" in err[0] and "step_000002" in err[0]
    resumed.fit()
    assert latest_checkpoint(run.checkpoints).name == "step_000004"  # saved again, intact
    losses = {r["step"]: r["loss"] for r in read_metrics(run.path)}
    assert [losses[s] for s in (3, 4)] == [r["loss"] for r in read_metrics(straight.path)][2:]


def test_a_checkpoint_saved_without_checksums_still_loads_with_one_line(tmp_path, capsys):
    import json

    path = save_checkpoint(tmp_path, 1, tiny_model(), {"step": 1})
    info = json.loads((path / "info.json").read_text())
    del info["files"]
    (path / "info.json").write_text(json.dumps(info))
    capsys.readouterr()
    model = tiny_model(seed=5)
    assert load_checkpoint(latest_checkpoint(tmp_path), model)["step"] == 1
    torch.testing.assert_close(model.state_dict(), tiny_model().state_dict())
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no checksums" in err


def test_resume_never_reads_dcp_of_a_sharded_checkpoint_without_checksums(tmp_path):
    """A sharded checkpoint from before checksums (or one planted to look like it): model.safetensors is there,
    but its DCP state is a pickle and is not read."""
    import json
    import pickle

    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    path = save_checkpoint(tmp_path / "ck", 1, tiny_model(), {"step": 1})
    (path / "dcp").mkdir()
    (path / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    (path / "info.json").write_text(json.dumps({"step": 1, "sharded": True}))
    with pytest.raises(UserError, match="checksums"):
        load_checkpoint(latest_checkpoint(tmp_path / "ck"), tiny_model())
    assert not marker.exists()
