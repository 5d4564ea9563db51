"""Temporary directories that a killed process does not leave behind for long.

A temporary directory is removed on exit, on errors and, with :func:`esmpp.atomic.exit_on_terminate`, on
SIGTERM; a process that is SIGKILLed (the kernel's out-of-memory killer, a scheduler's hard limit) leaves it, and
esmpp's are large: a ViT-L/14 build spills about 600 MB per task, a bench's ONNX exports take gigabytes, a
half-written artifact as much as the artifact. So each :class:`ScratchDirectory` ``P`` has a lock file
``P.lock`` beside it that its process holds locked (``flock``, which the kernel drops when the process dies,
however it dies), and every new one first removes the directories of its kind (same prefix, same parent) whose
lock nobody holds, and only those: a concurrent process's directory is never touched.

The lock file is made and locked before its directory and removed after it, so a live directory always has
one: a directory without it is an earlier esmpp's, from before these locks, or one whose removal failed
half-way. The lock file sits beside the directory, not in it, so that a directory renamed into place (an
artifact, see :mod:`esmpp.atomic`) takes nothing of the lock with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Self

LOCK_SUFFIX = ".lock"


class ScratchDirectory:
    """A new temporary directory ``path`` named ``prefix…`` under ``parent`` (default the system's temporary
    directory, ``TMPDIR``), made 0700 and removed by :meth:`close` (a context manager: on exit) unless it was
    moved away meanwhile; creating one first removes the abandoned directories of the same prefix there
    (:func:`remove_abandoned`)."""

    def __init__(self, prefix: str, parent: Path | None = None) -> None:
        parent = _resolve_parent(parent)
        remove_abandoned(prefix, parent)
        self._lock: int | None
        self._lock, self._lock_path = _held_lock_file(prefix, parent)
        self.path = _directory_of(self._lock_path)
        try:
            self.path.mkdir(mode=0o700)
        except BaseException:
            self._release_lock()
            raise

    def close(self) -> None:
        """Remove the directory and everything in it (nothing if it was moved away), then its lock file; again,
        nothing."""
        if self._lock is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self._release_lock()

    def _release_lock(self) -> None:
        # The lock file goes after the directory, and is unlocked only once removed: until then no other process
        # may take the directory, nor make another of the same name.
        with contextlib.suppress(FileNotFoundError):
            self._lock_path.unlink()
        os.close(self._lock)
        self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _resolve_parent(parent: Path | None) -> Path:
    return Path(tempfile.gettempdir() if parent is None else parent)


def _directory_of(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name.removesuffix(LOCK_SUFFIX))


def _lock_file_of(directory: Path) -> Path:
    return directory.with_name(directory.name + LOCK_SUFFIX)


def is_the_file_at(descriptor: int, path: Path) -> bool:
    """Whether the open file ``descriptor`` is still the file at ``path`` (not removed, nor replaced)."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _held_lock_file(prefix: str, parent: Path) -> tuple[int, Path]:
    """A new lock file ``prefix…LOCK_SUFFIX`` in ``parent``, open and locked by this process."""
    while True:
        descriptor, name = tempfile.mkstemp(prefix=prefix, suffix=LOCK_SUFFIX, dir=parent)
        lock_path = Path(name)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:
            # A filesystem without locks (Lustre mounted without them, some FUSE ones): the directory works
            # unlocked, and sweeps there, refused the same way, keep every directory that has a lock file.
            return descriptor, lock_path
        except BaseException:
            os.close(descriptor)
            lock_path.unlink(missing_ok=True)
            raise
        if is_the_file_at(descriptor, lock_path):
            return descriptor, lock_path
        # A sweep found it unlocked in the instant before flock, and removed it (it had no directory yet).
        os.close(descriptor)


def _remove_if_unlocked(lock_path: Path) -> bool:
    """Remove the directory of ``lock_path`` and then the lock file, if nobody holds its lock; returns whether
    a directory was removed (a process killed between its two steps leaves a lock file alone)."""
    descriptor = os.open(lock_path, os.O_RDWR)  # writable: NFS, which emulates flock, locks only those
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its process is alive
        if not is_the_file_at(descriptor, lock_path):
            return False  # another sweep removed it while this one waited for the lock
        directory = _directory_of(lock_path)
        existed = directory.is_dir()
        if existed:
            shutil.rmtree(directory)
        lock_path.unlink()
        return existed
    finally:
        os.close(descriptor)  # closing also drops the lock this check took


def remove_abandoned(prefix: str, parent: Path | None = None) -> list[Path]:
    """Remove the directories ``prefix…`` under ``parent`` (default as :class:`ScratchDirectory`) whose
    processes died without removing them, with their lock files; those of live processes stay, and so do those
    this user may not read or remove. Returns the directories removed."""
    removed = []
    for entry in sorted(_resolve_parent(parent).glob(f"{prefix}*")):
        try:
            if entry.name.endswith(LOCK_SUFFIX):
                if _remove_if_unlocked(entry):
                    removed.append(_directory_of(entry))
            elif entry.is_dir() and not _lock_file_of(entry).exists():
                shutil.rmtree(entry)  # no lock file: no live process's (see the module's docstring)
                removed.append(entry)
        except OSError:
            continue  # another user's, one that a concurrent sweep removed first, or one on a lockless filesystem
    return removed
