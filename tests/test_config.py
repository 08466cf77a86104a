"""lmforge.config: YAML + overrides -> dataclasses, one-line errors, validate() hook, save/load round trip."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from lmforge.config import ConfigError, from_dict, load_config, save_config, to_dict


@dataclass
class Model:
    n_layer: int = 2
    d_model: int = 64
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    window: int | None = None
    dropout: float = 0.0
    scaling: Literal["linear", "llama3"] | None = None

    def validate(self):
        if self.d_model % 2:
            raise ValueError(f"d_model must be even, got {self.d_model}")


@dataclass
class Optim:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: list[int] = field(default_factory=lambda: [10, 20])


@dataclass
class Recipe:
    name: str = "tiny"
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    init_from: Model | None = None
    out: Path = Path("runs")
    compile: bool = False
    tags: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    steps: int = 100

    def validate(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


@dataclass
class Required:
    vocab_size: int


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_defaults_without_a_file():
    assert load_config(Recipe) == Recipe()


def test_yaml_nested_and_type_conversion(tmp_path):
    path = write(
        tmp_path,
        """
name: 2024            # an int, taken as text
model:
  n_layer: 4
  norm: rmsnorm
  dropout: 0          # int accepted for a float
optim:
  lr: 1e-3            # YAML 1.1 reads this as the string "1e-3"
  betas: [0.8, 0.99]
