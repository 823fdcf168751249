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


def _flag_dest(prefix: str, name: str) -> str:
    return f"dataclass:{prefix}{name}"


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, *, prefix: str = "", group=None,
                        defaults: dict | None = None) -> list[str]:
    """Add one command-line flag per field of the dataclass ``cls`` (nested dataclass fields too).

    A field ``max_len`` becomes ``--{prefix}max-len`` with ``--{prefix}max_len`` as an alias; a
    nested field ``optim.lr`` becomes ``--{prefix}optim.lr``. Values are parsed by the field's
    type exactly like ``--section.field`` flags (``_parse_value``): ints, floats, strings,
    ``true``/``false`` for booleans (a bare boolean flag means true), ``none`` for optional
    fields, JSON for lists and dicts. ``--help`` shows ``metadata["help"]`` of the field and its
    default; ``metadata["choices"]`` limits the accepted values. ``defaults`` ({field: value})
    replaces dataclass defaults for this command (shown in --help, used when the flag is absent).

    Several dataclasses may share one parser: a field whose flag another call (same ``prefix``)
    already added shares that flag, so one ``--max-len`` sets every config with a ``max_len``;
    a clash with an unrelated option is an error. ``group`` (an argparse argument group) puts
    the flags under a heading. Build the configs with ``dataclass_from_flags``. Returns the dests.

        p = argparse.ArgumentParser()
        add_dataclass_flags(p, BeamConfig, group=p.add_argument_group("AR beam search"))
        beam = dataclass_from_flags(BeamConfig, p.parse_args())
    """
    target = group if group is not None else parser
    defaults = defaults or {}
    dests = []
    for name, tp, f in _leaf_fields(cls):
        dest = _flag_dest(prefix, name)
        flags = [f"--{prefix}{name.replace('_', '-')}"]
        if "_" in name:
            flags.append(f"--{prefix}{name}")
        existing = [parser._option_string_actions.get(s) for s in flags]
        if any(a is not None for a in existing):
            if all(a is not None and a.dest == dest for a in existing):
                dests.append(dest)  # shared with an earlier dataclass
                continue
            raise ValueError(f"{cls.__name__}.{name}: flag {flags[0]} is already used by another option")
        if name in defaults:
            default = defaults[name]
        else:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        doc = f.metadata.get("help", "")
        kw: dict = {"dest": dest, "default": defaults.get(name), "help": f"{doc} (default: {default!r})".strip()}
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        if tp is bool:
            kw.update(nargs="?", const="true", metavar="BOOL")
        elif "choices" not in f.metadata:
            kw["metavar"] = {int: "N", float: "X"}.get(tp, "V")
        target.add_argument(*flags, **kw)
        dests.append(dest)
    return dests


def dataclass_from_flags(cls: type[T], args: argparse.Namespace, *, prefix: str = "") -> T:
    """``cls`` built from the flags ``add_dataclass_flags`` added: fields whose flag was given (or
    has a command default) take that value, the rest their dataclass defaults. A value that does
    not parse raises ``ValueError`` naming the flag; the dataclass's own validation runs as usual."""
    values: dict = {}
    for name, tp, _ in _leaf_fields(cls):
        dest = _flag_dest(prefix, name)
        if not hasattr(args, dest):
            raise ValueError(f"{cls.__name__}.{name}: no flag for it in this parser (call add_dataclass_flags)")
        raw = getattr(args, dest)
        if raw is None:
            continue
        if isinstance(raw, str):
            try:
                raw = _parse_value(raw, tp)
            except (ValueError, TypeError, json.JSONDecodeError) as e:
                raise ValueError(f"--{prefix}{name.replace('_', '-')}: cannot parse {getattr(args, dest)!r} ({e})") from None
        node = values
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = raw
    return _build(cls, values, cls.__name__)
