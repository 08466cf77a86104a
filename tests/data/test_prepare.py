"""lmforge.data.prepare and its CLI: group split, token files that decode back, meta, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge import cli
from lmforge.config import ConfigError, load_config
from lmforge.data.loader import TokenData, unigram_bpb
from lmforge.data.prepare import PrepareConfig, default_out, run, split_by_group, train_tokenizer
from lmforge.data.sources import Document, SourceError, iter_documents
from lmforge.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def make_corpus(root: Path, n_groups: int = 12, files: int = 3) -> Path:
    """n_groups folders of `files` small text files each, distinct enough to give a BPE something to learn."""
    for g in range(n_groups):
        folder = root / f"pkg{g:02d}"
        folder.mkdir(parents=True)
        for f in range(files):
            words = [WORDS[(g * 7 + f * 3 + i) % len(WORDS)] for i in range(40 + 5 * g)]
            (folder / f"m{f}.py").write_text(f"# {g}.{f} ✓\n" + " ".join(words) + f"\nx = {g * 100 + f}\n")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "data"
    cfg = PrepareConfig(source=f"text:{corpus}", out=str(out), vocab_size=300, val_fraction=0.2)
    return cfg, run(cfg, progress=False)


def test_output_files_and_meta(prepared, corpus):
    cfg, out = prepared
    names = {p.name for p in out.iterdir()}
    assert names == {
        "train.bin",
        "val.bin",
        "tokenizer.json",
        "tokenizer_config.json",
        "val_docs.jsonl",
        "meta.json",
    }
    meta = json.loads((out / "meta.json").read_text())
    docs = list(iter_documents(f"text:{corpus}"))
    assert meta["train"]["docs"] + meta["val"]["docs"] == len(docs) == 36
    total = sum(len(d.text.encode()) for d in docs)
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == total
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["kind"] == "bpe"
    assert meta["tokenizer"]["vocab_size"] == Tokenizer.load(out).vocab_size
    assert len(meta["source_sha256"]) == 64 and meta["python_version"].count(".") == 2
    assert meta["config"]["vocab_size"] == 300
    assert 0.1 < meta["val"]["bytes"] / total < 0.3  # val_fraction 0.2, whole groups at a time


def test_token_files_decode_to_the_documents(prepared, corpus):
    _, out = prepared
    data = TokenData(out)
    tok = Tokenizer.load(data.tokenizer_path)
    meta = data.meta
    by_split = {"train": [], "val": []}
    for d in iter_documents(f"text:{corpus}"):
        by_split["val" if d.group in meta["val_groups"] else "train"].append(d)
    for split in ("train", "val"):
        tokens = np.asarray(getattr(data, split))
        assert len(tokens) == meta[split]["tokens"] and tokens[-1] == tok.eos_id
        texts = tok.decode(tokens).split("<|eos|>")
        assert texts == [d.text for d in by_split[split]] + [""]
    val_docs = [json.loads(line) for line in (out / "val_docs.jsonl").read_text().splitlines()]
    assert [(v["name"], v["text"]) for v in val_docs] == [(d.name, d.text) for d in by_split["val"]]
    assert data.bytes_per_token("val") == meta["val"]["bytes"] / meta["val"]["tokens"]


def test_groups_never_straddle_the_split(prepared):
    _, out = prepared
    meta = json.loads((out / "meta.json").read_text())
    val = {v["group"] for v in map(json.loads, (out / "val_docs.jsonl").read_text().splitlines())}
    assert val == set(meta["val_groups"]) and len(val) == meta["val"]["groups"]
    assert meta["train"]["groups"] + meta["val"]["groups"] == 12


def test_unigram_bpb_in_meta_matches_loader(prepared):
    _, out = prepared
    data = TokenData(out)
    assert data.meta["unigram_bpb"] == pytest.approx(unigram_bpb(data), rel=1e-12)
    assert 0 < unigram_bpb(data) < 8


def test_prepare_is_deterministic_and_refuses_to_clobber(prepared, tmp_path):
    cfg, out = prepared
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(cfg, progress=False)
    again = run(PrepareConfig(**{**vars(cfg), "out": str(tmp_path / "again")}), progress=False)
    for name in ("train.bin", "val.bin", "tokenizer.json", "val_docs.jsonl"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    first = json.loads((out / "meta.json").read_text())
    second = json.loads((again / "meta.json").read_text())
    first["config"].pop("out"), second["config"].pop("out")
    assert first == second


def test_existing_tokenizer_and_train_tokenizer_agree(prepared, corpus, tmp_path, capsys):
    cfg, out = prepared
    # `lmforge tokenizer train` trains on the same train split as prepare did, so it is the same tokenizer.
    path = train_tokenizer(cfg.source, 300, tmp_path / "tok", val_fraction=cfg.val_fraction)
    assert path.read_text() == (out / "tokenizer.json").read_text()
    reused = run(
        PrepareConfig(source=cfg.source, out=str(tmp_path / "reused"), tokenizer=str(path), val_fraction=0.2),
        progress=False,
    )
    assert (reused / "train.bin").read_bytes() == (out / "train.bin").read_bytes()
    assert "from " in capsys.readouterr().out


def test_char_kind_and_uint32_for_big_vocabularies(tmp_path):
    # 70,000 distinct characters make a char vocabulary that no longer fits uint16.
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "b").mkdir()
    chars = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c < 0xE000)
    (tmp_path / "src" / "a" / "big.txt").write_text(chars)
    (tmp_path / "src" / "b" / "small.txt").write_text("hello 😀")
    cfg = PrepareConfig(source=f"text:{tmp_path / 'src'}", out=str(tmp_path / "out"), tokenizer_kind="char")
    out = run(cfg, progress=False)
    data = TokenData(out)
    assert data.meta["dtype"] == "uint32" and data.meta["tokenizer"]["kind"] == "char"
    assert data.meta["val_groups"] == ["b"]
    tok = Tokenizer.load(out)
    assert tok.decode(np.asarray(data.val)) == "hello 😀<|eos|>"  # unseen in train: byte fallback
    assert tok.decode(np.asarray(data.train)) == chars + "<|eos|>"


def test_split_by_group_targets_the_fraction_and_follows_the_seed():
    docs = [Document(f"g{g}/f{i}", "x" * (50 + 13 * g), f"g{g}") for g in range(200) for i in range(2)]
    total = sum(len(d.text) for d in docs)
    seen = []
    for seed in range(3):
        val = split_by_group(docs, 0.1, seed)
        assert val == split_by_group(docs, 0.1, seed)
        share = sum(len(d.text) for d in docs if d.group in val) / total
        assert 0.095 < share < 0.105
        seen.append(val)
    assert seen[0] != seen[1]


def test_split_by_group_edge_cases():
    one = [Document("a", "text", "only")]
    with pytest.raises(SourceError, match="one group"):
        split_by_group(one, 0.05, 0)
    # Both groups far above the target: the smaller goes to val rather than none.
    two = [Document("a", "x" * 100, "big"), Document("b", "x" * 60, "small")]
    assert split_by_group(two, 0.05, 0) == {"small"}


@pytest.mark.parametrize(
    "recipe", sorted((Path(__file__).parents[2] / "configs" / "data").glob("*.yaml")), ids=lambda p: p.name
)
def test_data_recipes_load(recipe):
    cfg = load_config(PrepareConfig, recipe)
    assert cfg.out and cfg.out_dir.parts[0] == "data"


def test_default_out():
    assert default_out("python-stdlib") == Path("data/python-stdlib")
    assert default_out("text:/home/me/notes/") == Path("data/text-notes")
    assert default_out("jsonl:chats.jsonl") == Path("data/jsonl-chats")
    assert default_out("jsonl:chats.jsonl:body") == Path("data/jsonl-chats-body")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"vocab_size": 100}, "vocab_size must be in"),
        ({"val_fraction": 0.0}, "val_fraction must be in"),
        ({"seed": -1}, "seed must be"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        PrepareConfig(**fields).validate()


def test_cli_prepare_with_flags_config_and_overrides(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "prepare",
        "--source",
        f"text:{corpus}",
        "--out",
        str(out),
        "--vocab-size",
        "300",
        "--split-digits",
    ]
    assert cli.main([*argv, "val_fraction=0.2"]) == 0
    printed = capsys.readouterr().out
    assert f"prepared {out}" in printed and "unigram" in printed
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["split_digits"] and meta["config"]["val_fraction"] == 0.2
    assert cli.main(argv) == 2  # the folder now holds files
    assert capsys.readouterr().err.count("\n") == 1
    recipe = tmp_path / "data.yaml"
    recipe.write_text(f"source: 'text:{corpus}'\nvocab_size: 300\ntokenizer_kind: char\n")
    assert cli.main(["prepare", "--config", str(recipe), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["kind"] == "char"
    capsys.readouterr()
    assert cli.main(["prepare", "--source", f"text:{corpus}", "--out", str(out), "vocab_size=3"]) == 2
    assert capsys.readouterr().err.startswith(
        "lmforge: error: override vocab_size=3: vocab_size must be in [263, 2**32]"
    )


def test_cli_tokenizer_train(corpus, tmp_path, capsys):
    path = tmp_path / "tok.json"
    argv = ["tokenizer", "train", "--source", f"text:{corpus}", "--vocab-size", "280", "--out", str(path)]
    assert cli.main(argv) == 0
    assert Tokenizer.load(path).vocab_size <= 280 and (tmp_path / "tokenizer_config.json").is_file()
    assert f"saved {path}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(f"text:{corpus}", 10, tmp_path / "t2")


def test_prepare_a_single_text_file(tmp_path, capsys):
    # README: `--source text:PATH` takes a file; one file is cut into line chunks so val is whole stretches of it.
    path = tmp_path / "book.txt"
    lines = [f"{i} {' '.join(WORDS[(i * k) % len(WORDS)] for k in range(5))}\n" for i in range(300)]
    path.write_text("".join(lines))
    out = tmp_path / "out"
    argv = ["prepare", "--source", f"text:{path}", "--out", str(out), "--char", "--val-fraction", "0.1"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    data = TokenData(out)
    tok = Tokenizer.load(out)
    train = tok.decode(np.asarray(data.train)).split("<|eos|>")[:-1]
    val = tok.decode(np.asarray(data.val)).split("<|eos|>")[:-1]
    assert val and train and 0.05 < data.meta["val"]["bytes"] / len(path.read_bytes()) < 0.2
    train_lines = {line for chunk in train for line in chunk.splitlines()}
    val_lines = {line for chunk in val for line in chunk.splitlines()}
    assert not train_lines & val_lines and len(train_lines | val_lines) == 300  # no line on both sides


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("target", ["folder", "json", "json beside a config"])
def test_tokenizer_train_refuses_an_out_that_holds_files(corpus, tmp_path, capsys, target):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my own notes")
    if target == "folder":
        out = folder
    elif target == "json":
        out = folder / "notes.txt.json"
        out.write_text("{}")
    else:
        out = folder / "new.json"
        (folder / "tokenizer_config.json").write_text("{}")
    before = snapshot(folder)
    argv = ["tokenizer", "train", "--source", f"text:{corpus}", "--char", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(folder) in err and "--overwrite" in err, err
    assert snapshot(folder) == before  # nothing in it was touched


def test_tokenizer_train_overwrite_replaces_only_its_own_files_atomically(corpus, tmp_path, capsys, monkeypatch):
    import lmforge.runs

    out = tmp_path / "tok"
    out.mkdir()
    (out / "notes.txt").write_text("my own notes")
    (out / "tokenizer.json").write_text("old")
    notes = snapshot(out)["notes.txt"]
    written = []
    monkeypatch.setattr(lmforge.runs, "count_write", lambda path: written.append(Path(path).name))
    argv = ["tokenizer", "train", "--source", f"text:{corpus}", "--char", "--out", str(out), "--overwrite"]
    assert cli.main(argv) == 0
    assert sorted(written) == ["tokenizer.json", "tokenizer_config.json"]  # through the atomic writers
    assert snapshot(out)["notes.txt"] == notes and Tokenizer.load(out).kind == "char"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "tokenizer.json", "tokenizer_config.json"]


def test_prepare_writes_every_file_atomically_and_a_failed_overwrite_keeps_the_data(corpus, tmp_path, monkeypatch):
    import lmforge.runs

    out = tmp_path / "data"
    written = []
    monkeypatch.setattr(lmforge.runs, "count_write", lambda path: written.append(Path(path).name))
    cfg = PrepareConfig(source=f"text:{corpus}", out=str(out), tokenizer_kind="char", val_fraction=0.2)
    run(cfg, progress=False)
    assert sorted(written) == sorted(p.name for p in out.iterdir())  # every file it wrote went through them
    assert written[-1] == "meta.json"  # last: it marks a complete folder
    before = snapshot(out)
    # An overwrite whose source cannot be read must not destroy what is there.
    (tmp_path / "empty").mkdir()
    for source in (f"text:{tmp_path / 'nope'}", f"text:{tmp_path / 'empty'}"):
        with pytest.raises((FileNotFoundError, SourceError)):
            run(PrepareConfig(source=source, out=str(out), overwrite=True), progress=False)
        assert snapshot(out) == before
    assert len(TokenData(out).train) > 0


@pytest.mark.parametrize("fault_at", [2, 6])
def test_prepare_killed_mid_overwrite_leaves_the_previous_data_whole(corpus, tmp_path, fault_at):
    import os
    import subprocess
    import sys

    out = tmp_path / "data"
    run(PrepareConfig(source=f"text:{corpus}", out=str(out), tokenizer_kind="char", val_fraction=0.2), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = ["prepare", "--source", f"text:{corpus}", "--out", str(out), "--char", "--overwrite", "--seed", "3"]
    env = {**os.environ, "LMFORGE_FAULT_AT_WRITE": str(fault_at)}
    done = subprocess.run([sys.executable, "-m", "lmforge", *argv], env=env, capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr  # SIGKILL before its k-th write
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the new data was only ever staged
    assert len(TokenData(out).train) > 0
    run(PrepareConfig(source=f"text:{corpus}", out=str(out), tokenizer_kind="char", val_fraction=0.2, overwrite=True),
        progress=False)  # fmt: skip
    assert not list(tmp_path.glob(".data.prepare-*"))  # the dead run's staging folder is cleared away
