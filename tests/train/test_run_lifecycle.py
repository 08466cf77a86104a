"""A run's life through the CLI: resume takes the run's own config, the seed reproduces it, a signal stops it
with the shell's code, one process at a time writes into it, and its metrics.jsonl stays strict JSON."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.config import load_config

TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.max_seq_len=32", "train.batch_size=2",
        "train.precision=fp32", "train.progress=false", "eval.batches=1", "eval.batch_size=2",
        "train.warmup_steps=1", "train.log_every=1"]  # fmt: skip
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lifecycle")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"f{i}.txt").write_text("".join(f"line {i} {j}: {j * i % 97}\n" for j in range(150)))
    from lmforge.data.prepare import PrepareConfig
    from lmforge.data.prepare import run as prepare

    return prepare(load_config(PrepareConfig, None, [f"source=text:{corpus}", f"out={root / 'data'}",
                                                      "tokenizer_kind=char", "val_fraction=0.3"]))  # fmt: skip


def pretrain(data: Path, runs: Path, *extra: str) -> int:
    return main(["pretrain", "--config", str(REPO / "configs/pretrain/tiny.yaml"), f"data={data}",
                 f"runs_dir={runs}", *TINY, *extra])  # fmt: skip


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]  # fmt: skip


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---- item 1: --resume continues the run it names ------------------------------------------------------


def test_resume_takes_the_runs_own_config_and_only_the_overrides_given_now(data, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert pretrain(data, runs, "name=mine", "train.steps=3", "train.checkpoint_every=100") in (0, None)
    saved = (runs / "mine" / "config.yaml").read_text()
    # The README's line: the recipe says d_model 256 × 4 layers, the run has 32 × 1; the run's own config wins.
    assert main(["pretrain", "--config", str(REPO / "configs/pretrain/tiny.yaml"), f"runs_dir={runs}",
                 "name=mine", "--resume", "train.steps=5", "train.lr=1e-3"]) in (0, None)  # fmt: skip
    cfg = yaml_of(runs / "mine" / "config.yaml")
    assert cfg["model"] == yaml_of_text(saved)["model"] and cfg["train"]["steps"] == 5 and cfg["train"]["lr"] == 1e-3
    assert [s for s, _ in losses(runs / "mine")] == [1, 2, 3, 4, 5]
    assert "resumed from" in capsys.readouterr().out


def test_resume_refuses_a_change_of_architecture_and_leaves_the_run_as_it_was(data, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert pretrain(data, runs, "name=mine", "train.steps=2") in (0, None)
    before = {p.relative_to(runs): p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert pretrain(data, runs, "name=mine", "--resume", "model.n_layer=2") == 2
    err = one_line(capsys.readouterr().err)
    assert "cannot change what the checkpoint was trained as" in err and "model.n_layer" in err
    assert {p.relative_to(runs): p.read_bytes() for p in runs.rglob("*") if p.is_file()} == before


@pytest.fixture(scope="module")
def other(data: Path) -> Path:
    """The same corpus, tokenized by a BPE tokenizer instead of the char one."""
    from lmforge.data.prepare import PrepareConfig
    from lmforge.data.prepare import run as prepare

    return prepare(load_config(PrepareConfig, None, [f"source=text:{data.parent / 'corpus'}",
                                                     f"out={data.parent / 'bpe'}", "vocab_size=300",
                                                     "val_fraction=0.3"]))  # fmt: skip


def test_resume_on_data_of_another_tokenizer_is_refused_before_the_config_is_touched(data, other, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert pretrain(data, runs, "name=mine", "train.steps=2") in (0, None)
    config = (runs / "mine" / "config.yaml").read_bytes()
    capsys.readouterr()
    assert pretrain(data, runs, "name=mine", "--resume", f"data={other}", "train.steps=4") == 2
    assert "another tokenizer" in one_line(capsys.readouterr().err)
    assert (runs / "mine" / "config.yaml").read_bytes() == config


def test_resume_of_a_run_without_checkpoint_says_it_starts_from_scratch(data, tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "fresh").mkdir(parents=True)
    (runs / "fresh" / "notes.txt").write_text("mine")
    assert pretrain(data, runs, "name=fresh", "--resume", "train.steps=1") in (0, None)
    assert "no checkpoint yet, so training starts from step 0" in capsys.readouterr().out
    assert pretrain(data, runs, "name=new", "--resume", "train.steps=1") in (0, None)
    assert "nothing to resume" in capsys.readouterr().err


# ---- item 4: the seed reproduces a run bit for bit ------------------------------------------------------


def test_two_fresh_pretraining_runs_with_one_seed_log_the_same_losses(data, tmp_path):
    import torch

    for name in ("a", "b"):
        torch.manual_seed(len(name) * 1000 + ord(name))  # whatever state the process was left in
        assert pretrain(data, tmp_path, f"name={name}", "train.steps=3", "train.seed=7") in (0, None)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert pretrain(data, tmp_path, "name=c", "train.steps=3", "train.seed=8") in (0, None)
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


def test_eval_on_data_of_another_tokenizer_is_refused_in_one_line(data, other, tmp_path, capsys):
    assert pretrain(data, tmp_path, "name=e", "train.steps=1") in (0, None)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "e"), "--data", str(other)]) == 2
    assert "another tokenizer" in one_line(capsys.readouterr().err)
    assert main(["eval", str(tmp_path / "e"), "--data", str(data), "--json"]) in (0, None)  # its own: fine


# ---- item 7: signals, one writer at a time, strict JSON -----------------------------------------------


def _pretrain_process(data: Path, runs: Path, *extra: str) -> subprocess.Popen:
    code = "import sys; from lmforge.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [sys.executable, "-c", code, "pretrain", "--config", str(REPO / "configs/pretrain/tiny.yaml"),
            f"data={data}", f"runs_dir={runs}", *TINY, *extra]  # fmt: skip
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)


def test_sigterm_checkpoints_and_exits_143_and_a_second_writer_is_refused(data, tmp_path):
    runs = tmp_path / "runs"
    proc = _pretrain_process(data, runs, "name=long", "train.steps=100000", "train.checkpoint_every=100000")
    try:
        _wait_for(runs / "long" / "metrics.jsonl", proc)
        second = _pretrain_process(data, runs, "name=long", "--resume")
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2 and "in use by another lmforge process" in one_line(err)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM == 143
    assert "SIGTERM" in err and "--resume" in err.strip().splitlines()[-1]
    assert any((runs / "long" / "checkpoints").glob("step_*"))  # resumable


def test_a_stopped_pretraining_run_stops_the_demo_before_it_samples(data, tmp_path, monkeypatch, capsys):
    from lmforge.train.loop import Trainer

    step = Trainer.train_step

    def interrupted(self):  # as if SIGTERM arrived during the first step
        self._stop_signal = signal.SIGTERM
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--data", str(data), "--config", str(REPO / "configs/pretrain/tiny.yaml"), *TINY,
                 "train.steps=50"]) == 143  # fmt: skip
    out = capsys.readouterr().out
    assert "2/4 pretrain" in out and "3/4" not in out


def test_metrics_are_strict_json_with_null_for_a_skipped_step(tmp_path):
    from lmforge.runs import RunDir

    run = RunDir.create(tmp_path, "r")
    run.log_metrics(1, loss=float("nan"), grad_norm=float("inf"), skipped=True)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    (record,) = [json.loads(line, parse_constant=refuse) for line in run.metrics_path.read_text().splitlines()]
    assert record["loss"] is None and record["grad_norm"] is None and record["skipped"] is True


def test_a_resumed_run_has_each_step_once_in_its_metrics(data, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    assert pretrain(data, runs, "name=r", "train.steps=4", "train.checkpoint_every=2") in (0, None)
    shutil.rmtree(runs / "r" / "checkpoints" / "step_000004")  # as if killed after logging steps 3 and 4
    assert pretrain(data, runs, "name=r", "--resume", "train.steps=4") in (0, None)
    assert [s for s, _ in losses(runs / "r")] == [1, 2, 3, 4]


def yaml_of(path: Path) -> dict:
    return yaml_of_text(path.read_text())


def yaml_of_text(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


@pytest.mark.parametrize("option", [["--temperature", "-1"], ["--max-new-tokens", "-1"], ["--top-k", "-2"]])
def test_sample_with_an_option_out_of_range_is_one_line_before_the_model_loads(option, tmp_path, capsys):
    assert main(["sample", str(tmp_path / "no-such-run"), *option]) == 2
    err = one_line(capsys.readouterr().err)
    assert option[0] in err and "no-such-run" not in err


@pytest.mark.parametrize("bad", ["train.lr=nan", "train.lr=.inf", "train.min_lr=nan", "train.beta2=1.5"])
def test_a_learning_rate_that_is_not_a_number_is_one_line(bad, tmp_path, capsys):
    assert main(["pretrain", f"runs_dir={tmp_path}", "name=x", bad]) == 2
    err = one_line(capsys.readouterr().err)
    assert bad.split("=")[0].split(".")[1] in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("damage", ["cut train.bin", "garbage meta.json", "meta.json of another shape"])
def test_damaged_prepared_data_is_one_line(damage, data, tmp_path, capsys):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    if damage == "cut train.bin":
        (copy / "train.bin").write_bytes((copy / "train.bin").read_bytes()[:-3])
    elif damage == "garbage meta.json":
        (copy / "meta.json").write_bytes(b"\xff{not json")
    else:
        (copy / "meta.json").write_text('{"dtype": "uint16", "train": 5}')
    assert pretrain(copy, tmp_path / "runs", "name=x", "train.steps=1") == 2
    assert "lmforge prepare" in one_line(capsys.readouterr().err)


def test_a_damaged_newest_checkpoint_is_reported_once_per_command(data, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert pretrain(data, runs, "name=d", "train.steps=4", "train.checkpoint_every=2") in (0, None)
    weights = runs / "d" / "checkpoints" / "step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main(["sample", str(runs / "d"), "--max-new-tokens", "3"]) in (0, None)
    err = capsys.readouterr().err
    assert err.count("skipped checkpoint step_000004") == 1 and "using" in err


def test_a_window_longer_than_the_data_is_refused_before_the_run_folder_is_made(data, tmp_path, capsys):
    assert pretrain(data, tmp_path, "name=w", "model.max_seq_len=100000") == 2
    assert "fewer than one window" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "w").exists()


def test_eval_of_no_window_or_a_negative_batch_count_is_an_error_not_a_zero_loss(data, tmp_path, capsys):
    import shutil

    assert pretrain(data, tmp_path, "name=e", "train.steps=1") in (0, None)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # argparse: usage line and exit 2
        main(["eval", str(tmp_path / "e"), "--batches", "-1"])
    assert stop.value.code == 2 and "--batches: must be ≥ 0" in capsys.readouterr().err
    small = tmp_path / "small"
    shutil.copytree(data, small)
    meta = json.loads((small / "meta.json").read_text())
    meta["val"]["tokens"] = 20  # a val split shorter than one window of 33 tokens
    (small / "meta.json").write_text(json.dumps(meta))
    (small / "val.bin").write_bytes((small / "val.bin").read_bytes()[:40])
    assert main(["eval", str(tmp_path / "e"), "--data", str(small)]) == 2
    assert "holds no window" in one_line(capsys.readouterr().err)
