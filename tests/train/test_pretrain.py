"""End to end on a tiny corpus: prepare → pretrain → eval → sample → export, and the export loads in HF."""

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.config import load_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    corpus = root / "corpus"
    for pkg in ("alpha", "beta", "gamma", "delta"):
        (corpus / pkg).mkdir(parents=True)
        for i in range(3):
            (corpus / pkg / f"m{i}.py").write_text(
                "".join(f"def {pkg}_{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))
            )
    from lmforge.data.prepare import PrepareConfig
    from lmforge.data.prepare import run as prepare
    from lmforge.train.pretrain import PretrainConfig, run

    data = prepare(load_config(PrepareConfig, None, [f"source=text:{corpus}", f"out={root / 'data'}",
                                                      "vocab_size=300", "val_fraction=0.25"]))  # fmt: skip
    overrides = [f"data={data}", f"runs_dir={root / 'runs'}", "name=t", "model.n_layer=2", "model.d_model=32",
                 "model.n_head=2", "model.max_seq_len=32", "model.position=rope", "model.ffn=swiglu",
                 "model.norm=rmsnorm", "model.bias=false", "train.steps=4", "train.batch_size=4",
                 "train.precision=fp32", "train.eval_every=2", "train.progress=false", "eval.batches=2",
                 "eval.batch_size=4"]  # fmt: skip
    run_dir = run(load_config(PretrainConfig, None, overrides))
    return root, run_dir


def test_run_folder_holds_config_metrics_checkpoint_and_plot(trained):
    _, run_dir = trained
    names = {p.name for p in run_dir.path.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "loss.png", "tokenizer.json"} <= names
    rows = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and "val_bpb" in rows[-1] and "mfu" in rows[-1]


def test_eval_and_sample_commands(trained, capsys):
    _, run_dir = trained
    assert main(["eval", str(run_dir.path), "--json"]) in (0, None)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_bpb"] > 0
    assert main(["sample", str(run_dir.path), "--prompt", "def ", "--max-new-tokens", "5"]) in (0, None)
    assert capsys.readouterr().out.startswith("def ")


def test_export_loads_in_transformers_with_the_same_logits(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.train.artifacts import export
    from lmforge.train.resolve import resolve_model

    _, run_dir = trained
    folder = export(run_dir.path, "hf", tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ours, _, _ = resolve_model(run_dir.path)
    ids = torch.tensor([tok("def alpha_1_2(x):\n    return")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    assert tok.decode(ids[0]) == "def alpha_1_2(x):\n    return"


def test_missing_data_is_a_one_line_error(tmp_path, capsys):
    assert main(["pretrain", f"data={tmp_path / 'nope'}", f"runs_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lmforge prepare" in err
