"""Reading whole pickled models (the task_vectors / TALL-masks ``ImageEncoder`` checkpoints).

Those files ``torch.save`` an ``nn.Module`` whose classes live in the authors' code (``src.modeling``,
``src.models.modeling``, ...) and in the open_clip of the day (``open_clip.model.VisualTransformer``, ...).
Neither is importable here, and importing an arbitrary ``src`` package would run foreign code. Classes from
outside a few well-known libraries are therefore replaced by :class:`StandIn` subclasses that keep the
pickled attributes — parameters, buffers and submodules — which is all a state dict needs. open_clip
names resolve to today's open_clip classes where they still exist, and to stand-ins otherwise.

Unpickling can still run code through the well-known libraries (that is how pickle works), so callers
must only use this for files they trust.
"""

from __future__ import annotations

import _compat_pickle
import functools
import importlib
import pickle
import types
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

# Packages whose classes are resolved normally: the ones a pickled model legitimately references.
_IMPORTABLE_ROOTS = frozenset(
    {"torch", "torchvision", "numpy", "collections", "builtins", "copyreg", "_codecs", "functools", "enum"}
)
_ROOTS_TEXT = ", ".join(sorted(_IMPORTABLE_ROOTS))
# Of the builtins, only data types: ``eval``, ``exec``, ``open``, ``getattr``, ``__import__`` are how a
# malicious pickle would run code.
_BUILTINS = frozenset(
    {"set", "frozenset", "dict", "list", "tuple", "slice", "range", "complex", "bytes", "bytearray", "object"}
    | {"int", "float", "bool", "str"}
)
# Where today's open_clip keeps the classes older releases had in ``open_clip.model``.
_OPEN_CLIP_HOMES = ("open_clip.transformer", "open_clip.model", "open_clip.transform")


class StandIn(nn.Module):
    """Takes the place of a class that cannot be imported; keeps whatever state was pickled.

    ``legacy_name`` is the original ``module.Class``; the stand-in class itself carries the original
    class name, so e.g. an activation pickled as ``QuickGELU`` can still be recognised.
    """

    legacy_name: ClassVar[str] = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # accepts whatever the pickle passes
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # (instance dict, slot dict) for classes with __slots__
            state = {key: value for part in state if part for key, value in part.items()}
        if not isinstance(state, dict):
            state = {"pickled_state": state}
        super().__setstate__(state)


@functools.cache
def stand_in(module: str, name: str) -> type[StandIn]:
    """The stand-in class for ``module.name`` (one class per name, so identity checks keep working)."""
    return type(name, (StandIn,), {"legacy_name": f"{module}.{name}", "__module__": __name__})


def _open_clip_class(module: str, name: str) -> Any:
    for home in (module, *_OPEN_CLIP_HOMES):
        try:
            found = getattr(importlib.import_module(home), name, None)
        except ImportError:
            continue
        if found is not None:
            return found
    return stand_in(module, name)


class LegacyUnpickler(pickle.Unpickler):
    """An unpickler that maps unimportable and foreign classes onto stand-ins (see module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles name Python 2 modules (__builtin__, copy_reg); pickle maps them itself.
        root = _compat_pickle.IMPORT_MAPPING.get(module, module).split(".")[0]
        if root == "open_clip":
            return _open_clip_class(module, name)
        if root in _IMPORTABLE_ROOTS:
            return _allowed(module, name, super().find_class(module, name))
        return stand_in(module, name)


def _allowed(module: str, name: str, found: Any) -> Any:
    """``found`` (``module.name``) unless the name only reaches it through another module — ``torch`` imports
    ``os``, so ``torch`` + ``os.system`` names ``os.system`` — or it is a builtin that is not a data type."""
    owner = importlib.import_module(_compat_pickle.IMPORT_MAPPING.get(module, module))
    for part in name.split(".")[:-1]:
        owner = getattr(owner, part)
        if isinstance(owner, types.ModuleType):
            raise pickle.UnpicklingError(f"refusing {module}.{name}: it reaches into module {owner.__name__}")
    home = getattr(found, "__module__", None) or module
    if isinstance(found, types.ModuleType) or home.split(".")[0] not in _IMPORTABLE_ROOTS:
        raise pickle.UnpicklingError(f"refusing {module}.{name}: it is defined in {home}, outside {_ROOTS_TEXT}")
    if home == "builtins" and name not in _BUILTINS:
        raise pickle.UnpicklingError(f"refusing builtins.{name}: only data types are unpickled from builtins")
    return found


def _load(file: Any, **kwargs: Any) -> Any:
    return LegacyUnpickler(file, **kwargs).load()


# ``torch.load`` wants a module-like object with ``Unpickler`` and ``load``.
legacy_pickle_module = types.SimpleNamespace(__name__=__name__, Unpickler=LegacyUnpickler, load=_load)


def load_pickled(path: Path) -> Any:
    """Unpickle a whole ``torch.save``-d object on the CPU, classes mapped as described above."""
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=legacy_pickle_module)


def module_hints(visual: nn.Module) -> dict[str, Any]:
    """What a pickled visual tower tells beyond tensor shapes: ``head_width`` (from the first block's
    attention ``num_heads``) and ``quick_gelu`` (whether the MLP activation is a ``QuickGELU``)."""
    hints: dict[str, Any] = {}
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if not blocks:
        return hints
    block = blocks[0]
    heads = getattr(getattr(block, "attn", None), "num_heads", None)
    conv1 = getattr(visual, "conv1", None)
    width = conv1.weight.shape[0] if conv1 is not None else None
    if isinstance(heads, int) and width and width % heads == 0:
        hints["head_width"] = width // heads
    mlp = getattr(block, "mlp", None)
    activations = [type(m).__name__ for m in mlp.children()] if mlp is not None else []
    if "QuickGELU" in activations:
        hints["quick_gelu"] = True
    elif "GELU" in activations:
        hints["quick_gelu"] = False
    return hints
