"""Service configuration: one dataclass per service, each field a flag and an environment variable.

A field `max_batch` of a config with prefix `CLIPSEARCH_ENCODER_` becomes the flag
`--max-batch` and the variable `CLIPSEARCH_ENCODER_MAX_BATCH`; a flag beats the variable,
the variable beats the default. The help text of each flag names both.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, TypeVar

T = TypeVar("T")


def option(help: str, **kwargs: Any) -> Any:
    """Metadata for a config field: its help text (and the default, via kwargs)."""
    return dataclasses.field(metadata={"help": help}, **kwargs)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def env_name(prefix: str, field_name: str) -> str:
    return prefix + field_name.upper()


def add_options(parser: argparse.ArgumentParser, config_cls: type, prefix: str) -> None:
    """Adds one flag per field of `config_cls`, defaulting to its environment variable."""
    for f in dataclasses.fields(config_cls):
        env = env_name(prefix, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        kind = type(default)
        raw = os.environ.get(env)
        if raw is not None:
            try:
                default = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError as exc:
                parser.error(f"{env}={raw!r}: {exc}")
        help_text = f"{f.metadata.get('help', '')} (env {env}; default {f.default!r})"
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text)


def from_namespace(config_cls: type[T], namespace: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    return config_cls(**{k: v for k, v in vars(namespace).items() if k in names})
