"""Temporary directories that a killed process does not leave behind for long.

A temporary directory is removed on exit, on errors and, with :func:`esmpp.atomic.exit_on_terminate`, on
SIGTERM; a process that is SIGKILLed (the kernel's out-of-memory killer, a scheduler's hard limit) leaves it, and
esmpp's are large: a ViT-L/14 build spills about 600 MB per task, a bench's ONNX exports take gigabytes. So a
:class:`ScratchDirectory` holds a lock for as long as its process lives (``flock``, which the kernel drops when
the process dies, however it dies), and every new one first removes the directories of its kind (same prefix,
same parent) whose lock nobody holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Self

OWNER_LOCK = ".owner"  # the file inside each directory that its live process holds locked
# A process creates its directory, then the lock file, then takes the lock: a younger directory may be between
# those steps, its lock free or missing though its process is alive, so it is never taken for abandoned.
CREATION_GRACE_SECONDS = 60.0


class ScratchDirectory:
    """A new temporary directory ``path`` named ``prefix…`` under ``parent`` (default the system's temporary
    directory, ``TMPDIR``), removed by :meth:`close` (a context manager: on exit); creating one first removes the
    abandoned directories of the same prefix there (:func:`remove_abandoned`)."""

    def __init__(self, prefix: str, parent: Path | None = None) -> None:
        remove_abandoned(prefix, parent)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            self._owner: int | None = os.open(self.path / OWNER_LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
        except BaseException:
            self.path.rmdir()
            raise
        # A filesystem without locks (Lustre mounted without them, some FUSE ones) refuses flock here; a sweep
        # there is refused the same way and keeps every directory, as before there were locks.
        with contextlib.suppress(OSError):
            fcntl.flock(self._owner, fcntl.LOCK_EX)

    def close(self) -> None:
        """Remove the directory and everything in it; again, nothing."""
        if self._owner is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._owner)  # after the removal: until then no other process may take the directory
        self._owner = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_abandoned(directory: Path) -> bool:
    """Whether the process of ``directory`` is dead: nobody holds its lock, or it has no lock file, and it is
    old enough not to be one that a process is creating this instant."""
    if time.time() - directory.stat().st_mtime < CREATION_GRACE_SECONDS:
        return False
    try:
        owner = os.open(directory / OWNER_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(owner)  # closing also drops the lock this check may have taken
    return True


def remove_abandoned(prefix: str, parent: Path | None = None) -> list[Path]:
    """Remove the directories ``prefix…`` under ``parent`` (default as :class:`ScratchDirectory`) whose
    processes died without removing them; those of live processes stay, and so do those this user may not read
    or remove. Returns the ones removed."""
    parent = Path(tempfile.gettempdir() if parent is None else parent)
    removed = []
    for directory in sorted(parent.glob(f"{prefix}*")):
        try:
            if directory.is_dir() and _is_abandoned(directory):
                shutil.rmtree(directory)
                removed.append(directory)
        except OSError:
            continue  # another user's, one that a concurrent process removed first, or one on a lockless filesystem
    return removed
