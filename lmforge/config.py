"""YAML recipes -> typed config dataclasses: the one place where configs are loaded and checked.

Every stage declares its settings as a (possibly nested) dataclass and loads it with `load_config`:

    @dataclass
    class PretrainConfig:
        model: ModelConfig = field(default_factory=ModelConfig)
        lr: float = 3e-4
        norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"

        def validate(self):            # optional; raise ValueError with a clear message
            if self.lr <= 0:
                raise ValueError(f"lr must be positive, got {self.lr}")

    cfg = load_config(PretrainConfig, "configs/pretrain/tiny.yaml", ["model.n_layer=4", "lr=1e-3"])
    save_config(cfg, "runs/tiny/config.yaml")     # load_config reads it back to an equal object

Values are converted from the field annotations (int, float, bool, str, Path, `X | None`, `Literal[...]`,
list[...], tuple[...], dict[...], nested dataclasses). Override values are parsed as YAML, so `true`,
`null`, `1e-3` and `[1, 2]` mean what they look like. Every problem raises `ConfigError` with a one-line
message naming the key and what to do about it, and where the bad value came from: `override train.lr=abc: ...`
for the command line, `configs/x.yaml: ...` for the file (also when a section's validate() objects to it).

A setting that moves keeps old run folders loadable: the dataclass it left lists it in a class attribute
`retired_keys: ClassVar[dict[str, str]]` (key → where it lives now). A file holding one still loads, the key
dropped (with a warning when it was set to something other than false or null); an override naming it is refused
with the new place.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = ["ConfigError", "UserError", "from_dict", "load_config", "save_config", "to_dict"]

T = TypeVar("T")
_NoneType = type(None)


class UserError(ValueError):
    """Something the user asked for that cannot be done, explained in one line that says what to do.

    Every stage raises this (or a subclass) for a mistake the user can fix: a bad argument, a damaged file
    they pointed at, a prompt longer than the model's context. The CLI prints it as one line and exits 2
    (see lmforge/cli.py: main); the server answers it with a 4xx. Anything else escaping is a bug.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


class ConfigError(UserError):
    """A config problem, explained in one line. `key` is the dotted key at fault, when there is one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class _Mismatch(ConfigError):
    """The value at `key` has the wrong type or is not an allowed choice (a Union tries its next member)."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read the YAML file at `path` (if any), apply `key=value` overrides, build and validate `cls`."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"load_config needs a dataclass, got {cls!r}")
    file_data = _read_yaml(Path(path)) if path is not None else {}
    if isinstance(overrides, str):  # a lone "a=1" would otherwise be iterated character by character
        overrides = [overrides]
    overrides = [str(text) for text in overrides]
    data = copy.deepcopy(file_data)
    keys = [_apply_override(data, cls, text) for text in overrides]
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        culprits = _culprits(cls, file_data, overrides, keys, e)
        if len(culprits) == 1:
            text, key = overrides[culprits[0]], keys[culprits[0]]
            message = str(e).removeprefix(f"{key}: ")  # the override names the key already
            raise ConfigError(f"override {text}: {message}", e.key) from None
        if culprits:
            raise ConfigError(f"overrides {', '.join(overrides[i] for i in culprits)}: {e}", e.key) from None
        if path is None:
            raise
        raise ConfigError(f"{path}: {e}", e.key) from None


def _culprits(
    cls: type, file_data: dict[str, Any], overrides: list[str], keys: list[str], error: ConfigError
) -> list[int]:
    """The overrides without which `error` goes away; none when the file (or the defaults) has it alone.

    The key of an error does not tell: validate() of a section reports the section, whichever of its values
    came from where (`train.lr=1e-5` against the file's min_lr). So leave each override out in turn. Leaving
    out one that replaced a bad value of the file brings that value's own error back, which says nothing about
    `error`: then the file's value is left out too (the field keeps its default)."""
    failure = (str(error), error.key)

    def outcome(skip: int, drop: bool) -> tuple[str, str | None] | None:
        data = copy.deepcopy(file_data)
        if drop:
            _delete(data, keys[skip].split("."))
        for i, text in enumerate(overrides):
            if i != skip:
                _apply_override(data, cls, text)
        try:
            from_dict(cls, data)
        except ConfigError as e:
            return str(e), e.key
        return None

    culprits = []
    for i in range(len(overrides)):
        got = outcome(i, drop=False)
        if got is not None and got != failure and _related(got[1], keys[i]):
            got = outcome(i, drop=True)
        if got != failure:
            culprits.append(i)
    return culprits


