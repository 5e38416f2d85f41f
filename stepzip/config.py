"""The one configuration mechanism: a dataclass per command, a `help` per field.

Server settings (`server.settings.ServerSettings`), the trainer's stage configs and the
CLI flags all use it. Each field is declared with `option(default, help)`; `add_flags`
turns the fields into argparse flags of the same name (``max_tokens`` -> ``--max-tokens``;
booleans get ``--x/--no-x``), `from_args` builds the dataclass back. A value comes from,
in order: the flag, the environment (``<PREFIX><FIELD>`` when the class names an
``env_prefix``), a preset (when given), the field default. Help texts show each default
once, from the field itself.
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


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of `cls`; defaults stay None so `from_args` can tell a flag
    given from one left out."""
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind, choices, _ = _flag_type(hints[f.name])
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})".replace("%", "%%")
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
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    values.update(overrides)
    return cls(**values)


def from_env(cls: type) -> dict[str, Any]:
    """Field values from ``<cls.env_prefix><FIELD>`` environment variables."""
    prefix = getattr(cls, "env_prefix", None)
    if not prefix:
        return {}
    hints = typing.get_type_hints(cls)
    values = {}
    for f in flag_fields(cls):
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
