"""ModelConfig.validate: shapes the modules cannot build are refused in one line that names the keys and a value
that works, from Python, from a YAML file, from overrides and from the CLI (exit 2, no traceback)."""

from __future__ import annotations

import pytest

from lmforge import cli
from lmforge.config import ConfigError, load_config
from lmforge.model import ModelConfig, Transformer
from lmforge.train.pretrain import PretrainConfig


def one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lmforge: error: ")
    return lines[0]


def test_model_info_refuses_d_model_not_divisible_by_n_head(capsys):
    line = one_line_error(capsys, ["model-info", "d_model=30", "n_head=4"])
    assert "d_model (30) must be divisible by n_head (4)" in line
    assert "n_head=3" in line and "d_model=32" in line  # valid choices, ready to retype


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["n_head=6", "n_kv_head=4"], ["n_kv_head", "n_kv_head=3"]),
        (["position=rope", "d_model=36", "n_head=4"], ["rope", "head_dim", "d_model=40"]),
        (["position=rope", "head_dim=7"], ["rope", "head_dim=8"]),
        (["position=sinusoidal", "d_model=33", "n_head=3"], ["sinusoidal", "d_model=34"]),
        (["attention=linear", "linear_chunk=0"], ["linear_chunk"]),
        (["attention=block_sparse", "sparse_block=0"], ["sparse_block"]),
        (["position=relative", "relative_max_distance=16"], ["relative_max_distance"]),
        (["position=rope", "d_model=8", "n_head=4", "rope_scaling=dynamic", "rope_factor=2"], ["head_dim > 2"]),
        (["position=rope", "rope_scaling=llama3", "rope_high_freq_factor=1"], ["rope_high_freq_factor"]),
    ],
)
def test_model_info_refuses_every_shape_the_model_cannot_build(capsys, overrides, words):
    line = one_line_error(capsys, ["model-info", *overrides])
    for word in words:
        assert word in line


def test_load_config_names_the_nested_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, None, ["model.d_model=30", "model.n_head=4"])
    assert info.value.key == "model.d_model"
    assert "d_model (30) must be divisible by n_head (4)" in str(info.value)
    path = tmp_path / "m.yaml"
    path.write_text("d_model: 30\nn_head: 4\n")
    with pytest.raises(ConfigError, match="must be divisible by n_head"):
        load_config(ModelConfig, path)


def test_an_explicit_head_dim_need_not_divide_d_model():
    # Qwen3 / Gemma shapes: n_head · head_dim ≠ d_model is a real architecture, and the projections handle it.
    cfg = ModelConfig(vocab_size=32, n_layer=1, d_model=30, n_head=4, head_dim=8, max_seq_len=8)
    assert cfg.q_dim == 32
    assert Transformer(cfg)