def _related(error_key: str | None, key: str) -> bool:
    """Whether an error at `error_key` may be about the value at `key`: the same field, one inside it, or a
    section holding it (whose validate() reports the section)."""
    if error_key is None:
        return True
    return any(a == b or a.startswith((b + ".", b + "[")) for a, b in ((error_key, key), (key, error_key)))


def _delete(data: dict[str, Any], parts: list[str]) -> None:
    node: Any = data
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build `cls` from plain data (as read from YAML or JSON), converting and validating every field."""
    return _build(cls, data, "")


def to_dict(obj: Any) -> dict[str, Any]:
    """The dataclass `obj` as plain dicts, lists and scalars, ready for YAML or JSON."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {obj!r}")
    # A config may fill some fields from others (ModelConfig: head_dim from d_model); those are written as
    # None so that a later override of the source field re-derives them instead of keeping a stale value.
    derived = set(getattr(obj, "derived_fields", ()))
    return {
        f.name: None if f.name in derived else _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init
    }


def save_config(obj: Any, path: str | Path) -> Path:
    """Write `obj` as YAML, atomically: a crash leaves either the old file or the new one, never half."""
    # runs.py imports this module, so import its writer here rather than at the top.
    from lmforge.runs import atomic_write_text

    text = yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)
    return atomic_write_text(path, text)


# ---------------------------------------------------------------------------------------------- reading


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which plain YAML silently resolves to the last one."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key; construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config path is a folder, not a YAML file: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({e.reason}); save the recipe as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply to read") from None
    except ValueError as e:
        # PyYAML builds some scalars with Python and lets their errors through: a date like 2024-13-01, an
        # integer of more than 4300 digits.
        raise ConfigError(f"{path}: invalid YAML value: {_value_problem(e)}") from None
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of key: value, got {_show(data)}")
    return data


def _apply_override(data: dict[str, Any], cls: type, text: str) -> str:
    """Set `a.b.c=value` inside `data` (creating sections as needed); return the dotted key."""
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like key=value (dotted for nested: model.n_layer=4)")
    parts = key.split(".")
    _check_key_path(cls, parts, text)
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError):
        # not valid YAML ("a: b: c", a date like 2024-13-01, "[[[[..." past the recursion limit): the text as a
        # string, which the field's type then accepts or refuses
        value = raw
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return key


def _check_key_path(cls: type, parts: list[str], text: str) -> None:
    """Fail early on an override key that names no field, with the closest real key as a hint."""
    tp: Any = cls
    for i, part in enumerate(parts):
        tp = _strip_optional(tp)
        if tp is dict or tp is Any or get_origin(tp) is dict:
            return  # free-form mapping: any key below it is fine
        section = ".".join(parts[:i])
        if not (dataclasses.is_dataclass(tp) and isinstance(tp, type)):
            raise ConfigError(f"override {text!r}: '{section}' is {_describe(tp)}, not a section", section)
        names = _field_names(tp)
        dotted = ".".join(parts[: i + 1])
        if part in getattr(tp, "retired_keys", {}):
            moved = tp.retired_keys[part]
            raise ConfigError(f"'{dotted}' in override {text!r} is no longer a setting: use {moved}", dotted)
        if part not in names:
            prefix = f"{section}." if section else ""
            hint = _hint(part, names, prefix)
            raise ConfigError(f"unknown key '{dotted}' in override {text!r}{hint}", dotted)
        tp = get_type_hints(tp)[part]


# --------------------------------------------------------------------------------------------- building


