"""Checks every config constructor runs before its dataclass ``__init__``: keyword names and sequence fields.

``BottleneckConfig(reduction=16)`` would raise a bare ``TypeError`` from the generated ``__init__``, and
``LoRAConfig(sites=5)`` "'int' object is not iterable" from ``__post_init__``. Checked here, for every config class
alike, they raise :class:`~fxadapt.ConfigFieldError` / :class:`~fxadapt.ConfigError` naming the field, the value
and the nearest valid choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError, ConfigFieldError, nearest

__all__ = ["check_config_call"]


def _is_sequence_field(field: dataclasses.Field) -> bool:
    annotation = field.type if isinstance(field.type, str) else repr(field.type)
    return "tuple" in annotation and "Mapping" not in annotation


def _example(cls: type, field: dataclasses.Field) -> str:
    default = field.default if field.default is not dataclasses.MISSING else None
    if not (isinstance(default, tuple) and default):
        default = getattr(cls, f"default_{field.name}", None)  # LoRAConfig.default_sites
    return f" like {tuple(default)!r}" if isinstance(default, tuple) and default else ""


def _wrapped(field: dataclasses.Field, value: Any) -> str:
    """``(value,)`` as a suggestion when ``value`` has the type of the sequence's items."""
    annotation = field.type if isinstance(field.type, str) else repr(field.type)
    item = {"tuple[int": int, "tuple[str": str, "tuple[float": (int, float)}
    for prefix, types in item.items():
        if prefix in annotation and isinstance(value, types) and not isinstance(value, bool):
            return f"; did you mean ({value!r},)?"
    return ""


def check_config_call(cls: type, args: tuple, kwargs: dict[str, Any]) -> None:
    """Raise a typed error for positional arguments, unknown keywords and scalars given to sequence fields."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if args:
        raise ConfigFieldError(
            f"{cls.__name__} takes keyword arguments only, got {len(args)} positional ({args[0]!r}, ...); "
            f"name them, e.g. {cls.__name__}({next(iter(fields), 'field')}=...)"
        )
    for key, value in kwargs.items():
        if key not in fields:
            raise ConfigFieldError(
                f"{cls.__name__} has no field {key!r} (got {key}={value!r}); its fields are {sorted(fields)}"
                f"{nearest(key, fields)}"
            )
        field = fields[key]
        if (
            _is_sequence_field(field)
            and value is not None
            and not isinstance(value, str)
            and (not isinstance(value, Iterable) or isinstance(value, Mapping))
        ):
            raise ConfigError(
                f"{cls.__name__}.{key}={value!r} is invalid; expected a list or tuple{_example(cls, field)}"
                f"{_wrapped(field, value)}"
            )
