"""Checkpoints survive a SIGKILL mid-write, and hold only safetensors and weights_only-loadable state."""

import subprocess
import sys
import textwrap

import torch
from train_helpers import tiny_model

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
