"""Crash-safe directory writes: build everything in a hidden sibling, then rename it into place.

A reader (or a rerun after SIGKILL) sees either nothing, the previous complete directory, or the new
complete one — never a half-written one. Leftover hidden siblings of killed runs are ignored by readers
and cleaned up by the next write, while those of a concurrent write stay (:mod:`esmpp.scratch`).
:func:`exit_on_terminate` makes SIGTERM clean up like any error. :func:`claimed_destination` lets one
process at a time work towards a destination, so that a second one is refused before its long work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import shutil
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError

from esmpp.errors import EsmppError, StorageError
from esmpp.folders import folder_kind
from esmpp.scratch import ScratchDirectory, is_the_file_at


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure to write a file (a full disk, a read-only or forbidden directory): an
    ``OSError``, or the error safetensors raises for an I/O failure while it serialises."""
    return isinstance(exc, OSError) or (isinstance(exc, SafetensorError) and "I/O error" in str(exc))


def is_out_of_space(exc: BaseException) -> bool:
    """Whether the write failure ``exc`` is a full disk or quota (rather than, say, a forbidden folder)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return "No space left" in str(exc) or "quota" in str(exc).lower()


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


def write_failure_advice(exc: Exception, folder: Path, elsewhere: str) -> str:
    """What to do about the failed write ``exc`` in ``folder``: on a full disk or quota, how much is free
    there and to free some or write ``elsewhere``; otherwise (a forbidden or missing folder) ``elsewhere``."""
    if is_out_of_space(exc):
        return f"{free_mib(folder):.1f} MiB are free there; free some space, or {elsewhere}"
    return elsewhere


def nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest ancestor that does."""
    return next(folder for folder in (Path(path), *Path(path).absolute().parents) if folder.exists())


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its ancestors that do not exist, deepest first: what ``mkdir(parents=True)``
    would create."""
    folder = Path(folder).absolute()
    return list(itertools.takewhile(lambda path: not path.exists(), (folder, *folder.parents)))


@contextlib.contextmanager
def folders_made_undone(folder: Path) -> Iterator[None]:
    """After the block, remove ``folder`` and its ancestors that the block created, deepest first, up to the
    first that is not empty: a check that creates a folder to find out whether it can, or a write that failed,
    leaves no empty folder behind, while one holding what was written (anyone's files included) stays."""
    made = _missing_folders(folder)
    try:
        yield
    finally:
        for created in made:
            try:
                created.rmdir()
            except OSError:
                break


def free_mib(path: Path) -> float:
    """MiB free on the file system that holds ``path``, or would hold it: its nearest existing folder."""
    return shutil.disk_usage(nearest_existing(path)).free / 2**20


def check_writable_folder(folder: Path, elsewhere: str) -> None:
    """Raise :class:`StorageError` now, creating nothing, when ``folder`` could neither be created nor
    written: its nearest existing ancestor is a file, or a folder this process may not write to."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        problem = "is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not writable"
    else:
        return
    raise StorageError(f"cannot write under {folder}: {existing} {problem}. Nothing was written: {elsewhere}.")


def _plain_folder_mode(parent: Path) -> int:
    """The permission bits a plain ``mkdir`` gives a new folder in ``parent``: 0o777 less the umask (or what a
    default ACL allows). Measured on a probe folder because ``os.umask`` can only be read by setting it, process-wide:
    a file another thread created meanwhile would get the temporary umask."""
    probe = parent / "mode-probe"
    probe.mkdir(mode=0o777)
    try:
        return stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.rmdir()


def _give_plain_modes(root: Path) -> None:
    """Give every folder under ``root`` the mode of ``root`` and every file the mode a plain ``open`` would
    (that mode's read and write bits): safetensors writes its files 0600 whatever the umask, and a server
    running as another user must be able to read them."""
    folder_mode = stat.S_IMODE(root.stat().st_mode)
    for path in root.rglob("*"):
        path.chmod(folder_mode if path.is_dir() else folder_mode & 0o666)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


# Whether a folder that holds the marker file is really the writer's: a zoo and an artifact both write manifest.json.
Owner = Callable[[Path], bool]


def _check_replaceable(
    destination: Path, overwrite: bool, elsewhere: str, marker: str | None, owns: Owner | None
) -> bool:
    """Refuse to replace ``destination`` unless ``overwrite`` and it is a folder this writer made before (one
    holding the file ``marker``, and that ``owns`` accepts, if given): --overwrite on a mistyped path must not
    delete a user's folder or file, nor another kind of esmpp folder. A refusal says how to write ``elsewhere``.
    Returns whether ``destination`` exists, then a folder of the writer's to be replaced."""
    if not (destination.exists() or destination.is_symlink()):
        return False
    if _is_empty_folder(destination):
        # Not written into: the rename that publishes the output would replace the folder, losing its mode, group
        # and ACL (and the folder of a shell inside it), and it cannot replace a mount point nor the folder that
        # holds the staging folder (--out .), which would fail only after the long work.
        raise EsmppError(
            f"{destination} is an empty folder: esmpp writes its output as a new folder, in one step, and replaces "
            f"only a folder it wrote itself. Remove it (rmdir {os.path.abspath(destination)}), or {elsewhere}."
        )
    holds_marker = marker is not None and destination.is_dir() and (destination / marker).is_file()
    if not holds_marker or (owns is not None and not owns(destination)):
        raise EsmppError(
            f"{destination} is {_describe_unreplaceable(destination, marker)}, so it is not replaced whatever the "
            f"flags say: {elsewhere}, or remove it yourself."
        )
    # Last: --overwrite is suggested only for what it would replace.
    if not overwrite:
        raise EsmppError(f"{destination} already exists. Pass --overwrite to replace it, or {elsewhere}.")
    return True


def _is_empty_folder(path: Path) -> bool:
    """Whether ``path`` is a folder that holds nothing; not a link to one, which ``rmdir`` would not remove."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        return next(path.iterdir(), None) is None
    except OSError:  # unreadable: what it holds is unknown
        return False


def _describe_unreplaceable(destination: Path, marker: str | None) -> str:
    """What ``destination``, which this writer may not replace, is, in words: a user's file or folder, or
    another kind of esmpp folder (named, so that a zoo is not taken for an artifact)."""
    if not destination.is_dir():
        return "a file that esmpp did not write"
    kind = folder_kind(destination)
    if kind is not None:
        return f"{kind}, which this command does not write"
    if marker is not None and (destination / marker).is_file():
        return f"a folder whose {marker} esmpp did not write"
    return f"a folder that esmpp did not write (it has no {marker or 'marker file'})"


@contextlib.contextmanager
def _staging_directory(
    destination: Path, overwrite: bool, elsewhere: str, marker: str | None, owns: Owner | None
) -> Iterator[Path]:
    """An empty hidden sibling of ``destination`` for the duration of the block, removed after it with the
    parent folders made for it (unless ``destination`` is in them now, moved there by the block); failed
    writes in the block, its own creation included, become a :class:`StorageError` (see
    :func:`atomic_directory`)."""
    _check_replaceable(destination, overwrite, elsewhere, marker, owns)

    def describe(exc: Exception) -> str:
        advice = write_failure_advice(exc, destination, elsewhere)
        return f"could not write {destination} ({exc}). Nothing was written: {advice}."

    staging = None
    # The folder work is on the absolute path: `--out .` has no name and is its own parent's "." entry, which
    # would put the staging folder inside the destination. Messages keep the path as given.
    place = _absolute(destination)
    # A failed write, or a check (which writes nothing), leaves no folder behind; a written destination is
    # in them, so they stay.
    with folders_made_undone(place.parent):
        try:
            with storage_errors(describe):
                place.parent.mkdir(parents=True, exist_ok=True)
                # Removes the staging folders that killed writes left here, not those of another process
                # writing the same destination now.
                staging = ScratchDirectory(f".{place.name}.tmp-", place.parent)
                # Made 0700, a mode the rename would publish: readable by its owner alone.
                staging.path.chmod(_plain_folder_mode(staging.path))
                yield staging.path
        finally:
            if staging is not None:
                staging.close()


def check_destination(
    destination: Path,
    overwrite: bool = False,
    elsewhere: str = "choose another --out",
    marker: str | None = None,
    owns: Owner | None = None,
) -> None:
    """Fail now, before any long work, where :func:`atomic_directory` would fail at the end: ``destination``
    exists and may not be replaced, or its folder cannot be created or written. Leaves nothing behind: the
    missing parent folders are created to find out, and removed again (the write creates them anew), so that a
    command failing in its long work leaves no empty folder for its --out."""
    with _staging_directory(Path(destination), overwrite, elsewhere, marker, owns):
        pass


@contextlib.contextmanager
def atomic_directory(
    destination: Path,
    overwrite: bool = False,
    elsewhere: str = "choose another --out",
    marker: str | None = None,
    owns: Owner | None = None,
) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``destination``; on success move it into place, with the
    modes a plain ``mkdir`` and ``open`` would have given it and its files (the umask's).

    Raises ``EsmppError`` up front (and again before the move) if ``destination`` exists, unless ``overwrite``
    and it is a folder holding the file ``marker`` (what this writer writes, e.g. an artifact's manifest.json)
    and, with ``owns``, one that ``owns`` recognises as this writer's (another writer may write a file of the
    same name): anything else there, an empty folder included, is never replaced. On any error the temporary
    directory and the parent folders made for it are removed and ``destination`` is left as it was; a failed
    write (a full disk, a forbidden folder) becomes a :class:`StorageError` that names ``destination``, the room
    left there when the disk is full, and how to write ``elsewhere``.
    """
    destination = Path(destination)
    with _staging_directory(destination, overwrite, elsewhere, marker, owns) as staging:
        yield staging
        _give_plain_modes(staging)
        _fsync_tree(staging)
        # Again: during the long write, something may have been made at the destination, and it is no more
        # replaceable than it would have been at the start.
        place = _absolute(destination)
        if _check_replaceable(destination, overwrite, elsewhere, marker, owns):
            _replace(place, staging)
        else:
            os.replace(staging, place)


CLAIM_SUFFIX = ".writing"


@contextlib.contextmanager
def claimed_destination(
    destination: Path,
    elsewhere: str = "choose another --out",
    on_busy: Callable[[Path], None] | None = None,
) -> Iterator[None]:
    """Hold ``destination`` for this process for the duration of the block (a build, from the check of its
    --out to the write): another esmpp process that claims it meanwhile gets an :class:`EsmppError` at once
    that says so, instead of finding out after its own long work (when it would fail, or replace this one's
    result). Two writes without claims stay safe (:func:`atomic_directory`); the claim only refuses early.
    With ``on_busy`` a held destination is waited for instead: ``on_busy(claim file)`` is told (to say so),
    then the claim blocks until its holder is done, for a cache that the other process is filling.

    The claim is an ``flock`` on ``.NAME.writing`` beside the destination, which the kernel drops when the
    process dies however it dies, so a killed build's leftover file claims nothing and the next claim removes
    it. No claim is taken where the destination's folder does not exist yet (making it here would leave a
    folder behind a failed build), cannot be written (the destination's check says so), or has no locks.
    """
    lock_path = _absolute(Path(destination))
    lock_path = lock_path.with_name(f".{lock_path.name}{CLAIM_SUFFIX}")
    descriptor = _claim(
        lock_path,
        f"{destination} is being written by another esmpp process now (it holds "
        f"{lock_path}): wait for it to finish, or {elsewhere}",
        on_busy,
    )
    try:
        yield
    finally:
        if descriptor is not None:
            # Removed while still locked: a process that opened this file meanwhile sees, once it gets the
            # lock, that it is no longer the file at the path, and claims a new one.
            lock_path.unlink(missing_ok=True)
            os.close(descriptor)


def _claim(lock_path: Path, refusal: str, on_busy: Callable[[Path], None] | None) -> int | None:
    """The open, locked claim file at ``lock_path``, or None where no claim can be taken (see
    :func:`claimed_destination`); ``refusal`` is the error's message when another process holds it and
    ``on_busy`` is None, else ``on_busy`` is told and the lock waited for."""
    while True:
        try:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            _lock(descriptor, lock_path, refusal, on_busy)
        except OSError:
            # A filesystem without locks: nobody can hold a claim there, so the file is nobody's to keep.
            os.close(descriptor)
            lock_path.unlink(missing_ok=True)
            return None
        except BaseException:  # refused, or interrupted while it waited
            os.close(descriptor)
            raise
        if is_the_file_at(descriptor, lock_path):
            return descriptor
        os.close(descriptor)  # its holder removed it as this process opened it: claim the new one


def _lock(descriptor: int, lock_path: Path, refusal: str, on_busy: Callable[[Path], None] | None) -> None:
    """Lock the claim file open as ``descriptor``, or refuse, or wait (see :func:`_claim`)."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if on_busy is None:
            raise EsmppError(refusal) from None
        on_busy(lock_path)
        fcntl.flock(descriptor, fcntl.LOCK_EX)


def _absolute(path: Path) -> Path:
    """``path`` made absolute with its ``.`` and ``..`` resolved by name (links are not followed)."""
    return Path(os.path.abspath(path))


def _replace(place: Path, staging: Path) -> None:
    """Put the folder ``staging`` where the folder ``place`` is, in two renames through a retired folder beside
    it; if the second fails, the old folder goes back, so a failed replacement loses neither."""
    retired = ScratchDirectory(f".{place.name}.tmp-old-", place.parent)
    try:
        os.replace(place, retired.path / place.name)
    except BaseException:
        retired.close()
        raise
    try:
        os.replace(staging, place)
    except BaseException:
        # Not closed if this fails too, so that the old output is not deleted now; left in the retired folder,
        # it would be deleted as abandoned by the next write here.
        os.replace(retired.path / place.name, place)
        retired.close()
        raise
    retired.close()


def exit_on_terminate() -> None:
    """Make SIGTERM (``kill``, ``timeout``, job schedulers) end the process through SystemExit (code 143), so
    that open context managers clean up as on any error: no half-written artifact, no spilled summaries
    left in the temporary directory (several GB on a ViT-L/14 build). Ctrl-C already does so."""

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
