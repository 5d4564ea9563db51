"""Merge methods by name."""

from __future__ import annotations

from typing import TypeVar

from esmpp.errors import ConfigError
from esmpp.merging.base import MergeMethod

_METHODS: dict[str, type[MergeMethod]] = {}
MethodT = TypeVar("MethodT", bound=type[MergeMethod])


def register_method(cls: MethodT) -> MethodT:
    """Class decorator: make ``cls`` available as ``get_method(cls.name)``."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"Merge method name {cls.name!r} is registered twice.")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[MergeMethod]:
    """The merge method class registered as ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"Unknown merge method {name!r}. Choose one of: {', '.join(available_methods())}.") from None


def available_methods() -> list[str]:
    """Names of all registered merge methods, sorted."""
    return sorted(_METHODS)
