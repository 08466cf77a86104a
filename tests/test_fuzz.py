"""Fuzzing where user input enters lmforge: config files and key=value overrides, tokenizer files and text, chat
and preference-pair JSONL. The rule for every input: a result, or a UserError (FileNotFoundError where that is
the meaning) whose message is one line; never any other exception, which would be a traceback for the user.

    .venv/bin/python -m pytest -q tests/test_fuzz.py        # ~200 examples per target, hermetic, CPU only

The bugs these found each have a deterministic test below (test_found_*), so they stay fixed whatever examples
hypothesis draws.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lmforge.align.pairs import load_pairs
from lmforge.config import UserError, load_config
from lmforge.data.chat_jsonl import load_jsonl_messages, load_jsonl_preferences
from lmforge.model import ModelConfig
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer
from lmforge.train.loop import TrainConfig
from lmforge.train.pretrain import EvalConfig, PretrainConfig

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def user_error_or_result(fn, *args, allowed: tuple[type[BaseException], ...] = ()):
    """fn(*args), or the UserError it raised after checking that its message is one non-empty line."""
    try:
        return fn(*args)
    except (UserError, *allowed) as e:
        message = str(e)
        assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
        return e


# ----------------------------------------------------------------------------------------------- values

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 70)
    | st.integers()
    | st.sampled_from([2**64, 10**400, -(10**400)])
    | st.floats()
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def choices(cls) -> list:
    """Every Literal choice of `cls`'s fields: the values that get past type checks into validate()."""
    found = []
    for hint in typing.get_type_hints(cls).values():
        for arg in (hint, *typing.get_args(hint)):
            if typing.get_origin(arg) is typing.Literal:
                found += typing.get_args(arg)
    return found


def section(cls):
    keys = st.sampled_from(field_names(cls)) | st.text(max_size=6)
    values = scalars | st.sampled_from(choices(cls) or [None]) | json_values
    return st.dictionaries(keys, values, max_size=6)


SECTIONS = {"model": section(ModelConfig), "train": section(TrainConfig), "eval": section(EvalConfig)}
pretrain_data = st.fixed_dictionaries(
    {}, optional={**SECTIONS, **{k: scalars for k in ("data", "name", "runs_dir", "resume")}, "extra": json_values}
)


def dotted_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for name in field_names(cls):
        keys.append(prefix + name)
        if dataclasses.is_dataclass(hints[name]):
            keys += dotted_keys(hints[name], f"{prefix}{name}.")
    return keys


PRETRAIN_KEYS = dotted_keys(PretrainConfig)

# ----------------------------------------------------------------------------------- (a) config files


def load_file(workdir: Path, cls, content: bytes):
    path = workdir / "recipe.yaml"
    path.write_bytes(content)
    return user_error_or_result(load_config, cls, path)


@FUZZ
@given(data=pretrain_data)
@example(data={"model": {"d_model": 10**400, "ffn": "swiglu"}})
@example(data={"model": {"d_model": 10**400 + 1, "n_head": 2**64}})
def test_pretrain_config_from_yaml_of_real_keys(workdir, data):
    got = load_file(workdir, PretrainConfig, yaml.safe_dump(data, allow_unicode=True).encode())
    assert isinstance(got, PretrainConfig | UserError)


@FUZZ
@given(data=section(ModelConfig))
def test_model_config_from_yaml_of_real_keys(workdir, data):
    got = load_file(workdir, ModelConfig, yaml.safe_dump(data, allow_unicode=True).encode())
    assert isinstance(got, ModelConfig | UserError)


@FUZZ
@given(content=st.binary() | st.text().map(str.encode))
@example(content=b"model: {d_model: 64}\n\xff\xfe")
@example(content=b"[" * 3000)
@example(content=b"a: &x [*x, *x]\nmodel: *x\n")
@example(content=b"name: 2024-13-01\n")
@example(content=b"train:\n  steps: " + b"1" * 5000 + b"\n")
def test_config_from_any_bytes(workdir, content):
    got = load_file(workdir, PretrainConfig, content)
    assert isinstance(got, PretrainConfig | UserError)


# ------------------------------------------------------------------------------------ (b) overrides

override_text = st.text() | st.builds(
    lambda key, value: f"{key}={value}",
    st.sampled_from(PRETRAIN_KEYS) | st.text(max_size=10),
    st.text(max_size=20) | json_values.map(json.dumps) | st.sampled_from(["[", "{a: [", "!!python/object:os.system"]),
)


@FUZZ
@given(overrides=st.lists(override_text, max_size=3))
@example(overrides=["model.d_model=" + "9" * 500, "model.ffn=swiglu"])
@example(overrides=["model.d_model=" + "[" * 3000])
@example(overrides=["name=2024-13-01", "train.steps=" + "1" * 5000])
def test_overrides_of_any_text(overrides):
    got = user_error_or_result(load_config, PretrainConfig, None, overrides)
    assert isinstance(got, PretrainConfig | UserError)


