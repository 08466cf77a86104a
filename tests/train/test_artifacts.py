"""What a finished run is used for, through the CLI: export refuses a non-empty --out unless --overwrite and
then replaces only its own files, crash-safely.

    .venv/bin/python -m pytest -q tests/train/test_artifacts.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import save_config
from lmforge.model import ModelConfig, Transformer
from lmforge.runs import FAULT_ENV
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import save_checkpoint
from lmforge.train.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[2]
MODEL = dict(vocab_size=64, max_seq_len=16, n_layer=1, d_model=16, n_head=2, position="rope", ffn="swiglu",
             norm="rmsnorm", bias=False)  # fmt: skip


def tiny_run(path: Path, steps=(1, 2)) -> Path:
    """A run folder as `lmforge pretrain` leaves it (config.yaml, tokenizer.json, checkpoints/step_*), made in
    milliseconds: a char tokenizer trained here, a 1-layer Llama-shaped model, one checkpoint per step whose
    weights are the model initialised with seed=step."""
    path.mkdir(parents=True)
    Tokenizer.train_char(["def f(x):\n    return x + 1\n"]).save(path)
    cfg = PretrainConfig(model=ModelConfig(**MODEL))
    save_config(cfg, path / "config.yaml")
    for step in steps:
        torch.manual_seed(step)
        save_checkpoint(path / "checkpoints", step, Transformer(cfg.model), {"step": step})
    return path


def weights_of_step(step: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(step)
    return Transformer(ModelConfig(**MODEL)).state_dict()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("artifacts") / "run")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error: ") and "\n" not in err, err
    return err


def test_export_refuses_a_non_empty_out_and_overwrite_keeps_other_files(run, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_000001.bin").write_bytes(b"mine")
    (out / "notes.txt").write_text("keep me")
    assert main(["export", str(run), "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert str(out) in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "notes.txt"]  # nothing touched

    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "notes.txt"} <= names
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "checkpoints" / "step_000001.bin").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left beside it


def test_export_into_a_new_folder_needs_no_overwrite(run, tmp_path):
    from lmforge.model.hf import from_hf

    assert main(["export", str(run), "--out", str(tmp_path / "new")]) == 0
    torch.testing.assert_close(from_hf(tmp_path / "new").state_dict(), weights_of_step(2))


def test_export_killed_mid_write_leaves_the_previous_export(run, tmp_path):
    out = tmp_path / "out"
    assert main(["export", str(run), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "notes.txt").write_text("keep me")
    proc = subprocess.run(  # killed before its 5th file: the first four are in the temporary folder
        [sys.executable, "-m", "lmforge", "export", str(run), "--out", str(out), "--overwrite"],
        env={**os.environ, FAULT_ENV: "5"}, cwd=ROOT, capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "notes.txt"} == before
    assert (out / "notes.txt").read_text() == "keep me"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_model_safetensors_is_one_line(tmp_path, capsys, damage):
    run = tiny_run(tmp_path / "run", steps=(1,))
    weights = run / "checkpoints" / "step_000001" / "model.safetensors"
    if damage == "truncated":
        truncate(weights)
    else:
        weights.write_bytes(b"not safetensors at all")
    for argv in (["sample", str(weights.parent)], ["eval", str(weights.parent)]):
        assert main(argv) == 2
        err = one_line_error(capsys)
        assert str(weights) in err and "earlier checkpoint" in err


def test_a_damaged_hf_folder_is_one_line(run, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(hf)]) == 0
    capsys.readouterr()  # transformers' progress bar
    truncate(hf / "model.safetensors")
    assert main(["generate", "--ckpt", str(hf), "--max-new-tokens", "1"]) == 2
    err = one_line_error(capsys)
    assert str(hf / "model.safetensors") in err and "truncated" in err
    (hf / "model.safetensors").unlink()
    assert main(["sample", str(hf), "--max-new-tokens", "1"]) == 2
    assert "no model.safetensors" in one_line_error(capsys)


def test_a_run_without_checkpoints_names_what_to_give(tmp_path, capsys):
    run = tiny_run(tmp_path / "run", steps=())
    for argv in (["sample", str(run)], ["eval", str(run)], ["export", str(run), "--out", str(tmp_path / "o")]):
        assert main(argv) == 2
        err = one_line_error(capsys)
        assert "no checkpoint in" in err and "--step" not in err and "checkpoints/step_" in err
