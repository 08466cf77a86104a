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


# ---- SECURITY.md is true of the code ------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def _calls(name: str):
    """(file, ast.Call) of every call to `*.name(...)` or `name(...)` in the lmforge package."""
    import ast

    for file in sorted((ROOT / "lmforge").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield file.relative_to(ROOT).as_posix(), node


def test_security_md_is_true_of_the_code():
    import ast

    import yaml

    from lmforge.config import _Loader

    doc = (ROOT / "SECURITY.md").read_text()
    for claim in ("weights_only=True", "SafeLoader", "trust_remote_code", "127.0.0.1", "--host", "dcp/.metadata"):
        assert claim in doc, claim
    torch_loads = list(_calls("load"))
    for file, call in torch_loads:  # torch.load only with weights_only=True, only for trainer state
        if isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", None) == "torch":
            assert file == "lmforge/train/checkpoint.py", file
            assert any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in call.keywords)
        if isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", None) == "yaml":
            loader = next(k.value for k in call.keywords if k.arg == "Loader")
            assert getattr(loader, "id", None) == "_Loader" and issubclass(_Loader, yaml.SafeLoader), file
        if isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", None) == "dcp":
            assert file == "lmforge/train/checkpoint.py", file  # DCP only behind the checksum check
    source = "".join(f.read_text() for f in (ROOT / "lmforge").rglob("*.py"))
    for never in ("import pickle", "trust_remote_code=True", "from_pretrained(", "allow_pickle", "unsafe_load"):
        assert never not in source, never


def test_resume_follows_no_dcp_path_that_a_checkpoint_file_names(tmp_path):
    """trainer.pt of a (pre-checksum) checkpoint holding a `sharded_path` to a malicious DCP folder: resuming
    must not read it; and apply_sharded reads only the DCP folder of a checkpoint load_checkpoint verified."""
    from train_helpers import batch_fn_for, lm_loss, tiny_model

    from lmforge.runs import RunDir
    from lmforge.train.checkpoint import apply_sharded
    from lmforge.train.loop import TrainConfig, Trainer

    cfg = TrainConfig(steps=1, batch_size=2, precision="fp32", progress=False, warmup_steps=1)
    run = RunDir.create(tmp_path, "r")
    Trainer(tiny_model(), cfg, run, batch_fn=batch_fn_for(2), loss_fn=lm_loss).fit()
    ckpt = run.checkpoints / "step_000001"
    evil, marker = tmp_path / "evil" / "dcp", tmp_path / "marker"
    evil.mkdir(parents=True)
    (evil / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    torch.save({**state, "sharded_path": str(evil)}, ckpt / "trainer.pt")
    info = json.loads((ckpt / "info.json").read_text())
    info.pop("files", None)  # as an older lmforge saved it: loaded unverified, yet never through a pickle
    (ckpt / "info.json").write_text(json.dumps(info))
    resumed = Trainer(tiny_model(seed=3), cfg, RunDir(run.path), batch_fn=batch_fn_for(2), loss_fn=lm_loss,
                      resume=True)  # fmt: skip
    assert resumed.step == 1 and not marker.exists()
    with pytest.raises(UserError, match="verified"):
        apply_sharded(str(evil), resumed.model, resumed.optimizer)
    assert not marker.exists()
