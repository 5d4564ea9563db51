import errno
import fcntl
import os
import time
from pathlib import Path

from esmpp.scratch import CREATION_GRACE_SECONDS, ScratchDirectory, remove_abandoned


def age(path: Path, seconds: float) -> None:
    """Set the modification time of ``path`` ``seconds`` into the past."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_directory_goes_on_close_and_closing_again_does_nothing(tmp_path):
    scratch = ScratchDirectory("x-", tmp_path)
    (scratch.path / "file").write_text("data")
    scratch.close()
    scratch.close()
    assert list(tmp_path.iterdir()) == []


def test_a_live_processs_directory_stays_however_old(tmp_path):
    with ScratchDirectory("x-", tmp_path) as live:
        age(live.path, 2 * CREATION_GRACE_SECONDS)
        assert remove_abandoned("x-", tmp_path) == []
        with ScratchDirectory("x-", tmp_path) as other:
            assert sorted(tmp_path.iterdir()) == sorted([live.path, other.path])
        assert live.path.is_dir()


def test_an_unlocked_directory_goes_once_too_old_to_be_starting_and_only_of_its_prefix(tmp_path):
    starting, killed_while_starting = tmp_path / "x-a", tmp_path / "x-b"
    for directory in (starting, killed_while_starting, tmp_path / "y-b"):
        directory.mkdir()
    age(killed_while_starting, 2 * CREATION_GRACE_SECONDS)
    age(tmp_path / "y-b", 2 * CREATION_GRACE_SECONDS)
    assert remove_abandoned("x-", tmp_path) == [killed_while_starting]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-a", "y-b"]


def test_the_default_parent_is_the_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    abandoned = tmp_path / "x-old"
    abandoned.mkdir()
    age(abandoned, 2 * CREATION_GRACE_SECONDS)
    with ScratchDirectory("x-") as scratch:
        assert scratch.path.parent == tmp_path and not abandoned.exists()


def test_on_a_filesystem_without_locks_directories_are_made_and_never_swept(tmp_path, monkeypatch):
    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with ScratchDirectory("x-", tmp_path) as scratch:
        age(scratch.path, 2 * CREATION_GRACE_SECONDS)
        assert remove_abandoned("x-", tmp_path) == [] and scratch.path.is_dir()
    assert list(tmp_path.iterdir()) == []
