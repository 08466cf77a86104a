"""`lmforge scaling fit`: CSV inputs with the usual column spellings, a run's loss curve, --out read back by
`lmforge plan --law`, and one-line errors with exit status 2."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.scaling.inputs import load_runs
from lmforge.scaling.laws import ChinchillaLaw

TRUTH = ChinchillaLaw(E=1.9, A=500.0, B=1500.0, alpha=0.35, beta=0.36)


@pytest.fixture
def runs_csv(tmp_path):
    """Runs in Epoch's column spelling (Model Size, Training FLOP, loss) from a known law, with 0.1% noise."""
    rng = np.random.default_rng(0)
    path = tmp_path / "runs.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Model Size", "Training FLOP", "loss"])
        for _ in range(80):
            n, d = np.exp(rng.uniform(np.log(1e7), np.log(1e10))), np.exp(rng.uniform(np.log(1e9), np.log(1e12)))
            w.writerow([n, 6 * n * d, TRUTH.loss(n, d) * np.exp(rng.normal(0, 1e-3))])
    return path


def test_fit_csv_json_and_the_law_file_feeds_the_planner(runs_csv, tmp_path, capsys):
    out = tmp_path / "fit.json"
    argv = ["scaling", "fit", str(runs_csv), "--method", "chinchilla", "--starts", "30", "--out", str(out), "--json"]
    assert main(argv) == 0
    fit = json.loads(capsys.readouterr().out)["chinchilla"]
    assert fit["alpha"] == pytest.approx(TRUTH.alpha, abs=0.02) and fit["E"] == pytest.approx(TRUTH.E, abs=0.05)
    assert main(["plan", "--compute", "1e21", "--law", str(out), "--json"]) == 0
    law = json.loads(capsys.readouterr().out)["budget"]["law"]
    assert law["params"] == pytest.approx(
        ChinchillaLaw(**{k: fit[k] for k in "E A B alpha beta".split()}).optimal(1e21)[0]
    )


def test_readable_output_names_the_method_and_answers_questions(runs_csv, capsys):
    argv = ["scaling", "fit", str(runs_csv), "--starts", "30", "--compute", "1e21", "--target-loss", "2.3"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "80 runs" in text and "Chinchilla (Approach 3" in text
    assert "at C = 1e+21" in text and "reaching loss 2.3 needs C =" in text


def test_inputs_derive_tokens_from_flops_and_drop_outliers(runs_csv):
    runs = load_runs([runs_csv])
    np.testing.assert_allclose(runs.flops, 6 * runs.params * runs.tokens)
    kept = runs.drop_highest_loss(5)
    assert len(kept) == 75 and kept.loss.max() <= np.sort(runs.loss)[-6]


def test_loss_curve_of_a_run_folder(tmp_path, capsys):
    from lmforge.config import save_config
    from lmforge.model import ModelConfig
    from lmforge.train.pretrain import PretrainConfig

    run = tmp_path / "r"
    run.mkdir()
    save_config(PretrainConfig(model=ModelConfig(vocab_size=64, n_layer=1, d_model=16, n_head=1)), run / "config.yaml")
    steps = np.arange(10, 1010, 10)
    run.joinpath("metrics.jsonl").write_text(
        "".join(json.dumps({"step": int(s), "loss": 2.0 + 30.0 * s**-0.5}) + "\n" for s in steps)
    )
    assert main(["scaling", "fit", str(run), "--x", "steps", "--json"]) == 0
    curve = json.loads(capsys.readouterr().out)["curve"]
    assert (curve["a"], curve["b"], curve["c"]) == pytest.approx((30.0, -0.5, 2.0), rel=1e-3)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert main(["scaling", "fit", str(tmp_path / "missing.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["scaling", "fit", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no params, loss" in err


@pytest.mark.parametrize(
    "rows, message",
    [
        ("params,tokens,loss\n1e6,2e7,3.1\n2e6,4e7,abc\n", "runs.csv:3: loss is 'abc', not a finite number"),
        ("params,tokens,loss\n1e6,2e7,3.1\n2e6,4e7\n", "runs.csv:3: loss is None, not a finite number"),
        ("params,tokens,loss\n1e6,2e7,nan\n", "runs.csv:2: loss is 'nan', not a finite number"),
        ("params,tokens,loss\n1e6,2e7,3.1\n", "needs at least 5 runs, got 1: give more runs"),
    ],
)
def test_bad_rows_of_a_csv_are_one_line(rows, message, tmp_path, capsys):
    path = tmp_path / "runs.csv"
    path.write_text(rows)
    assert main(["scaling", "fit", str(path), "--method", "chinchilla"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_csv_that_is_not_text_is_one_line(tmp_path, capsys):
    path = tmp_path / "runs.csv"
    path.write_bytes(b"params,tokens,loss\n\xff\xfe,1,2\n")
    assert main(["scaling", "fit", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a CSV of runs" in err, err


def test_fit_options_are_checked_before_the_inputs_are_read(tmp_path, capsys):
    for argv, message in [
        (["--compute", "-1"], "--compute must be a positive number of FLOPs, got -1.0"),
        (["--target-loss", "0"], "--target-loss must be a positive number"),
        (["--drop-highest", "-2"], "--drop-highest must be ≥ 0"),
        (["--starts", "0"], "--starts must be ≥ 1"),
    ]:
        assert main(["scaling", "fit", str(tmp_path / "not-read.csv"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)


def test_a_run_folder_has_no_params_axis(tmp_path, capsys):
    from lmforge.config import save_config
    from lmforge.model import ModelConfig
    from lmforge.train.pretrain import PretrainConfig

    run = tmp_path / "r"
    run.mkdir()
    save_config(PretrainConfig(model=ModelConfig(vocab_size=64, n_layer=1, d_model=16, n_head=1)), run / "config.yaml")
    lines = [json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 9)]
    run.joinpath("metrics.jsonl").write_text("".join(lines))
    assert main(["scaling", "fit", str(run), "--x", "params"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--x params is not an axis of a run's loss curve: use one of steps" in err, err


def test_a_bug_in_a_fit_keeps_its_traceback(runs_csv, monkeypatch):
    from lmforge.scaling import fit as fitting

    def broken(*args, **kwargs):
        raise ValueError("shapes (80,) and (79,) not aligned")  # our mistake, not the user's

    monkeypatch.setattr(fitting, "fit_chinchilla", broken)
    with pytest.raises(ValueError, match="not aligned"):
        main(["scaling", "fit", str(runs_csv), "--method", "chinchilla"])
