import pytest


@pytest.fixture
def run_dir(tmp_path):
    from lmforge.runs import RunDir

    return RunDir.create(tmp_path / "runs", "t")
