"""Loading a model a user points at never unpickles: a checkpoint without model.safetensors whose DCP
`.metadata` is a malicious pickle is refused in one line by every loader, and the pickle never runs.

    .venv/bin/python -m pytest -q tests/infer/test_loading.py
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_artifacts import MODEL, tiny_run  # noqa: E402

from lmforge.cli import main  # noqa: E402
from lmforge.config import UserError  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # runs on unpickling
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.fixture
def poisoned(tmp_path):
    """A run whose only checkpoint is a sharded one without model.safetensors and a malicious dcp/.metadata."""
    run = tiny_run(tmp_path / "run", steps=(1,))
    ckpt = run / "checkpoints" / "step_000001"
    (ckpt / "model.safetensors").unlink()
    (ckpt / "dcp").mkdir()
    marker = tmp_path / "marker"
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (ckpt / "info.json").write_text(json.dumps({"step": 1, "sharded": True}))
    return SimpleNamespace(run=run, ckpt=ckpt, marker=marker, out=tmp_path / "out")


def _load_weights(p):
    from lmforge.train.checkpoint import load_weights

    load_weights(p.ckpt, Transformer(ModelConfig(**MODEL)))


def _for_inference(target):
    def load(p):
        from lmforge.infer.loading import load_for_inference

        load_for_inference(getattr(p, target))

    return load


def _sft_base(p):
    from lmforge.align.stage import load_base

    load_base(SimpleNamespace(base=str(p.run), model=None))


def _reward_model(p):
    from lmforge.align.reward import load_reward_model

    load_reward_model(p.run)


def _resume(p):
    from lmforge.runs import RunDir
    from lmforge.train.loop import TrainConfig, Trainer

    cfg = TrainConfig(steps=2, batch_size=1, precision="fp32", progress=False)
    Trainer(Transformer(ModelConfig(**MODEL)), cfg, RunDir(p.run), batch_fn=None, loss_fn=None, resume=True)


LOADERS = {
    "load_weights": _load_weights,
    "load_for_inference(checkpoint)": _for_inference("ckpt"),
    "load_for_inference(run)": _for_inference("run"),
    "sft base=": _sft_base,
    "reward model": _reward_model,
    "--resume": _resume,
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_no_loader_unpickles_a_checkpoint_without_safetensors(poisoned, loader):
    with pytest.raises(UserError, match="no model.safetensors in") as e:
        LOADERS[loader](poisoned)
    assert "\n" not in str(e.value)
    assert not poisoned.marker.exists()


COMMANDS = {
    "sample": lambda p: ["sample", str(p.run), "--max-new-tokens", "1"],
    "eval": lambda p: ["eval", str(p.run)],
    "export": lambda p: ["export", str(p.run), "--out", str(p.out)],
    "generate": lambda p: ["generate", "--ckpt", str(p.ckpt), "--max-new-tokens", "1"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_command_unpickles_a_checkpoint_without_safetensors(poisoned, command, capsys):
    assert main(COMMANDS[command](poisoned)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error: ") and "\n" not in err and "no model.safetensors in" in err, err
    assert not poisoned.marker.exists() and not poisoned.out.exists()


def test_the_three_kinds_of_path_load_the_same_model(tmp_path):
    from lmforge.infer.loading import load_for_inference

    run = tiny_run(tmp_path / "run")
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    expected, _ = load_for_inference(run / "checkpoints" / "step_000002")
    for path in (run, tmp_path / "hf"):
        model, tok = load_for_inference(path)
        torch.testing.assert_close(model.state_dict(), expected.state_dict())
        assert tok.decode(tok.encode("def f")) == "def f"
