"""lmforge.runs: run folders, metrics.jsonl, and atomic writes that survive a crash mid-write."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest

from lmforge.config import ConfigError
from lmforge.runs import RunDir, atomic_open, atomic_write_bytes, atomic_write_text, read_metrics


@dataclass
class Cfg:
    lr: float = 1e-3
    steps: int = 10


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_and_creates_parents(tmp_path):
    path = tmp_path / "a" / "b.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert names(path.parent) == ["b.txt"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = atomic_write_text(tmp_path / "state.json", "old")
    with pytest.raises(RuntimeError), atomic_open(path, "w") as f:
        f.write("half of the new")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert names(tmp_path) == ["state.json"]  # the temp file is cleaned up


def test_atomic_write_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = atomic_write_bytes(tmp_path / "model.bin", b"old")

    def fail(src, dst):
        raise OSError("no space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="no space"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["model.bin"]


def test_atomic_file_gets_normal_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "x", "")
    plain = tmp_path / "y"
    plain.write_text("")
    assert path.stat().st_mode == plain.stat().st_mode  # not mkstemp's 0o600


def test_atomic_open_rejects_append():
    with pytest.raises(ValueError), atomic_open("x", "a"):
        pass


def test_create_writes_config_and_paths(tmp_path):
    run = RunDir.create(tmp_path, "tiny", config=Cfg(lr=0.5))
    assert run.path == tmp_path / "tiny" and run.name == "tiny"
    assert run.config_path == run.path / "config.yaml"
    assert run.metrics_path == run.path / "metrics.jsonl"
    assert run.checkpoints == run.path / "checkpoints"
    assert run.load_config(Cfg) == Cfg(lr=0.5)
    assert run.load_config(Cfg, ["steps=3"]) == Cfg(lr=0.5, steps=3)
    assert not run.resumed


def test_default_name_is_a_timestamp_and_never_collides(tmp_path):
    first = RunDir.create(tmp_path)
    second = RunDir.create(tmp_path)
    assert first.path != second.path
    date, hhmm = first.name.split("_")[:2]
    assert len(date) == 10 and date.count("-") == 2 and len(hhmm) == 4 and hhmm.isdigit()
    assert second.name.startswith(first.name)


def test_refuses_a_non_empty_run_folder(tmp_path):
    RunDir.create(tmp_path, "tiny", config=Cfg())
    with pytest.raises(FileExistsError) as info:
        RunDir.create(tmp_path, "tiny", config=Cfg(steps=99))
    message = str(info.value)
    assert "\n" not in message and "--resume" in message and "tiny" in message
    assert RunDir.open(tmp_path / "tiny").load_config(Cfg) == Cfg()  # untouched


def test_an_empty_existing_folder_is_fine(tmp_path):
    (tmp_path / "tiny").mkdir()
    assert RunDir.create(tmp_path, "tiny").path.is_dir()


def test_resume_and_exist_ok(tmp_path):
    run = RunDir.create(tmp_path, "tiny", config=Cfg())
    run.log_metrics(1, loss=2.0)
    resumed = RunDir.create(tmp_path, "tiny", config=Cfg(steps=20), resume=True)
    assert resumed.resumed
    assert resumed.load_config(Cfg).steps == 10  # not yet: written once the stage has loaded its checkpoint
    resumed.save_config()
    assert resumed.load_config(Cfg).steps == 20  # the config now in force
    assert [r["loss"] for r in resumed.read_metrics()] == [2.0]  # earlier history kept
    added = RunDir.create(tmp_path, "tiny", exist_ok=True)
    assert not added.resumed and added.load_config(Cfg).steps == 20
    fresh = RunDir.create(tmp_path, "new", resume=True)  # nothing to resume: just start
    assert not fresh.resumed and fresh.path.is_dir()


@pytest.mark.parametrize("name", ["", "../escape", "/abs"])
def test_bad_run_names(tmp_path, name):
    with pytest.raises(ConfigError):
        RunDir.create(tmp_path, name)


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        RunDir.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        RunDir.open(tmp_path / "empty")


def test_log_and_read_metrics(tmp_path):
    run = RunDir.create(tmp_path, "m", config=Cfg())
    assert run.read_metrics() == []

    class Scalar:  # stands in for a 0-d torch tensor or numpy scalar
        def item(self):
            return 0.25

    record = run.log_metrics(1, loss=3.5, lr=1e-3)
    run.log_metrics(2, loss=Scalar(), split="val")
    assert record["step"] == 1 and isinstance(record["time"], float)
    lines = run.metrics_path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)
    records = read_metrics(run.path)  # a run folder or the file itself
    assert records == read_metrics(run.metrics_path) == run.read_metrics()
    assert [(r["step"], r["loss"]) for r in records] == [(1, 3.5), (2, 0.25)]
    assert records[1]["split"] == "val" and records[0]["time"] <= records[1]["time"]
    assert list(records[0]) == ["step", "time", "loss", "lr"]


def test_log_metrics_rejects_reserved_and_unserialisable(tmp_path):
    run = RunDir.create(tmp_path, "m")
    with pytest.raises(ValueError, match="time"):
        run.log_metrics(1, time=3)
    with pytest.raises(TypeError, match="object"):
        run.log_metrics(1, thing=object())


def test_read_metrics_skips_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_metrics(path)


def test_the_run_folder_lock_is_held_while_its_rundir_lives_and_released_after(tmp_path):
    import gc
    import subprocess
    import sys

    probe = (
        "import sys; from lmforge.runs import RunDir\n"
        "try:\n    RunDir.create(sys.argv[1], 'r', resume=True)\nexcept ValueError:\n    sys.exit(3)\n"
    )

    def other_process_can_write() -> bool:
        return subprocess.run([sys.executable, "-c", probe, str(tmp_path)], timeout=60).returncode == 0

    run = RunDir.create(tmp_path, "r", config=Cfg())
    again = RunDir.create(tmp_path, "r", resume=True)  # the same process: shares the lock
    assert not other_process_can_write()
    del run
    gc.collect()
    assert not other_process_can_write()  # `again` still holds it
    del again
    gc.collect()
    assert other_process_can_write()
