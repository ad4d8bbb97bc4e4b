"""Service configuration: one dataclass per service, each field a flag and an environment variable.

A field `max_batch` of a config with prefix `CLIPSEARCH_ENCODER_` becomes the flag
`--max-batch` and the variable `CLIPSEARCH_ENCODER_MAX_BATCH`; a flag beats the variable,
the variable beats the default. The help text of each flag names both.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
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
    """The environment variable of a field: `CLIPSEARCH_ENCODER_` + `max_batch` ->
    `CLIPSEARCH_ENCODER_MAX_BATCH`."""
    return prefix + field_name.upper()


def flag_name(field_name: str) -> str:
    """The flag of a field: `max_batch` -> `--max-batch`."""
    return "--" + field_name.replace("_", "-")


def field_default(f: dataclasses.Field[Any]) -> Any:
    """The documented default of a config field."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc,operator]


def add_options(parser: argparse.ArgumentParser, config_cls: type, prefix: str,
                only: Mapping[str, str] | None = None) -> None:
    """Adds one flag per field of `config_cls`, defaulting to its environment variable.

    `only` picks some fields and names where each goes, `{field: dest}`: the flag is then
    `--dest` (with dashes) and the value `namespace.dest`, while the environment variable
    stays the field's own (`clipsearch up` takes `--encoder-port`, read from
    CLIPSEARCH_ENCODER_PORT, for the encoder's `port`)."""
    for f in dataclasses.fields(config_cls):
        if only is not None and f.name not in only:
            continue
        dest = only[f.name] if only is not None else f.name
        env = env_name(prefix, f.name)
        default = field_default(f)
        kind = type(default)
        raw = os.environ.get(env)
        if raw is not None:
            try:
                default = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError as exc:
                parser.error(f"{env}={raw!r}: {exc}")
        help_text = f"{f.metadata.get('help', '')} (env {env}; default {field_default(f)!r})"
        flag = flag_name(dest)
        if kind is bool:
            parser.add_argument(flag, dest=dest, default=default,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=dest, type=kind, default=default, help=help_text)


def from_namespace(config_cls: type[T], namespace: argparse.Namespace) -> T:
    """The config whose fields are the namespace's values of the same names."""
    names = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    return config_cls(**{k: v for k, v in vars(namespace).items() if k in names})


def to_arguments(config_cls: type, values: Mapping[str, Any]) -> list[str]:
    """Command-line flags that set these fields of `config_cls` (checked to exist), the
    inverse of `add_options`: `{"max_batch": 8, "download": False}` ->
    `["--max-batch", "8", "--no-download"]`."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    arguments: list[str] = []
    for name, value in values.items():
        if name not in fields:
            raise KeyError(f"{config_cls.__name__} has no setting {name!r}")
        if isinstance(value, bool):
            arguments.append(flag_name(name) if value else "--no-" + name.replace("_", "-"))
        else:
            arguments += [flag_name(name), str(value)]
    return arguments