# ------------------------------------------------------------------------------------ (c) tokenizers

CORPUS = [
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n",
    "The quick brown fox jumps over the lazy dog. naïve café, 東京 → ∞ 12 345\n",
]


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {"bpe": Tokenizer.train_bpe(CORPUS, vocab_size=300), "char": Tokenizer.train_char(CORPUS)}


@pytest.fixture(scope="module")
def tokenizer_json(tokenizers) -> dict:
    return json.loads(tokenizers["bpe"].hf.to_str())


@FUZZ
@given(kind=st.sampled_from(["bpe", "char"]), text=st.text() | st.binary().map(lambda b: b.decode("utf-8", "replace")))
@example(kind="char", text="".join(SPECIAL_TOKENS) + "\x00\ufeff😀e\u0301")
def test_tokenizer_round_trips_any_text(tokenizers, kind, text):
    tok = tokenizers[kind]
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # the promise: exact on any UTF-8 text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    dec = tok.incremental_decoder()
    assert "".join(dec.feed(i) for i in ids) + dec.flush() == text


def mutate(spec: dict, path: list[str], value):
    """A copy of `spec` with the item at `path` (keys into nested dicts) replaced by `value`."""
    spec = json.loads(json.dumps(spec))
    node = spec
    for key in path[:-1]:
        node = node[key] if isinstance(node.get(key), dict) else node.setdefault(key, {})
    node[path[-1]] = value
    return spec


tokenizer_paths = st.sampled_from(
    [
        ["model"],
        ["model", "type"],
        ["model", "vocab"],
        ["model", "merges"],
        ["model", "byte_fallback"],
        ["model", "unk_token"],
        ["model", "dropout"],
        ["decoder"],
        ["decoder", "type"],
        ["pre_tokenizer"],
        ["pre_tokenizer", "type"],
        ["added_tokens"],
        ["normalizer"],
        ["post_processor"],
        ["truncation"],
        ["padding"],
        ["version"],
    ]
)


@FUZZ
@given(
    content=st.binary()
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.tuples(tokenizer_paths, json_values).map(lambda pv: ("mutate", *pv))
    | st.integers(0, 4000).map(lambda n: ("truncate", n))
)
@example(content=("mutate", ["model", "vocab"], {"a": -1}))
@example(content=("mutate", ["decoder"], {"type": "ByteFallback", "x": 1}))
@example(content=("mutate", ["model", "continuing_subword_prefix"], "####"))
def test_tokenizer_load_on_any_bytes(workdir, tokenizer_json, content):
    if isinstance(content, tuple) and content[0] == "mutate":
        content = json.dumps(mutate(tokenizer_json, content[1], content[2])).encode()
    elif isinstance(content, tuple):
        content = json.dumps(tokenizer_json).encode()[: content[1]]
    path = workdir / "tokenizer.json"
    path.write_bytes(content)
    got = user_error_or_result(Tokenizer.load, path)
    assert isinstance(got, Tokenizer | UserError)


# ------------------------------------------------------------------------------ (d, e) chat and pair JSONL

roles = st.sampled_from(["system", "user", "assistant"]) | json_values
message = st.fixed_dictionaries({}, optional={"role": roles, "content": st.text(max_size=10) | json_values})
chat_record = st.fixed_dictionaries({"messages": st.lists(message | json_values, max_size=3) | json_values})
pair_record = st.fixed_dictionaries(
    {},
    optional={
        **{k: st.text(max_size=10) | json_values for k in ("prompt", "chosen", "rejected")},
        "label": st.sampled_from(["a", "b", "tie", None]) | json_values,
    },
)
jsonl_line = (
    chat_record.map(json.dumps)
    | pair_record.map(json.dumps)
    | json_values.map(json.dumps)
    | st.text(max_size=30)
    | st.sampled_from(["", "{", "[" * 3000, '{"prompt": ' + "1" * 5000 + "}", '{"prompt": NaN}'])
)
jsonl_content = st.lists(jsonl_line, max_size=5).map(lambda lines: "\n".join(lines).encode()) | st.binary()


def write_jsonl(workdir: Path, content: bytes) -> Path:
    path = workdir / "data.jsonl"
    path.write_bytes(content)
    return path


@FUZZ
@given(content=jsonl_content)
@example(content=b'{"messages": []}\n\xff\n')
@example(content=b"[" * 3000)
@example(content=b'{"prompt": ' + b"1" * 5000 + b"}")
def test_chat_jsonl_readers_on_any_lines(workdir, content):
    path = write_jsonl(workdir, content)
    for reader in (load_jsonl_messages, load_jsonl_preferences):
        got = user_error_or_result(reader, path)
        assert isinstance(got, list | UserError)
        if isinstance(got, list):
            assert all(isinstance(x, list | dict) for x in got)


