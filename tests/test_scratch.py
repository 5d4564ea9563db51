import errno
import fcntl

from esmpp import scratch
from esmpp.scratch import ScratchDirectory, remove_abandoned


def names(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_a_directory_and_its_lock_file_go_on_close_and_closing_again_does_nothing(tmp_path):
    directory = ScratchDirectory("x-", tmp_path)
    (directory.path / "file").write_text("data")
    assert names(tmp_path) == [directory.path.name, f"{directory.path.name}.lock"]
    directory.close()
    directory.close()
    assert names(tmp_path) == []


def test_a_live_processs_directory_stays(tmp_path):
    with ScratchDirectory("x-", tmp_path) as live:
        assert remove_abandoned("x-", tmp_path) == []
        with ScratchDirectory("x-", tmp_path) as other:
            assert {live.path, other.path} <= set(tmp_path.iterdir())
        assert live.path.is_dir()


def test_abandoned_directories_of_the_prefix_go_with_their_lock_files(tmp_path):
    killed, before_locks = tmp_path / "x-a", tmp_path / "x-b"
    for directory in (killed, before_locks, tmp_path / "y-c"):
        directory.mkdir()
    for lock in ("x-a.lock", "x-orphan.lock", "y-c.lock"):  # nobody holds them
        (tmp_path / lock).touch()
    assert remove_abandoned("x-", tmp_path) == [killed, before_locks]
    assert names(tmp_path) == ["y-c", "y-c.lock"]


def test_the_default_parent_is_the_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    abandoned = tmp_path / "x-old"
    abandoned.mkdir()
    with ScratchDirectory("x-") as directory:
        assert directory.path.parent == tmp_path and not abandoned.exists()


def test_a_lock_file_swept_before_it_was_locked_is_made_anew(tmp_path, monkeypatch):
    """A sweep can find a new lock file in the instant between its creation and its lock, and remove it."""
    real_flock, calls = fcntl.flock, []

    def swept_first(descriptor: int, operation: int) -> None:
        calls.append(operation)
        if len(calls) == 1:
            for lock in tmp_path.glob("x-*.lock"):
                lock.unlink()
        real_flock(descriptor, operation)

    monkeypatch.setattr(scratch.fcntl, "flock", swept_first)
    with ScratchDirectory("x-", tmp_path) as directory:
        assert len(calls) == 2
        assert names(tmp_path) == [directory.path.name, f"{directory.path.name}.lock"]
        monkeypatch.setattr(scratch.fcntl, "flock", real_flock)
        assert remove_abandoned("x-", tmp_path) == [] and directory.path.is_dir()


def test_on_a_filesystem_without_locks_directories_are_made_and_never_swept(tmp_path, monkeypatch):
    def refuse(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(scratch.fcntl, "flock", refuse)
    with ScratchDirectory("x-", tmp_path) as directory:
        assert remove_abandoned("x-", tmp_path) == [] and directory.path.is_dir()
    assert names(tmp_path) == []
