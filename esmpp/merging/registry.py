"""Merge methods by name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

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


def options_share(method: type[MergeMethod], given: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``given``, options set for a whole run (``--method-option``), that are options of
    ``method``: a run may compare methods of which only some have an option (ESM's ``rank_fraction``)."""
    return {key: value for key, value in given.items() if key in method.Options.model_fields}


def check_run_options(names: Sequence[str], given: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` before a run of the methods ``names`` when an entry of ``given`` is an
    option of none of them, or a value is invalid for a method that has it (not after its first build)."""
    methods = list({name: get_method(name) for name in names}.values())  # esm++ and esm share a backbone
    unknown = [key for key in given if not any(key in method.Options.model_fields for method in methods)]
    if unknown:
        known = "; ".join(f"{m.name}: {', '.join(m.Options.model_fields) or 'none'}" for m in methods)
        raise ConfigError(
            f"method option {', '.join(map(repr, unknown))} is an option of none of the methods of this run "
            f"({known}). See `esmpp methods`."
        )
    for method in methods:
        method.parse_options(options_share(method, given))
