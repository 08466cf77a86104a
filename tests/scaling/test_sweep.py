"""The IsoFLOP sweep's orchestration (grid around the frontier, pre-registered prediction, resume, report and
plots) with a stand-in trainer that returns losses from a known law, and one real tiny run through it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lmforge.config import load_config
from lmforge.scaling import sweep as sweep_mod
from lmforge.scaling.laws import ChinchillaLaw
from lmforge.scaling.sweep import SweepConfig, model_for_params, plan_budget, read_rows, run_sweep

TRUTH = ChinchillaLaw(E=1.2, A=700.0, B=400.0, alpha=0.4, beta=0.4)  # N_opt(1e9) ≈ 26K, 0.25 tokens/param


@pytest.fixture()
def corpus(tmp_path):
    from lmforge.data.prepare import PrepareConfig
    from lmforge.data.prepare import run as prepare

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(400)))
    (src / "b.py").write_text("".join(f"class C{i}:\n    pass\n\n" for i in range(400)))
    return prepare(load_config(PrepareConfig, None, [f"source=text:{src}", f"out={tmp_path / 'data'}",
                                                     "tokenizer_kind=char", "val_fraction=0.3"]))  # fmt: skip


def config(corpus, tmp_path, **kw) -> SweepConfig:
    base = dict(name="sw", runs_dir=str(tmp_path / "runs"), data=str(corpus), budgets=[1e9, 4e9, 1.6e10], sizes=5,
                spread=8.0, tokens_per_param=1.0, holdout_factor=4.0, seq_len=32, batch_size=4, eval_batches=2,
                fit_grid_stride=45, progress=False, n_layer=0)  # fmt: skip
    base.update(kw)
    return SweepConfig(**base)


def fake_train(calls):
    def train(run, cfg, root):
        calls.append(run.name)
        return {"name": run.name, "role": run.role, "budget": run.budget, "n_layer": run.model.n_layer,
                "d_model": run.model.d_model, "n_head": run.model.n_head, "params": run.params,
                "tokens": run.tokens, "flops": run.flops, "steps": run.steps,
                "val_loss": TRUTH.loss(run.params, run.tokens), "train_loss": 0.0, "seconds": 1.0}  # fmt: skip

    return train


def test_grid_brackets_the_centre_with_distinct_sizes_and_exact_budgets(corpus, tmp_path):
    cfg = config(corpus, tmp_path)
    runs = plan_budget(cfg, 1e10, 20_000, vocab_size=64)
    params = [r.params for r in runs]
    assert len(runs) == 5 and params == sorted(params) and len(set(params)) == 5
    assert params[0] < 20_000 < params[-1]
    assert params[-1] / params[0] == pytest.approx(8.0, rel=0.6)
    for r in runs:
        assert r.tokens == r.steps * 4 * 32
        assert r.flops == pytest.approx(1e10, rel=0.5 / r.steps + 1e-9)  # whole steps only
    m = model_for_params(50_000, cfg, 64)
    assert abs(math.log(m.param_counts()["total"] / 50_000)) < 0.2  # shapes come in steps of 8 in width


def test_sweep_preregisters_predicts_and_resumes(corpus, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep_mod, "train", fake_train(calls))
    cfg = config(corpus, tmp_path)
    root = run_sweep(cfg)
    rows = read_rows(root / "runs.csv")
    assert [r["role"] for r in rows].count("sweep") == 15 and rows[-1]["role"] == "holdout"
    prediction = json.loads((root / "prediction.json").read_text())
    # the prediction was written before the held-out run was trained, and the held-out run is at 4× the top budget
    assert calls[-1] == prediction["name"] and prediction["budget"] == pytest.approx(6.4e10)
    truth = TRUTH.loss(prediction["params"], prediction["tokens"])
    assert prediction["predicted_loss"] == pytest.approx(truth, rel=0.01)  # a noiseless law is recovered
    fit = json.loads((root / "fit.json").read_text())
    assert fit["isoflop"]["n_exponent"] == pytest.approx(0.5, abs=0.05)  # α = β → N_opt ∝ C^0.5
    assert all(m["bracketed"] for m in fit["isoflop"]["minima"])
    for png in ("isoflop.png", "frontier.png", "loss_vs_compute.png"):
        assert (root / png).stat().st_size > 10_000
    assert "error" in (root / "report.md").read_text()

    (root / "prediction.json").write_text(json.dumps({**prediction, "predicted_loss": 9.0}))
    calls.clear()
    run_sweep(cfg)  # nothing retrained, and a pre-registered prediction is never rewritten
    assert calls == []
    assert json.loads((root / "prediction.json").read_text())["predicted_loss"] == 9.0


def test_dry_run_trains_nothing(corpus, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sweep_mod, "train", fake_train(calls))
    root = run_sweep(config(corpus, tmp_path), dry_run=True)
    assert calls == [] and not root.exists()
    assert capsys.readouterr().out.count("budget C =") == 3


def test_one_real_run_through_the_trainer(corpus, tmp_path):
    cfg = config(corpus, tmp_path)
    vocab = sweep_mod._vocab_size(str(corpus))
    run = plan_budget(cfg, 2e8, 6_000, vocab_size=vocab)[0]
    row = sweep_mod.train(run, cfg, tmp_path / "runs")
    assert row["tokens"] == run.steps * 4 * 32 and row["flops"] == 6 * row["params"] * row["tokens"]
    assert np.isfinite(row["val_loss"]) and row["val_loss"] < math.log(vocab)  # learned something


def test_bad_configs_say_what_to_change(corpus, tmp_path):
    with pytest.raises(ValueError, match="≥ 3 sizes"):
        config(corpus, tmp_path, sizes=2).validate()
    with pytest.raises(FileNotFoundError, match="lmforge prepare"):
        run_sweep(config(corpus, tmp_path, data=str(tmp_path / "nope")))
