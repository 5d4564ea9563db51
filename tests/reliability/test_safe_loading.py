"""Loading never runs code from a file: planted pickles whose unpickling would create a marker file.

Without ``allow_pickle`` torch's weights-only unpickler refuses them and the error explains the risk and the
flag. With ``allow_pickle`` (trusted files only) classes from foreign modules become inert stand-ins, and
the direct routes to code — builtins such as ``exec``/``open``, names that reach ``os`` through a module
``torch`` or ``numpy`` imported — are refused.
"""

from __future__ import annotations

import os
import pickle
import types
from pathlib import Path

import pytest
import torch

from esmpp.checkpoints import load_encoder
from esmpp.errors import CheckpointError
from tests.reliability.cases import attempt


class _Global:
    """Pickles as the global ``module:name`` as written, even a dotted path (protocol 4)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __call__(self, *args):  # pickle checks that a reduce function is callable; it is never called here
        raise AssertionError(f"{self.target} is only pickled")


class _Call:
    """Unpickles as ``function(*args)``."""

    def __init__(self, function, args: tuple) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


class _CraftingPickler(pickle._Pickler):  # the pure-Python pickler, whose ``save`` can be extended
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            module, _, name = obj.target.partition(":")
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
            return None
        return super().save(obj, save_persistent_id)


class SideEffect:
    """A class from a module the loader does not trust: its ``__setstate__`` would create ``self.path``."""

    def __setstate__(self, state: dict) -> None:
        Path(state["path"]).touch()


def _side_effect(marker: Path) -> SideEffect:
    instance = SideEffect.__new__(SideEffect)
    instance.__dict__["path"] = str(marker)
    return instance


PAYLOADS = {
    "os.system": lambda marker: _Call(os.system, (f"touch {marker}",)),
    "builtins.open": lambda marker: _Call(open, (str(marker), "w")),
    "builtins.exec": lambda marker: _Call(_Global("builtins:exec"), (f"open({str(marker)!r}, 'w')",)),
    "torch + os.system": lambda marker: _Call(_Global("torch:os.system"), (f"touch {marker}",)),
    "numpy + os.system": lambda marker: _Call(_Global("numpy:os.system"), (f"touch {marker}",)),
    "foreign __setstate__": _side_effect,
}


def _plant(tmp_path: Path, payload: str) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    content = {"conv1.weight": torch.zeros(2, 3, 8, 8), "payload": PAYLOADS[payload](marker)}
    crafting = types.SimpleNamespace(__name__="crafting", Pickler=_CraftingPickler)
    torch.save(content, path, pickle_module=crafting, pickle_protocol=4)
    return path, marker


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_pickles_are_not_run_by_default_and_the_error_explains(tmp_path, payload):
    path, marker = _plant(tmp_path, payload)
    error = attempt("load_encoder(pickle)", load_encoder, path)
    assert not marker.exists()
    assert isinstance(error, CheckpointError)
    message = str(error)
    assert str(path) in message and "arbitrary code" in message
    assert "`allow_pickle: true`" in message and "allow_pickle=True" in message


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_with_allow_pickle_foreign_classes_and_code_routes_stay_inert(tmp_path, payload):
    path, marker = _plant(tmp_path, payload)
    error = attempt("load_encoder(pickle)", load_encoder, path, allow_pickle=True)
    assert not marker.exists()
    assert isinstance(error, CheckpointError)  # loaded inertly, then no complete visual tower
    assert str(path) in str(error)
