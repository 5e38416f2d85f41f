"""The one configuration mechanism: a dataclass per command, a `help` per field.

Server settings (`server.settings.ServerSettings`), the trainer's stage configs and the
CLI flags all use it. Each field is declared with `option(default, help)`; `add_flags`
turns the fields into argparse flags of the same name (``max_tokens`` -> ``--max-tokens``;
booleans get ``--x/--no-x``), `from_args` builds the dataclass back. A value comes from,
in order: the flag, the environment (``<PREFIX><FIELD>`` when the class names an
``env_prefix``), a preset (when given), the field default. Help texts show each default
once, from the field itself.

A field whose type is itself a dataclass (declared with ``default_factory``) is nested:
its fields become flags of their own names (``--correct-reward`` for
``GrpoRunConfig.reward.correct_reward``), a preset gives it a dict, and `from_args`
builds it from the flags given on top of its default instance.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, Literal


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: bool = True,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text; `flag=False` keeps it off the command line."""
    meta = {"help": help, "flag": flag}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", True)]


def nested_class(cls: type, f: dataclasses.Field) -> type | None:
    """The dataclass a field holds, when it is a nested config (else None)."""
    kind = typing.get_type_hints(cls)[f.name]
    return kind if dataclasses.is_dataclass(kind) and isinstance(kind, type) else None


def field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_flags(parser: argparse.ArgumentParser, cls: type, defaults: Any = None) -> None:
    """One flag per field of `cls` (nested configs flattened); defaults stay None so
    `from_args` can tell a flag given from one left out."""
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls):
        default = field_default(f) if defaults is None else getattr(defaults, f.name)
        inner = nested_class(cls, f)
        if inner is not None:
            add_flags(parser, inner, defaults=default)
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, choices, _ = _flag_type(hints[f.name])
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, type=kind, choices=choices, default=None,
                                help=help_text)


def from_args(cls: type, args: argparse.Namespace, preset: dict[str, Any] | None = None,
              **overrides: Any) -> Any:
    """Flag > environment > preset > field default; `overrides` win over everything."""
    values = dict(preset or {})
    values.update(from_env(cls))
    for f in flag_fields(cls):
        inner = nested_class(cls, f)
        if inner is not None:
            values[f.name] = _nested_from_args(inner, field_default(f), args,
                                               values.get(f.name))
            continue
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    values.update(overrides)
    return cls(**values)


def _nested_from_args(cls: type, default: Any, args: argparse.Namespace,
                      preset: Any) -> Any:
    """A nested config: its default instance, then the preset's dict, then the flags."""
    base = preset if dataclasses.is_dataclass(preset) else default
    values = dict(preset) if isinstance(preset, dict) else {}
    for f in flag_fields(cls):
        inner = nested_class(cls, f)
        if inner is not None:
            values[f.name] = _nested_from_args(inner, getattr(base, f.name), args,
                                               values.get(f.name))
            continue
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return dataclasses.replace(base, **values)


def from_env(cls: type) -> dict[str, Any]:
    """Field values from ``<cls.env_prefix><FIELD>`` environment variables."""
    prefix = getattr(cls, "env_prefix", None)
    if not prefix:
        return {}
    hints = typing.get_type_hints(cls)
    values = {}
    for f in flag_fields(cls):
        if nested_class(cls, f) is not None:
            continue
        raw = os.environ.get(f"{prefix}{f.name.upper()}")
        if raw is not None:
            kind, _, _ = _flag_type(hints[f.name])
            values[f.name] = (raw.lower() in ("1", "true", "yes", "on")) if kind is bool \
                else kind(raw)
    return values


def unescape(text: str | None) -> str | None:
    """'\\n' typed on a command line -> a newline."""
    if text is None or "\\" not in text:
        return text
    # backslashreplace keeps non-Latin-1 characters intact through unicode_escape
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _flag_type(annotation: Any) -> tuple[Any, list | None, bool]:
    """(argparse type, choices, optional) of a field annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices, optional
    if annotation in (int, float, str, bool):
        return annotation, None, optional
    raise TypeError(f"no flag type for {annotation!r}")
