"""Summaries parked on disk while a streaming merge goes on, so that memory does not grow with T.

A method that must keep something of every task until ``combine`` (ESM's per-task essential subspaces)
parks each task's piece — a dataclass holding tensors — in a temporary directory and holds only a
:class:`Parked` reference; ``combine`` loads the T pieces of one parameter at a time. The ESM++ build parks
each task's routed-layer statistics from the merge until its experts' pass, and that pass parks each task's
experts the same way until its last fine-tuned model is gone. The directory and
everything in it are removed when the :class:`SpillDirectory` closes, also when the merge fails.
Loading gives back the same tensors bit for bit (safetensors, no conversion).

The directory is a :class:`~esmpp.scratch.ScratchDirectory`: one that a SIGKILLed build leaves is removed by a
later build.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from safetensors.torch import load_file, save_file
from torch import Tensor

from esmpp.atomic import storage_errors, write_failure_advice
from esmpp.scratch import ScratchDirectory

Item = TypeVar("Item")

SPILL_PREFIX = "esmpp-spill-"


@dataclass(frozen=True)
class Parked(Generic[Item]):
    """A dataclass instance of type ``kind`` whose tensor fields wait in the safetensors file ``path``;
    its other fields are kept here (``scalars``)."""

    kind: type[Item]
    path: Path
    scalars: dict[str, Any]

    def load(self) -> Item:
        """The instance as it was parked."""
        return self.kind(**load_file(self.path), **self.scalars)


class SpillDirectory(ScratchDirectory):
    """A temporary directory (under ``parent``, default the system's temporary directory, ``TMPDIR``)
    holding parked items, one file each; a context manager that removes it on exit."""

    def __init__(self, parent: Path | None = None) -> None:
        super().__init__(SPILL_PREFIX, parent)
        self._names = itertools.count()
        self.bytes_parked = 0

    def park(self, item: Item) -> Parked[Item]:
        """Write the tensor fields of the dataclass instance ``item`` to a new file; keep its other fields.

        Raises :class:`StorageError` when the file cannot be written (a full disk, most likely: a ViT-L/14
        build parks about 600 MB per task), saying how much is parked and where to put the spill instead.
        """
        values = {field.name: getattr(item, field.name) for field in dataclasses.fields(item)}  # type: ignore[arg-type]
        tensors = {name: value.contiguous() for name, value in values.items() if isinstance(value, Tensor)}
        path = self.path / f"{next(self._names)}.safetensors"
        with storage_errors(self._describe_failure):
            save_file(tensors, path)
        self.bytes_parked += path.stat().st_size
        scalars = {name: value for name, value in values.items() if name not in tensors}
        return Parked(type(item), path, scalars)

    def _describe_failure(self, exc: Exception) -> str:
        advice = write_failure_advice(
            exc, self.path, "point TMPDIR at a disk with more room, e.g. `TMPDIR=/data/tmp esmpp build ...`"
        )
        return (
            f"could not park a summary in {self.path} ({exc}); {self.bytes_parked / 2**20:.1f} MiB were parked "
            "there so far. The build keeps each task's subspaces, activation statistics and experts on disk until "
            f"it needs them and removes them at the end: {advice}."
        )


def unpark(item: Item | Parked[Item]) -> Item:
    """``item`` loaded when it is parked, else ``item`` itself."""
    return item.load() if isinstance(item, Parked) else item
