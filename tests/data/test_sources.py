"""lmforge.data.sources: the stdlib corpus, text folders, jsonl files, and their one-line errors."""

from __future__ import annotations

import json
import sys

import pytest

from lmforge import cli
from lmforge.data.sources import Document, SourceError, SourceStats, iter_documents, stdlib_root


@pytest.fixture(scope="module")
def stdlib():
    stats = SourceStats()
    return list(iter_documents("python-stdlib", stats)), stats


def test_stdlib_is_the_library_without_tests(stdlib):
    docs, stats = stdlib
    names = [d.name for d in docs]
    assert names == sorted(names, key=lambda n: n.split("/"))  # walk order: sorted folder by folder
    assert len(set(names)) == len(names) and all(n.endswith(".py") for n in names)
    assert 500 < len(docs) < 1500  # ~730 on Python 3.11
    parts = [set(n.split("/")[:-1]) for n in names]
    assert not any(p & {"test", "tests", "idle_test", "site-packages", "__pycache__"} for p in parts)
    assert not any(n.rsplit("/", 1)[-1].startswith("test_") for n in names)
    assert "pydoc_data/topics.py" in names  # prose about Python: kept on purpose
    assert {"os.py", "json/decoder.py", "encodings/cp1252.py"} <= set(names)
    assert all(d.text for d in docs) and stats.undecodable == []


def test_stdlib_groups_are_top_level_names(stdlib):
    docs, _ = stdlib
    group = {d.name: d.group for d in docs}
    assert group["os.py"] == "os"
    assert group["json/decoder.py"] == "json"
    assert group["encodings/cp1252.py"] == "encodings"
    assert group["email/mime/text.py"] == "email"


def test_stdlib_root_is_this_interpreters():
    assert (stdlib_root() / "os.py").is_file()
    assert stdlib_root().resolve() != (stdlib_root() / "site-packages").resolve()
    assert sys.version_info[:2] >= (3, 11)


def test_text_folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.txt").write_text("first ✓")
    (tmp_path / "a" / "b" / "two.md").write_text("# second")
    (tmp_path / "top.py").write_text("print(3)\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "blob.bin").write_bytes(b"abc\0def")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("no")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.txt").write_text("no")
    stats = SourceStats()
    docs = list(iter_documents(f"text:{tmp_path}", stats))
    assert docs == [
        Document("a/b/two.md", "# second", "a"),
        Document("a/one.txt", "first ✓", "a"),
        Document("top.py", "print(3)\n", "top.py"),
    ]
    assert sorted(stats.undecodable) == ["blob.bin", "latin1.txt"] and stats.empty == 1


def test_text_single_line_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("once upon a time")
    assert list(iter_documents(f"text:{path}")) == [Document("book.txt", "once upon a time", "book.txt")]


def test_text_single_file_is_cut_into_consecutive_line_chunks(tmp_path):
    path = tmp_path / "book.txt"
    text = "".join(f"line {i} {'x' * (i % 7)}\r\n" if i % 3 else f"line {i}\n" for i in range(1, 1001)) + "tail"
    path.write_text(text, newline="")
    docs = list(iter_documents(f"text:{path}"))
    assert "".join(d.text for d in docs) == text  # consecutive, nothing lost or repeated
    assert 90 <= len(docs) <= 110 and all(d.name == d.group for d in docs)  # each chunk its own group
    assert all(d.text.endswith("\n") for d in docs[:-1])  # cut at line boundaries only
    first_lines = [int(d.name.removeprefix("book.txt:")) for d in docs]
    assert first_lines[0] == 1 and first_lines == sorted(set(first_lines))
    for d, start in zip(docs, first_lines):
        assert d.text.split("\n")[0].startswith(f"line {start}")  # the name says where the chunk starts


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    return path


def test_jsonl_default_field_and_line_blocks(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(250)])
    docs = list(iter_documents(f"jsonl:{path}"))
    assert len(docs) == 250 and docs[0] == Document("d.jsonl:1", "doc 0", "0")
    assert [d.group for d in docs[99:101]] == ["0", "1"] and docs[-1].group == "2"


def test_jsonl_field_and_group(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"body": "hi", "group": "g1"}, {"body": "yo", "group": 7}])
    docs = list(iter_documents(f"jsonl:{path}:body"))
    assert [(d.text, d.group) for d in docs] == [("hi", "g1"), ("yo", "7")]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', "{not json"], r"d.jsonl:2: not a JSON line"),
        (['{"txt": "ok"}'], r"d.jsonl:1: expected an object with a string field 'text'"),
        (['{"text": 3}'], r"string field 'text'"),
    ],
)
def test_jsonl_bad_lines(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(SourceError, match=message):
        list(iter_documents(f"jsonl:{path}"))


def test_missing_empty_and_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="text source not found"):
        list(iter_documents(f"text:{tmp_path / 'nope'}"))
    with pytest.raises(FileNotFoundError, match="jsonl source not found"):
        list(iter_documents(f"jsonl:{tmp_path / 'nope.jsonl'}"))
    with pytest.raises(SourceError, match="holds no non-empty UTF-8 documents"):
        list(iter_documents(f"text:{tmp_path}"))
    with pytest.raises(SourceError, match="use python-stdlib, text:PATH or jsonl:PATH"):
        list(iter_documents("wikipedia"))


def test_cli_source_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["prepare", "--source", f"text:{tmp_path / 'nope'}", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: text source not found")
    assert cli.main(["prepare", "--source", "bogus", "--out", str(tmp_path / "o")]) == 2
    assert "unknown source 'bogus'" in capsys.readouterr().err
