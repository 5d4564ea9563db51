"""Summaries parked on disk while a streaming merge goes on, so that memory does not grow with T.

A method that must keep something of every task until ``combine`` (ESM's per-task essential subspaces)
parks each task's piece — a dataclass holding tensors — in a temporary directory and holds only a
:class:`Parked` reference; ``combine`` loads the T pieces of one parameter at a time. The ESM++ build parks
each task's routed-layer statistics from the merge until its experts' pass, and that pass parks each task's
experts the same way until its last fine-tuned model is gone. The directory and
everything in it are removed when the :class:`SpillDirectory` closes, also when the merge fails.
Loading gives back the same tensors bit for bit (safetensors, no conversion).

A build that is SIGKILLed (the kernel's out-of-memory killer, a scheduler's hard limit) cannot clean up, and its
spill may be gigabytes. So each directory holds a lock for as long as its build lives (``flock``, which the
kernel drops when the process dies, however it dies), and every new :class:`SpillDirectory` first removes the
spills beside it whose lock nobody holds (:func:`remove_abandoned_spills`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from safetensors.torch import load_file, save_file
from torch import Tensor

from esmpp.atomic import storage_errors, write_failure_advice

Item = TypeVar("Item")

SPILL_PREFIX = "esmpp-spill-"
OWNER_LOCK = ".owner"  # held (flock) by the live build; the kernel releases it when the build dies
# A build creates its spill, then the lock file, then takes the lock: a younger spill may be between those
# steps, its lock free or missing though its build is alive, so it is never taken for abandoned.
CREATION_GRACE_SECONDS = 60.0


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


class SpillDirectory:
    """A temporary directory (under ``parent``, default the system's temporary directory, ``TMPDIR``)
    holding parked items, one file each; a context manager that removes it on exit."""

    def __init__(self, parent: Path | None = None) -> None:
        remove_abandoned_spills(Path(parent or tempfile.gettempdir()))
        self.path = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=parent))
        try:
            self._owner = os.open(self.path / OWNER_LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
        except BaseException:
            self.path.rmdir()
            raise
        fcntl.flock(self._owner, fcntl.LOCK_EX)
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

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._owner)  # after the removal: until then a sweeping build must not take the directory

    def __enter__(self) -> SpillDirectory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_abandoned(spill: Path) -> bool:
    """Whether the build of the spill directory ``spill`` is dead: nobody holds its lock, or it has no lock
    file, and it is old enough not to be one that a build is creating this instant."""
    if time.time() - spill.stat().st_mtime < CREATION_GRACE_SECONDS:
        return False
    try:
        owner = os.open(spill / OWNER_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(owner)  # closing also drops the lock this check may have taken
    return True


def remove_abandoned_spills(parent: Path) -> list[Path]:
    """Remove the spill directories in ``parent`` left by builds that died without cleaning up (SIGKILL);
    those of live builds stay. Returns the ones removed. Spills this user may not read or remove are left."""
    removed = []
    for spill in sorted(parent.glob(f"{SPILL_PREFIX}*")):
        try:
            if spill.is_dir() and _is_abandoned(spill):
                shutil.rmtree(spill)
                removed.append(spill)
        except OSError:
            continue  # another user's spill, or one a concurrent sweep removed first
    return removed


def unpark(item: Item | Parked[Item]) -> Item:
    """``item`` loaded when it is parked, else ``item`` itself."""
    return item.load() if isinstance(item, Parked) else item
