"""Crash-safe directory writes: build everything in a hidden sibling, then rename it into place.

A reader (or a rerun after SIGKILL) sees either nothing, the previous complete directory, or the new
complete one — never a half-written one. Leftover hidden siblings of killed runs are ignored by readers
and cleaned up by the next write. :func:`exit_on_terminate` makes SIGTERM clean up like any error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError

from esmpp.errors import EsmppError, StorageError


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure to write a file (a full disk, a read-only or forbidden directory): an
    ``OSError``, or the error safetensors raises for an I/O failure while it serialises."""
    return isinstance(exc, OSError) or (isinstance(exc, SafetensorError) and "I/O error" in str(exc))


@contextlib.contextmanager
def storage_errors(describe: Callable[[Exception], str]) -> Iterator[None]:
    """Turn a failed write inside the block (:func:`is_write_failure`) into a :class:`StorageError` whose
    message is ``describe(exc)``; other errors pass through unchanged."""
    try:
        yield
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        raise StorageError(describe(exc)) from exc


def free_mib(path: Path) -> float:
    """MiB free on the file system holding ``path``."""
    return shutil.disk_usage(path).free / 2**20


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_directory(
    destination: Path, overwrite: bool = False, elsewhere: str = "choose another --out"
) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``destination``; on success move it into place.

    Raises ``EsmppError`` up front if ``destination`` exists and ``overwrite`` is false. On any error
    the temporary directory is removed and ``destination`` is left as it was; a failed write (a full disk,
    say) becomes a :class:`StorageError` that names ``destination``, the room left there and how to write
    ``elsewhere``.
    """
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise EsmppError(f"{destination} already exists. Pass --overwrite to replace it, or choose another --out.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    for stale in destination.parent.glob(f".{destination.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))

    def describe(exc: Exception) -> str:
        return (
            f"could not write {destination} ({exc}); {free_mib(destination.parent):.1f} MiB are free there. "
            f"Nothing was written: free some space, or {elsewhere}."
        )

    try:
        with storage_errors(describe):
            yield staging
            _fsync_tree(staging)
            if destination.exists():
                retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-old-", dir=destination.parent))
                os.replace(destination, retired / destination.name)
                os.replace(staging, destination)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def exit_on_terminate() -> None:
    """Make SIGTERM (``kill``, ``timeout``, job schedulers) end the process through SystemExit (code 143), so
    that open context managers clean up as on any error: no half-written artifact, no spilled summaries
    left in the temporary directory (several GB on a ViT-L/14 build). Ctrl-C already does so."""

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
