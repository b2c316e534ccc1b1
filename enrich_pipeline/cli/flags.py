"""Command-line flags whose defaults, bounds and help come from the settings tree."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

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
