"""Typed dataclass configs: field docstrings are the CLI help; load/save TOML; strict validation.

A config class is a plain dataclass whose fields carry a docstring on the line after them. This module
turns such a class into argparse options, reads and writes it as TOML, and coerces values to the declared
types, rejecting unknown keys (with a suggestion) and wrong types with a one-line `UserError`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import textwrap
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import tomli_w

from orthosae.atomic import write_text
from orthosae.errors import UserError

T = TypeVar("T")

_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(text: str) -> int:
    """Parse an integer count that may end in k, M or B (`2M` → 2_000_000)."""
    s = str(text).strip().replace("_", "")
    mult = 1
    if s and s[-1].lower() in _SUFFIXES:
        mult = _SUFFIXES[s[-1].lower()]
        s = s[:-1]
    try:
        value = float(s) * mult
    except ValueError:
        raise ValueError(f"not a count: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"not a finite count: {text!r}")
    if value != int(value):
        raise ValueError(f"not a whole count: {text!r}")
    return int(value)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Return {field name: docstring} from the string literal that follows each annotated field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(name: str, tp: Any, value: Any, *, from_text: bool = False) -> Any:
    """Convert `value` to the declared type `tp`, or raise UserError naming the field."""
    base, optional = _unwrap_optional(tp)
    if value is None or (from_text and optional and str(value).lower() in ("none", "auto", "")):
        if optional:
            return None
        raise UserError(
            f"config field '{name}' must be set (got nothing); give a value of type {_tname(base)}"
        )
    if get_origin(base) is Literal:
        choices = get_args(base)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise UserError(f"config field '{name}' = {value!r} is not one of {list(choices)}{extra}")
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in ("true", "1", "yes", "false", "0", "no"):
            return str(value).lower() in ("true", "1", "yes")
        raise UserError(f"config field '{name}' must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise UserError(f"config field '{name}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return parse_count(value)
            except ValueError:
                pass
        raise UserError(f"config field '{name}' must be an integer (e.g. 4096 or 2M), got {value!r}")
    if base is float:
        if isinstance(value, bool):
            raise UserError(f"config field '{name}' must be a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config field '{name}' must be a number, got {value!r}")
    if base is str:
        if isinstance(value, str):
            return value
        raise UserError(f"config field '{name}' must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for field {name}")  # programming error


def _tname(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + "/".join(map(str, get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config") -> T:
    """Build `cls` from a mapping, rejecting unknown keys (with the closest known key) and wrong types."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in names:
            hint = difflib.get_close_matches(name, names, n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(names)}"
            raise UserError(f"{source}: unknown key '{key}'{extra}")
        kwargs[name] = coerce(name, hints[name], value)
    cfg = cls(**kwargs)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_toml(cls: type[T], path: str | Path) -> T:
    """Read a TOML config file into `cls`. Errors name the file and what is wrong."""
    return from_dict(cls, read_toml(path), source=str(path))


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"config file not found: {p}")
    if p.is_dir():
        raise UserError(f"config path is a directory, expected a .toml file: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"config file is not UTF-8 text: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {p} is not valid TOML: {e}") from None


def save_toml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as TOML (None values are omitted: TOML has no null)."""
    data = {k: v for k, v in to_dict(cfg).items() if v is not None}
    write_text(path, tomli_w.dumps(data))


# --- argparse -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one option per field. Defaults are left unset (None) so that only given flags override."""
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = docs.get(f.name, "")
        help_text = f"{help_text} [default: {default}]" if help_text else f"[default: {default}]"
        help_text = help_text.replace("%", "%%")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_origin(tp) is Literal:
            parser.add_argument(flag, choices=list(get_args(tp)), default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, metavar=_tname(tp).upper(), help=help_text)


def cli_overrides(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """The fields that were given on the command line, coerced from text."""
    hints = _hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = getattr(ns, f.name, None)
        if value is not None:
            out[f.name] = coerce(f.name, hints[f.name], value, from_text=True)
    return out


def resolve(cls: type[T], ns: argparse.Namespace, config_path: str | None) -> T:
    """Config file (if any) first, then command-line flags on top; validated."""
    data: dict[str, Any] = read_toml(config_path) if config_path else {}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    source = str(config_path) if config_path else "command line"
    return from_dict(cls, {**data, **cli_overrides(cls, ns)}, source=source)
