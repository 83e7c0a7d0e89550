"""Frozen settings dataclasses from and to flat kebab-case mappings (TOML tables, run configs).

One parser for every settings class: an experiment TOML table, Flower's run config and a
message's ConfigRecord are all flat mappings of kebab-case keys (``num-rounds`` ↔
``num_rounds``). :func:`from_mapping` checks each value against the field's annotation (bool,
int, float, str, a ``StrEnum``, a ``Literal`` of strings, ``X | None``), converts where the
conversion is exact (an integral float to ``int``, an ``int`` to ``float``), and lists every
problem at once; the dataclass's own ``__post_init__`` then checks ranges.
"""

import dataclasses
import enum
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from fedcrm.exceptions import ConfigError

T = TypeVar("T")

Value = bool | int | float | str
"""A flat setting value (what TOML, Flower's run config and a ConfigRecord carry)."""


def kebab(name: str) -> str:
    """``num_rounds`` → ``num-rounds``."""
    return name.replace("_", "-")


def keys(cls: type[Any]) -> frozenset[str]:
    """The kebab-case keys of a settings dataclass."""
    return frozenset(kebab(f.name) for f in dataclasses.fields(cls))


def _convert(raw: object, kind: Any, key: str) -> object:
    """``raw`` as a value of annotation ``kind``; raises ``ValueError`` with the reason."""
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        if not isinstance(raw, Mapping):
            raise ValueError(f"must be a table, got {raw!r}")
        return from_mapping(kind, raw, where=f"[{key}]")
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw is None or raw == "":
            return None
        return _convert(raw, options[0], key)
    if origin is typing.Literal:
        allowed = typing.get_args(kind)
        if raw not in allowed:
            raise ValueError(f"must be one of {list(allowed)}, got {raw!r}")
        return raw
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"must be one of {[m.value for m in kind]}, got {raw!r}") from None
    if kind is bool:
        if not isinstance(raw, bool):
            raise ValueError(f"must be true or false, got {raw!r}")
        return raw
    if kind is int:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"must be a whole number, got {raw!r}")
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError(f"must be a whole number, got {raw!r}")
        return int(raw)
    if kind is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"must be a number, got {raw!r}")
        return float(raw)
    if kind is str:
        if not isinstance(raw, str):
            raise ValueError(f"must be a string, got {raw!r}")
        return raw
    if origin is tuple:
        if not isinstance(raw, list | tuple):
            raise ValueError(f"must be a list, got {raw!r}")
        (item,) = typing.get_args(kind)[:1]
        return tuple(_convert(v, item, key) for v in raw)
    raise TypeError(f"unsupported settings annotation {kind!r}")


def from_mapping(
    cls: type[T],
    values: Mapping[str, object],
    *,
    where: str,
    ignore_unknown: bool = False,
    defaults: Mapping[str, object] | None = None,
) -> T:
    """Build the settings dataclass ``cls`` from kebab-case ``values``.

    Args:
        cls: A (frozen) dataclass whose fields are flat settings.
        values: Kebab-case keys (a TOML table, a run config, a ConfigRecord).
        where: Named in every message (``[federation]``, ``run config``, ``server message``).
        ignore_unknown: Skip keys ``cls`` does not declare (a run config or a message holds
            settings of several classes) instead of refusing them.
        defaults: Values used where ``values`` has no key (kebab-case).

    Raises:
        ConfigError: Unknown keys, wrong types or values out of range, all listed at once.
    """
    hints = typing.get_type_hints(cls)
    names = {kebab(f.name): f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    problems: list[str] = []
    if not ignore_unknown:
        unknown = sorted(set(values) - set(names))
        if unknown:
            problems.append(f"unknown key(s) {unknown}; allowed: {sorted(names)}")
    merged = {**(defaults or {}), **values}
    kwargs: dict[str, object] = {}
    for key, field in names.items():
        if key not in merged:
            continue
        try:
            kwargs[field.name] = _convert(merged[key], hints[field.name], key)
        except ValueError as exc:
            problems.append(f"{key} {exc}")
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def to_mapping(obj: object, *, skip_none: bool = True) -> dict[str, Any]:
    """The kebab-case mapping `from_mapping` reads back (enums as values, tables as dicts)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, field.name)
        if value is None and skip_none:
            continue
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = to_mapping(value, skip_none=skip_none)
        out[kebab(field.name)] = value
    return out


def check_positive(obj: object, names: Iterable[str], *, minimum: float = 1) -> None:
    """Raise one `ConfigError` naming every field of ``names`` below ``minimum``.

    Raises:
        ConfigError: At least one field is below ``minimum``.
    """
    bad = [
        f"{kebab(n)} must be >= {minimum:g}, got {getattr(obj, n)}"
        for n in names
        if not getattr(obj, n) >= minimum
    ]
    if bad:
        raise ConfigError("; ".join(bad))