def _build(cls: type[T], data: Any, prefix: str) -> T:
    if data is None:  # `model:` with nothing under it means "all defaults"
        data = {}
    if not isinstance(data, dict):
        raise _Mismatch(f"{prefix or cls.__name__}: expected {_describe(cls)}, got {_show(data)}", prefix)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    retired = getattr(cls, "retired_keys", {})  # keys older files hold: dropped, so those files still load
    for key in data:
        if key in retired and key not in fields:
            if data[key] not in (None, False):  # a setting that no longer does anything here: say where it went
                warnings.warn(f"{_join(prefix, str(key))} is ignored: use {retired[key]}", stacklevel=2)
            continue
        if key not in fields:
            dotted = _join(prefix, str(key))
            raise ConfigError(f"unknown key '{dotted}'{_hint(str(key), list(fields), '')}", dotted)
    kwargs = {}
    for name, f in fields.items():
        dotted = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{dotted}' ({_describe(hints[name])})", dotted)
    try:
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            validate()
    except ValueError as e:
        # Place the message at this sub-config. A ConfigError raised by the constructor or validate() may name
        # the field at fault, relative to this dataclass (ModelConfig: "d_model").
        key = _join(prefix, e.key) if getattr(e, "key", None) is not None else prefix or None
        raise ConfigError(f"{prefix}: {e}" if prefix else str(e), key) from None
    return obj


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or a ConfigError that names `key`."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is Union or origin is types.UnionType:
        if value is None and _NoneType in args:
            return None
        members = [a for a in args if a is not _NoneType]
        for member in members:  # an exact type match wins, so `int | str` keeps "3" a string
            if type(value) is member:
                return value
        for member in members:
            try:
                return _convert(value, member, key)
            except _Mismatch as e:
                if e.key != key:
                    raise  # the value fits this member but something inside it is wrong
                if len(members) == 1:  # `X | None`: keep X's message, mention null
                    message = str(e).replace(f"expected {_describe(member)}", f"expected {_describe(tp)}", 1)
                    raise _Mismatch(message, key) from None
        raise _Mismatch(f"{key}: expected {_describe(tp)}, got {_show(value)}", key)
    if origin is Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return value
        choices = ", ".join(repr(a) for a in args)
        strs = [a for a in args if isinstance(a, str)]
        hint = _hint(value, strs, "") if isinstance(value, str) else ""
        raise _Mismatch(f"{key}: {_show(value)} is not one of {choices}{hint}", key)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, key)
    if value is None:
        raise _Mismatch(f"{key}: expected {_describe(tp)}, got null", key)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        return _convert_sequence(value, origin or tp, args, key)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch(f"{key}: expected {_describe(tp)}, got {_show(value)}", key)
        if not args:
            return dict(value)
        return {_convert(k, args[0], f"{key}.{k}"): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    scalar = _SCALARS.get(tp)
    if scalar is not None:
        return scalar(value, key)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: cannot read a config value of type {_describe(tp)}", key)


def _convert_sequence(value: Any, kind: type, args: tuple, key: str) -> Any:
    if not isinstance(value, list | tuple):
        raise _Mismatch(f"{key}: expected a list, got {_show(value)}", key)
    if kind is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise _Mismatch(f"{key}: expected a list of {len(args)} items, got {len(value)}", key)
        return tuple(_convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    return kind(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = _to_float(value, key, "an int") if isinstance(value, float | str) else None
    if number is not None and number.is_integer():  # 1e6 steps is a fine way to write 1000000
        return int(number)
    raise _Mismatch(f"{key}: expected an int, got {_show(value)}", key)


def _to_float(value: Any, key: str, expected: str = "a float") -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int past 1.8e308
            raise _Mismatch(f"{key}: expected {expected}, got an integer too large for a float", key) from None
    if isinstance(value, str):
        # PyYAML follows YAML 1.1, whose floats need a dot: `lr: 1e-3` arrives as the string "1e-3".
        try:
            return float(value)
        except ValueError:
            pass
    raise _Mismatch(f"{key}: expected {expected}, got {_show(value)}", key)


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise _Mismatch(f"{key}: expected true or false, got {_show(value)}", key)


def _to_str(value: Any, key: str) -> str:
    # Ints are taken as text (a run named 2024); floats and bools are not, since YAML has already
    # rewritten them (1.10 -> 1.1, yes -> true) and the original text is lost.
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _Mismatch(f"{key}: expected a string, got {_show(value)} (quote it)", key)


def _to_path(value: Any, key: str) -> Path:
    if isinstance(value, str | Path):
        return Path(value)
    raise _Mismatch(f"{key}: expected a path, got {_show(value)}", key)


_SCALARS = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str, Path: _to_path}


# ---------------------------------------------------------------------------------------------- helpers


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not _NoneType]
        if len(members) == 1:
            return members[0]
    return tp


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _hint(word: str, choices: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    if len(choices) <= 12:
        return " (valid keys: " + ", ".join(prefix + c for c in choices) + ")"
    return ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _show(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _value_problem(e: ValueError) -> str:
    if "integer string conversion" in str(e):
        return "an integer of more than 4300 digits (write it as 1.0e+4300, or smaller)"
    return str(e)


def _describe(tp: Any) -> str:
    """A type as a reader of the config would say it: 'an int', 'a float or null', ..."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    names = {
        _NoneType: "null",
        int: "an int",
        float: "a float",
        bool: "true or false",
        str: "a string",
        Path: "a path",
        list: "a list",
        tuple: "a list",
        set: "a list",
        frozenset: "a list",
        dict: "a mapping",
    }
    return names.get(origin or tp, getattr(tp, "__name__", str(tp)))
