"""lmforge.scaling.plan and `lmforge plan`: the budget example done right, the table and JSON outputs, a model
config (plain or a recipe), a fitted law from a file, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from lmforge.config import ConfigError
from lmforge.scaling.plan import PlanOptions, load_model_config, make_plan, render

RECIPE = """\
name: planned
model:
  max_seq_len: 128
  n_layer: 2
  d_model: 64
  n_head: 4
  n_kv_head: 2
  position: rope
  ffn: swiglu
  norm: rmsnorm
  bias: false
train:
  steps: 10
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["plan", *argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_budget_of_1e20_is_0_91b_parameters_on_18_3b_tokens():
    plan = make_plan(PlanOptions(compute=1e20))
    rule = plan["budget"]["rule"]
    assert rule["params"] == pytest.approx(0.913e9, rel=1e-3) and rule["tokens"] == pytest.approx(18.26e9, rel=1e-3)
    assert plan["training"]["flops"] == pytest.approx(1e20) and plan["model"]["params"] == rule["params"]
    law = plan["budget"]["law"]
    assert law["name"] == "hoffmann" and law["params"] * law["tokens"] * 6 == pytest.approx(1e20)
    text = render(plan)
    assert "N = 913M, D = 18.3B tokens" in text and "embeddings included" in text


def test_13b_on_260b_tokens_is_not_a_1e20_run():
    plan = make_plan(PlanOptions(compute=1e20, params=13e9, tokens=260e9))
    assert plan["training"]["flops"] == pytest.approx(2.03e22, rel=1e-3)
    assert plan["training"]["of_budget"] == pytest.approx(203, rel=1e-2)
    assert "203× the 1e+20-FLOP budget" in render(plan)


def test_time_cost_and_memory_without_shapes():
    plan = make_plan(PlanOptions(params=1e9, tokens=20e9, gpu="a100", gpus=8, mfu=0.5, price=2.0))
    hours = 6 * 1e9 * 20e9 / (312e12 * 0.5 * 3600)
    t = plan["training"]
    assert t["accelerator_hours"] == pytest.approx(hours) and t["wall_hours"] == pytest.approx(hours / 8)
    assert t["cost"] == pytest.approx(2 * hours)
    mem = plan["training_memory"]
    assert mem["activations"] is None and mem["ddp_buckets"] == 4e9  # DDP's copy of the gradients
    assert mem["total"] == 16e9 + 4e9  # 4 + 4 + 8 bytes per parameter
    assert make_plan(PlanOptions(params=1e9))["training_memory"]["total"] == 16e9
    fsdp = make_plan(PlanOptions(params=1e9, gpus=8, fsdp_ranks=8))["training_memory"]
    assert fsdp["total"] == 2e9 and fsdp["sharding"] == "fsdp"


def test_model_config_from_a_recipe_or_a_plain_file(recipe, tmp_path):
    cfg = load_model_config(recipe, vocab_size=512)
    assert (cfg.n_layer, cfg.n_kv_head, cfg.vocab_size) == (2, 2, 512)
    plain = tmp_path / "model.yaml"
    plain.write_text("n_layer: 3\nd_model: 32\nn_head: 2\n")
    assert load_model_config(plain).n_layer == 3
    plain.write_text("n_layers: 3\n")
    with pytest.raises(ConfigError, match="n_layers"):
        load_model_config(plain)


def test_cli_prints_the_plan_of_a_config(recipe, capsys):
    status, out, err = run(capsys, "--model-config", str(recipe), "--vocab-size", "512", "--micro-batch", "4",
                           "--tokens", "1e8", "--context", "1024", "--batch", "8", "--kv-dtype", "int8")  # fmt: skip
    assert status == 0 and err == ""
    for heading in ("training run", "training memory per rank", "serving on 1 accelerator(s)", "largest batch"):
        assert heading in out
    assert "2 layers × d 64, 4 heads (kv 2), vocab 512, T = 128" in out


def test_cli_json_parses_and_matches_the_estimators(recipe, capsys):
    from lmforge.scaling import estimate as est

    status, out, _ = run(capsys, "--model-config", str(recipe), "--micro-batch", "2", "--gpu", "h200", "--json")
    assert status == 0
    plan = json.loads(out)
    cfg = load_model_config(recipe)
    mem = est.training_memory(cfg, micro_batch=2, seq_len=128, precision="bf16")
    assert plan["training_memory"]["total"] == mem.total
    assert plan["accelerator"]["name"] == "H200" and plan["accelerator"]["memory_bytes"] == 141 * 2**30
    serving = plan["serving"]
    assert serving["kv_per_token"] == est.kv_bytes_per_token(cfg, "bf16")
    assert serving["max_batch"] > 0 and serving["fits"]


def test_cli_kv_example(capsys):
    status, out, _ = run(capsys, "--kv-example")
    assert status == 0
    assert "10,737,418,240 elements" in out and "1 byte per element" in out and "21.5 GB (20.0 GiB)" in out


def test_cli_law_from_a_fit_file(tmp_path, capsys):
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"chinchilla": {"E": 1.8, "A": 400.0, "B": 2000.0, "alpha": 0.35, "beta": 0.35}}))
    status, out, _ = run(capsys, "--compute", "1e21", "--law", str(path), "--json")
    law = json.loads(out)["budget"]["law"]  # α = β: D/N = (B/A)^(2/(α+β)) at every budget (eq. 4)
    assert status == 0 and law["tokens_per_param"] == pytest.approx(5.0 ** (2 / 0.7), rel=1e-6)
    status, out, _ = run(capsys, "--compute", "1e21", "--law", "epoch")
    assert status == 0 and "epoch law (eq. 4)" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "nothing to plan"),
        (["--compute", "-1"], "compute must be a positive number"),
        (["--compute", "1e20", "--gpu", "v100"], "unknown accelerator 'v100'"),
        (["--compute", "1e20", "--mfu", "40"], "--mfu is a fraction"),
        (["--compute", "1e20", "--peak-tflops", "-5"], "--peak-tflops must be a positive number, got -5"),
        (["--compute", "1e20", "--gpu", "v100", "--peak-tflops", "100", "--memory-gib", "0"], "--memory-gib must be"),
        (["--params", "1e9", "--model-config", "x.yaml"], "not both"),
        (["--model-config", "missing.yaml"], "model config not found: missing.yaml"),
        (["--compute", "1e20", "--law", "missing.json"], "no fit file missing.json"),
        (["--compute", "1e20", "--gpu", "tpu-v4", "--precision", "fp32"], "no datasheet fp32 peak"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("lmforge: error: ") and message in err


@pytest.mark.parametrize(
    "option, content, message",
    [
        ("--law", b"{not json", "is not a fit JSON"),
        ("--law", b"\xff\xfe", "is not a fit JSON"),
        ("--law", b"[1, 2]", "holds no Chinchilla law (missing E, A, B, alpha, beta): write one with"),
        ("--law", b'{"E": "x", "A": 1, "B": 1, "alpha": 1, "beta": 1}', "must be numbers"),
        ("--model-config", b"n_layer: [2", "not a YAML file"),
        ("--model-config", b"\xff\xfe\x00", "not a YAML file"),
    ],
)
def test_a_damaged_file_is_one_line(option, content, message, tmp_path, capsys):
    path = tmp_path / "given"
    path.write_bytes(content)
    status, out, err = run(capsys, "--compute", "1e20", option, str(path))
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"lmforge: error: {path}") and message in err, err


def test_a_bug_in_the_planner_keeps_its_traceback(monkeypatch):
    import lmforge.scaling.plan as plan_module

    def broken(options):
        raise ValueError("operands could not be broadcast together")  # our mistake, not the user's

    monkeypatch.setattr(plan_module, "make_plan", broken)
    with pytest.raises(ValueError, match="broadcast"):
        main(["plan", "--compute", "1e20"])
