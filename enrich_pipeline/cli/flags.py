"""Command-line parsing shared by the commands: flags whose defaults, bounds and help come from
the settings tree, and arguments refused when they are not text."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from pydantic import BaseModel

from enrich_pipeline.settings import describe, env_name

# Flag -> settings field, per settings model, so errors name the flag the user typed.
FlagMap = dict[str, str]


def add_setting(
    parser: argparse.ArgumentParser,
    flag: str,
    model: type[BaseModel],
    name: str,
    *,
    flags: FlagMap,
    default: Any = None,
    **kwargs: Any,
) -> None:
    """``flag`` for ``model.name``. A setting read from a variable has no argparse default, so
    that an unset flag means "the variable, else the default"; any other takes the default."""
    info = model.model_fields[name]
    var = env_name(model, name)
    shown = info.default if default is None else default
    if default is None and not var:
        default = info.default
    help_text = describe(model, name).removesuffix(f" ({var})") if var else describe(model, name)
    where = f"default {shown}" + (f", or {var}" if var else "")
    if info.annotation is bool or "bool" in str(info.annotation):
        kwargs.setdefault("action", "store_true")
        kwargs.setdefault("default", None)
        parser.add_argument(flag, help=f"{help_text}", **kwargs)
    else:
        kwargs.setdefault("type", int if "int" in str(info.annotation) else str)
        parser.add_argument(flag, default=default, help=f"{help_text} ({where})", **kwargs)
    flags[flag] = name


def given(args: argparse.Namespace, flags: FlagMap) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings values the user gave on the command line, and their flags (for errors)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for flag, name in flags.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            values[name] = value
            sources[name] = flag
    return values, sources


def only(values: Mapping[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k in model.model_fields}


class Parser(argparse.ArgumentParser):
    """``argparse`` that refuses an argument which is not UTF-8 text, in one line, exit 2.

    Linux hands a program bytes; Python decodes them as UTF-8 and keeps each byte it cannot
    decode as a lone surrogate (PEP 383), which later fails wherever the text is encoded: in a
    database parameter, an HTTP body, a log line. Refused here, every flag and positional of
    every command (and subcommand: they are parsers of this class) is checked once, before
    anything is opened or paid for.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extra = super().parse_known_args(args, namespace)
        # ``_actions`` holds the arguments of groups too (a mutually exclusive --user).
        for action in self._actions:
            values = getattr(parsed, action.dest, None) if action.dest else None
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, str) and not is_text(value):
                    self._not_text(action, value)
        return parsed, extra

    def _not_text(self, action: argparse.Action, value: str) -> NoReturn:
        name = "/".join(action.option_strings) or str(action.metavar or action.dest)
        try:  # the bytes as given, for the user to recognise
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate no byte decodes to (a caller's own string)
            raw = value.encode("utf-8", "backslashreplace")
        shown = repr(raw[:60]) + ("..." if len(raw) > 60 else "")
        self.exit(2, f"error: {name}: not valid UTF-8 ({shown}); give it as UTF-8 text\n")


def is_text(value: str) -> bool:
    """Whether ``value`` is text: no lone surrogate (an undecodable byte of the command line)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
