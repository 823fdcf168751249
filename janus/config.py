"""Typed configs from a JSON file plus ``--section.field value`` command-line overrides.

Every field of the (nested) dataclass becomes a documented command-line flag, so
``--help`` lists the whole configuration with defaults. Unknown keys in a file or on the
command line are errors (a typo must not silently fall back to a default).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _leaf_fields(cls, prefix: str = ""):
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            yield from _leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f


def _parse_value(text: str, tp):
    """Parse a command-line string for a field of type ``tp`` (JSON for lists/dicts)."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if text.lower() in ("none", "null"):
            return None
        for arg in args:  # first member type that parses it
            try:
                return _parse_value(text, arg)
            except (ValueError, TypeError, json.JSONDecodeError):
                continue
        raise ValueError(f"cannot parse {text!r} as {tp}")
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if tp in (int, float, str) or (isinstance(tp, type) and issubclass(tp, os.PathLike)):
        return tp(text)
    return json.loads(text)


def _build(cls, values: dict, where: str):
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{where}: unknown config key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        tp = hints[f.name]
        kwargs[f.name] = _build(tp, v, f"{where}.{f.name}") if _is_dataclass_type(tp) and isinstance(v, dict) else v
    return cls(**kwargs)


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    parser.add_argument("--config", help="JSON config file; command-line flags override it")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for name, tp, f in _leaf_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        doc = f.metadata.get("help", "")
        parser.add_argument(f"--{name}", dest=f"cfg:{name}", default=None, metavar="V",
                            help=f"{doc} (default: {default!r})".strip())


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_args(cls: type[T], args: argparse.Namespace, defaults_fn=None) -> T:
    """Build ``cls`` from --config and flags. ``defaults_fn(values) -> dict`` may supply
    defaults that depend on what the user set (e.g. per-mode learning rates); the user's
    values win over them."""
    values: dict = {}
    if args.config:
        with open(args.config) as fh:
            try:
                values = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"{args.config}:{e.lineno}: invalid JSON: {e.msg}") from None
    types = {name: tp for name, tp, _ in _leaf_fields(cls)}
    for key, text in vars(args).items():
        if not key.startswith("cfg:") or text is None:
            continue
        name = key[4:]
        try:
            value = _parse_value(text, types[name])
        except (ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"--{name}: cannot parse {text!r} ({e})") from None
        node = values
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    if defaults_fn is not None:
        values = _merge(defaults_fn(values), values)
    return _build(cls, values, args.config or "config")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