out: /tmp/somewhere
steps: 1e3            # integral scientific notation accepted for an int
tags: {a: 1}
""",
    )
    cfg = load_config(Recipe, path)
    assert cfg.name == "2024"
    assert cfg.model == Model(n_layer=4, norm="rmsnorm")
    assert isinstance(cfg.model.dropout, float)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.out == Path("/tmp/somewhere")
    assert cfg.steps == 1000 and isinstance(cfg.steps, int)
    assert cfg.tags == {"a": 1.0}


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    assert load_config(Recipe, write(tmp_path, "")) == Recipe()
    assert load_config(Recipe, write(tmp_path, "model:\n")) == Recipe()


def test_overrides_nested_none_lists_and_yaml_values(tmp_path):
    path = write(tmp_path, "model:\n  n_layer: 4\n  window: 16\n")
    cfg = load_config(
        Recipe,
        path,
        [
            "model.n_layer=8",
            "model.window=null",
            "optim.lr=2e-4",
            "optim.schedule=[1, 2, 3]",
            "compile=true",
            "init_from.d_model=32",  # creates the optional section
            "extra.note=hello world",  # free-form dict: any key
            "name=a=b",  # only the first '=' splits
        ],
    )
    assert cfg.model.n_layer == 8 and cfg.model.window is None
    assert cfg.optim.lr == 2e-4 and cfg.optim.schedule == [1, 2, 3]
    assert cfg.compile is True
    assert cfg.init_from == Model(d_model=32)
    assert cfg.extra == {"note": "hello world"}
    assert cfg.name == "a=b"
    assert load_config(Recipe, path, ["init_from=null"]).init_from is None


def test_later_override_wins_and_a_single_string_is_one_override():
    assert load_config(Recipe, None, ["steps=1", "steps=2"]).steps == 2
    assert load_config(Recipe, None, "steps=3").steps == 3


def test_round_trip(tmp_path):
    cfg = Recipe(
        name="true",  # must stay a string, not become a bool
        model=Model(n_layer=3, norm="rmsnorm", window=8, dropout=0.1),
        optim=Optim(lr=1e-10, betas=(0.5, 0.6), schedule=[]),
        init_from=Model(),
        out=Path("a/b"),
        compile=True,
        tags={"x": float("inf")},
        extra={"nested": {"list": [1, "1e-3", None]}},
        steps=0,
    )
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(Recipe, path) == cfg
    assert from_dict(Recipe, to_dict(cfg)) == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.5, 0.6]
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_save_is_atomic(tmp_path, monkeypatch):
    path = save_config(Recipe(steps=1), tmp_path / "config.yaml")
    before = path.read_text()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        save_config(Recipe(steps=2), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_unknown_yaml_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "model:\n  n_layers: 4\n")
    message = error(load_config, Recipe, path)
    assert message == f"{path}: unknown key 'model.n_layers' (did you mean 'n_layer'?)"


def test_unknown_key_without_a_close_match_lists_the_valid_ones():
    message = error(load_config, Model, None, ["zzz=1"])
    assert "unknown key 'zzz'" in message and "n_layer" in message and "window" in message


def test_unknown_override_key(tmp_path):
    message = error(load_config, Recipe, write(tmp_path, ""), ["model.n_layers=4"])
    assert "unknown key 'model.n_layers'" in message
    assert "'model.n_layer'" in message  # the full dotted key, ready to retype
    assert "model.n_layers=4" in message


def test_a_retired_key_of_an_older_file_is_dropped(tmp_path):
    # Run folders saved while activation checkpointing was a ModelConfig field hold model.activation_checkpointing;
    # it is the trainer's setting now (train.activation_checkpointing), and those folders must still load.
    import warnings

    from lmforge.train.pretrain import PretrainConfig

    path = write(tmp_path, "model:\n  n_layer: 2\n  activation_checkpointing: false\ntrain:\n  steps: 3\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # false did nothing then and does nothing now: no word about it
        cfg = load_config(PretrainConfig, path)
    assert cfg.model.n_layer == 2 and cfg.train.steps == 3 and not cfg.train.activation_checkpointing
    assert "activation_checkpointing" not in to_dict(cfg.model)

    path = write(tmp_path, "model:\n  activation_checkpointing: true\n")
    with pytest.warns(UserWarning, match=r"model\.activation_checkpointing is ignored: use train\.activation_che"):
        assert load_config(PretrainConfig, path) == PretrainConfig()

    message = error(load_config, PretrainConfig, None, ["model.activation_checkpointing=true"])
    assert "no longer a setting: use train.activation_checkpointing" in message
    assert load_config(PretrainConfig, None, ["train.activation_checkpointing=true"]).train.activation_checkpointing


def test_override_into_a_scalar_is_an_error():
    message = error(load_config, Recipe, None, ["steps.x=1"])
    assert "'steps' is an int, not a section" in message


@pytest.mark.parametrize("bad", ["foo", "=3", "model.=3", ".x=1"])
def test_bad_override_syntax(bad):
    message = error(load_config, Recipe, None, [bad])
    assert message.startswith(f"override {bad!r} must look like key=value")


def test_literal_validation(tmp_path):
    message = error(load_config, Recipe, None, ["model.norm=rmsnom"])
    assert message.startswith("override model.norm=rmsnom: 'rmsnom' is not one of 'layernorm', 'rmsnorm'")
    assert "did you mean 'rmsnorm'" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=abc", "expected a float, got 'abc'"),
        ("optim.lr=true", "expected a float, got True"),
        ("steps=1.5", "expected an int, got 1.5"),
        ("steps=null", "expected an int, got null"),
        ("compile=1", "expected true or false, got 1"),
        ("model.window=abc", "expected an int or null, got 'abc'"),
        ("optim.schedule=3", "expected a list, got 3"),
        ("optim.schedule=[1, x]", "optim.schedule[1]: expected an int, got 'x'"),
        ("optim.betas=[1, 2, 3]", "expected a list of 2 items, got 3"),
        ("tags={a: b}", "tags.a: expected a float, got 'b'"),
        ("model=3", "expected a mapping of Model fields, got 3"),
        ("name=[1]", "expected a string, got [1] (quote it)"),
        ("init_from=abc", "expected a mapping of Model fields or null, got 'abc'"),
        ("model.scaling=lineer", "'lineer' is not one of 'linear', 'llama3' (did you mean 'linear'?)"),
    ],
)
def test_type_errors_name_the_override_and_key(override, expected):
    # The override names the key; a key inside it (a list item, a mapping entry) is named as well.
    assert error(load_config, Recipe, None, [override]) == f"override {override}: {expected}"


def test_errors_from_the_file_name_the_file(tmp_path):
    path = write(tmp_path, "optim:\n  lr: fast\n")
    assert error(load_config, Recipe, path) == f"{path}: optim.lr: expected a float, got 'fast'"
    # ...but a bad value given on the command line is not blamed on the file
    message = error(load_config, Recipe, write(tmp_path, "", "ok.yaml"), ["optim.lr=fast"])
    assert message == "override optim.lr=fast: expected a float, got 'fast'"


def test_blame_goes_where_the_bad_value_came_from(tmp_path):
    good = write(tmp_path, "steps: 5\noptim:\n  lr: 0.1\n", "good.yaml")
    bad = write(tmp_path, "steps: -5\nmodel:\n  d_model: 33\n", "bad.yaml")
    # the override's value is wrong: the override, not the file, even for a section's validate()
    assert (
        error(load_config, Recipe, good, ["model.d_model=33"])
        == "override model.d_model=33: model: d_model must be even, got 33"
    )
    assert error(load_config, Recipe, good, ["steps=-1"]) == "override steps=-1: steps must be >= 0, got -1"
    assert (
        error(load_config, Recipe, good, ["steps=1", "optim.lr=x"]) == "override optim.lr=x: expected a float, got 'x'"
    )
    # the file's value is wrong, whatever else the command line sets (also inside the same section)
    assert (
        error(load_config, Recipe, bad, ["steps=3", "model.n_layer=1"]) == f"{bad}: model: d_model must be even, got 33"
    )
    assert error(load_config, Recipe, bad, ["model.d_model=32"]) == f"{bad}: steps must be >= 0, got -5"
    # ...and when an override mends one bad value of the file, the file's other bad value is still the file's
    mended = write(tmp_path, "steps: -5\noptim:\n  lr: fast\n", "mended.yaml")
    assert error(load_config, Recipe, mended, ["optim.lr=0.1"]) == f"{mended}: steps must be >= 0, got -5"
    # an override that fixes the file's value is not blamed either
    assert load_config(Recipe, bad, ["model.d_model=32", "steps=1"]).model.d_model == 32


def test_a_cross_field_validate_blames_the_override_that_broke_it(tmp_path):
    from lmforge.train.pretrain import PretrainConfig

    recipe = write(tmp_path, "train:\n  lr: 1.0e-3\n  min_lr: 1.0e-4\n")
    message = error(load_config, PretrainConfig, recipe, ["train.steps=10", "train.lr=1e-5"])
    assert message == "override train.lr=1e-5: train: min_lr (0.0001) must not exceed lr (1e-05)"
    message = error(load_config, PretrainConfig, None, ["train.lr=1e-5", "train.steps=3", "train.min_lr=1e-4"])
    assert message == "overrides train.lr=1e-5, train.min_lr=1e-4: train: min_lr (0.0001) must not exceed lr (1e-05)"
    broken = write(tmp_path, "train:\n  lr: 1.0e-5\n  min_lr: 1.0e-4\n", "broken.yaml")
    assert error(load_config, PretrainConfig, broken, ["train.steps=10"]).startswith(f"{broken}: train: min_lr")


def test_the_cli_blames_the_override_or_the_file(tmp_path, capsys):
    from lmforge import cli

    ok = write(tmp_path, "d_model: 32\nn_head: 4\n", "ok.yaml")
    bad = write(tmp_path, "d_model: 30\nn_head: 4\n", "bad.yaml")
    for argv, start in [
        (["--config", str(ok), "d_model=30"], "override d_model=30: d_model (30) must be divisible by n_head (4)"),
        (["--config", str(ok), "n_layer=abc"], "override n_layer=abc: expected an int, got 'abc'"),
        (["--config", str(bad), "n_layer=2"], f"{bad}: d_model (30) must be divisible by n_head (4)"),
    ]:
        assert cli.main(["model-info", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"lmforge: error: {start}"), err


def test_missing_required_key():
    assert "missing required key 'vocab_size'" in error(load_config, Required)
    assert load_config(Required, None, ["vocab_size=5"]).vocab_size == 5


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert error(load_config, Recipe, path) == f"config file not found: {path}"


def test_yaml_syntax_error_has_file_and_line(tmp_path):
    path = write(tmp_path, "name: tiny\nmodel:\n  n_layer: 4\n   d_model: [1,\n")
    message = error(load_config, Recipe, path)
    assert message.startswith(f"{path}:4:") and "invalid YAML" in message


def test_duplicate_yaml_key(tmp_path):
    path = write(tmp_path, "steps: 1\nname: a\nsteps: 2\n")
    message = error(load_config, Recipe, path)
    assert message.startswith(f"{path}:3:") and "duplicate key 'steps'" in message


def test_top_level_must_be_a_mapping(tmp_path):
    assert "top level must be a mapping" in error(load_config, Recipe, write(tmp_path, "- 1\n- 2\n"))


def test_validate_hook_nested_and_top(tmp_path):
    assert (
        error(load_config, Recipe, None, ["model.d_model=33"])
        == "override model.d_model=33: model: d_model must be even, got 33"
    )
    assert error(load_config, Recipe, None, ["init_from.d_model=3"]).startswith(
        "override init_from.d_model=3: init_from: d_model must be even"
    )
    assert error(load_config, Recipe, None, ["steps=-1"]) == "override steps=-1: steps must be >= 0, got -1"
    path = write(tmp_path, "model: {d_model: 33}\n")
    assert error(load_config, Recipe, path) == f"{path}: model: d_model must be even, got 33"


def test_multiline_validate_message_becomes_one_line():
    @dataclass
    class Chatty:
        x: int = 0

        def validate(self):
            raise ValueError("first line\nsecond line")

    assert error(load_config, Chatty) == "first line second line"


def test_postponed_annotations_resolve():
    # this module uses `from __future__ import annotations`: every hint above is a string
    assert isinstance(Recipe.__annotations__["steps"], str)
    assert load_config(Recipe, None, ["steps=7"]).steps == 7


def test_union_prefers_the_exact_type():
    @dataclass
    class Loose:
        x: int | str = 0

    assert load_config(Loose, None, ["x='3'"]).x == "3"
    assert load_config(Loose, None, ["x=3"]).x == 3


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(TypeError):
        load_config(dict)