@FUZZ
@given(content=jsonl_content)
@example(content=b'{"prompt": "p", "chosen": "a", "rejected": "b", "label": "tie"}\n')
def test_load_pairs_on_any_lines(workdir, content):
    got = user_error_or_result(load_pairs, write_jsonl(workdir, content))
    assert isinstance(got, list | UserError)
    if isinstance(got, list):
        assert got and all(isinstance(p[k], str) for p in got for k in ("prompt", "chosen", "rejected"))


# ------------------------------------------------------------------------- what the fuzzing found, pinned

FOUND = {
    # float(int) overflows past 1.8e308: rope_theta as a 400-digit integer was an OverflowError
    "huge int for a float": (PretrainConfig, b"model:\n  rope_theta: " + b"7" * 400 + b"\n"),
    # SwiGLU's width was computed in floats: a huge d_model was an OverflowError
    "huge d_model, swiglu": (ModelConfig, b"d_model: " + b"9" * 400 + b"\nffn: swiglu\n"),
    # the suggestion of a valid d_model was computed in floats too
    "huge d_model, bad n_head": (ModelConfig, b"d_model: " + b"9" * 400 + b"\nn_head: " + b"8" * 20 + b"\n"),
    "not UTF-8": (PretrainConfig, b"name: caf\xe9\n"),  # was UnicodeDecodeError
    "nested too deeply": (PretrainConfig, b"[" * 3000),  # was RecursionError from PyYAML
    "impossible date": (PretrainConfig, b"name: 2024-13-01\n"),  # was ValueError from PyYAML's date building
    "4301-digit int": (PretrainConfig, b"train:\n  steps: " + b"1" * 5000 + b"\n"),  # was ValueError
}


@pytest.mark.parametrize("what", FOUND)
def test_found_config_files(workdir, what):
    cls, content = FOUND[what]
    assert isinstance(load_file(workdir, cls, content), UserError)


@pytest.mark.parametrize("value", ["[" * 3000, "2024-13-01", "1" * 5000, "7" * 400])
def test_found_override_values(value):
    # PyYAML's RecursionError and ValueError escaped the override parser, and float() its OverflowError
    assert isinstance(user_error_or_result(load_config, PretrainConfig, None, [f"train.lr={value}"]), UserError)


@pytest.mark.parametrize(
    "content",
    [
        b'{"messages": 3}\n',  # every refusal was a bare ValueError: a traceback, not one line
        b'{"prompt": "p", "chosen": "a"}\n',
        b'{"prompt": "caf\xe9"}\n',  # was UnicodeDecodeError
        b"[" * 3000 + b"\n",  # was RecursionError
        b'{"prompt": ' + b"1" * 5000 + b"}\n",  # was ValueError (Python's 4300-digit limit)
    ],
)
def test_found_chat_jsonl(workdir, content):
    path = write_jsonl(workdir, content)
    for reader in (load_jsonl_messages, load_jsonl_preferences, load_pairs):
        assert isinstance(user_error_or_result(reader, path), UserError)


def test_found_no_labelled_pairs(workdir):
    path = write_jsonl(workdir, b'{"prompt": "p", "chosen": "a", "rejected": "b", "label": "tie"}\n')
    assert isinstance(user_error_or_result(load_pairs, path), UserError)  # was a bare ValueError


@pytest.mark.parametrize(
    "path, value", [(["model", "continuing_subword_prefix"], "####"), (["model", "vocab"], "all zero")]
)
def test_found_tokenizer_files_that_make_tokenizers_panic(workdir, tokenizer_json, capfd, path, value):
    # tokenizers 0.23 panics on these: a PanicException (a BaseException, not an Exception) and Rust's panic
    # message on stderr, around the one line. Repeated ids panic or not depending on hash order.
    if value == "all zero":
        value = dict.fromkeys(tokenizer_json["model"]["vocab"], 0)
    (workdir / "tokenizer.json").write_text(json.dumps(mutate(tokenizer_json, path, value)))
    assert isinstance(user_error_or_result(Tokenizer.load, workdir / "tokenizer.json"), UserError)
    assert "panicked" not in capfd.readouterr().err


def test_found_tokenizer_file_that_truncates_or_pads(workdir, tokenizer_json):
    # A tokenizer.json from elsewhere may set truncation and padding: encode cut and padded every text.
    spec = mutate(tokenizer_json, ["truncation"], {"max_length": 2, "stride": 0, "strategy": "LongestFirst"})
    spec["truncation"]["direction"] = "Right"
    spec["padding"] = {"strategy": {"Fixed": 40}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 2}
    spec["padding"] |= {"pad_type_id": 0, "pad_token": "<|pad|>"}
    (workdir / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer.load(workdir / "tokenizer.json")
    for text in ("hello world, a longer text", "hi"):
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode_batch([text]) == [tok.encode(text)]


def test_missing_files_are_file_not_found(workdir):
    missing = workdir / "no-such-file"
    for fn in (load_jsonl_messages, load_jsonl_preferences, load_pairs, Tokenizer.load):
        with pytest.raises(FileNotFoundError):
            fn(missing)
    assert isinstance(user_error_or_result(load_config, PretrainConfig, missing), UserError)
