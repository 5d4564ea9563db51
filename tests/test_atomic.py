import errno
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from esmpp import atomic
from esmpp.atomic import atomic_directory, check_destination, check_writable_folder, free_mib, is_write_failure
from esmpp.errors import EsmppError, StorageError
from esmpp.folders import is_artifact
from tests.conftest import claim_held_elsewhere

DISK_FULL = [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),  # as raised
]


@pytest.mark.parametrize("failure", DISK_FULL, ids=["os", "safetensors"])
def test_a_failed_write_names_the_destination_and_leaves_nothing(tmp_path, failure):
    destination = tmp_path / "artifact"
    with pytest.raises(StorageError) as raised, atomic_directory(destination) as staging:
        (staging / "backbone.safetensors").write_bytes(b"partial")
        raise failure
    message = str(raised.value)
    assert str(destination) in message and "No space left on device" in message and "MiB are free" in message
    assert "free some space, or choose another --out" in message and raised.value.__cause__ is failure
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "error", [ValueError("a bug"), SafetensorError("You are trying to save a non contiguous tensor")]
)
def test_other_errors_pass_through_unchanged(tmp_path, error):
    with pytest.raises(type(error)) as raised, atomic_directory(tmp_path / "artifact"):
        raise error
    assert raised.value is error and not is_write_failure(error)
    assert list(tmp_path.iterdir()) == []


def test_a_destination_whose_folder_cannot_be_made_is_a_storage_error_that_does_not_blame_the_disk(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    destination = a_file / "models" / "artifact"
    with pytest.raises(StorageError) as raised, atomic_directory(destination):
        pytest.fail("the block must not run")
    message = str(raised.value)
    assert str(destination) in message and "Not a directory" in message and "choose another --out" in message
    assert "MiB are free" not in message and "free some space" not in message
    assert sorted(tmp_path.iterdir()) == [a_file]


def test_checking_a_destination_fails_where_the_write_would_and_leaves_nothing(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StorageError, match="File exists"):  # mkdir of the folder, which is a file
        check_destination(tmp_path / "file" / "artifact")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "manifest.json").write_text("{}")
    with pytest.raises(EsmppError, match="Pass --overwrite to replace it"):
        check_destination(existing, marker="manifest.json")
    check_destination(existing, overwrite=True, marker="manifest.json")
    check_destination(tmp_path / "new" / "deeper" / "artifact")  # its folders are made to check, then removed
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["existing", "file", "manifest.json"]


def test_a_failed_write_removes_the_folders_it_made_and_keeps_those_it_found(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError), atomic_directory(tmp_path / "kept" / "new" / "deeper" / "artifact") as staging:
        (staging / "backbone.safetensors").write_bytes(b"partial")
        raise ValueError("a bug")
    assert list(tmp_path.rglob("*")) == [tmp_path / "kept"]
    with atomic_directory(tmp_path / "kept" / "new" / "artifact") as staging:
        (staging / "manifest.json").write_text("{}")
    assert (tmp_path / "kept" / "new" / "artifact" / "manifest.json").is_file()  # a written one keeps its folders


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_overwrite_replaces_only_what_the_writer_made_before(tmp_path, kind):
    """--overwrite on a mistyped --out must not delete the user's folder (or file): only a folder holding the
    writer's marker (an artifact's manifest.json) is replaced."""
    user = tmp_path / "thesis"
    if kind == "folder":
        (user / "chapters").mkdir(parents=True)
        (user / "chapters" / "one.tex").write_text("years of work")
    else:
        user.write_text("years of work")
    refused = pytest.raises(EsmppError, match=f"thesis is a {kind} that esmpp did not write.*remove it yourself")
    with refused, atomic_directory(user, overwrite=True, marker="manifest.json") as staging:
        (staging / "manifest.json").write_text("{}")
    assert (user / "chapters" / "one.tex" if kind == "folder" else user).read_text() == "years of work"
    with pytest.raises(EsmppError, match="did not write"):
        check_destination(user, overwrite=True, marker="manifest.json")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["thesis"]


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_what_would_not_be_replaced_is_refused_without_suggesting_overwrite(tmp_path, kind):
    """--overwrite was suggested first, and then refused: only a folder it would replace is told to pass it."""
    user = tmp_path / "thesis"
    if kind == "folder":
        user.mkdir()
        (user / "notes.txt").write_text("years of work")
    else:
        user.write_text("years of work")
    with pytest.raises(EsmppError) as refused:
        check_destination(user, marker="export.json")
    assert f"thesis is a {kind} that esmpp did not write" in str(refused.value)
    assert "--overwrite" not in str(refused.value)


def test_a_refusal_says_how_to_write_elsewhere_as_its_caller_does(tmp_path):
    """Not always 'choose another --out': a zoo in the cache is moved by ESMPP_CACHE, and eval has no --out."""
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "notes.txt").write_text("years of work")
    with pytest.raises(EsmppError) as refused:
        check_destination(user, overwrite=True, elsewhere="set ESMPP_CACHE to another folder", marker="manifest.json")
    assert str(refused.value).endswith(
        "whatever the flags say: set ESMPP_CACHE to another folder, or remove it yourself."
    )
    assert "--out" not in str(refused.value)
    (user / "notes.txt").unlink()
    (user / "manifest.json").write_text("{}")
    with pytest.raises(EsmppError, match="Pass --overwrite to replace it, or choose another folder for the artifact"):
        check_destination(user, elsewhere="choose another folder for the artifact", marker="manifest.json")


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_empty_folder_is_refused_up_front_saying_how_to_write_there(tmp_path, overwrite):
    """An empty folder was written into by renaming onto it: its mode, group and ACL were lost, and where the
    rename could not happen (a mount point, --out .) the write failed only after the long work."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o2750)
    elsewhere = "set ESMPP_CACHE to another folder"
    with pytest.raises(EsmppError) as refused, atomic_directory(out, overwrite, elsewhere) as staging:
        (staging / "export.json").write_text("{}")
    assert str(refused.value) == (
        f"{out} is an empty folder: esmpp writes its output as a new folder, in one step, and replaces only a folder "
        f"it wrote itself. Remove it (rmdir {out}), or set ESMPP_CACHE to another folder."
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"] and list(out.iterdir()) == []
    assert stat.S_IMODE(out.stat().st_mode) == 0o2750


@pytest.mark.parametrize("kind", ["empty folder", "file"])
def test_a_destination_made_during_the_write_is_refused_at_the_move(tmp_path, kind):
    """It was replaced at the end of the write, as if it had been checked: it is checked again before the move."""
    out = tmp_path / "out"
    refused = pytest.raises(EsmppError, match=f"out is an? {kind}")
    with refused, atomic_directory(out, overwrite=True, marker="manifest.json") as staging:
        (staging / "manifest.json").write_text("{}")
        if kind == "file":
            out.write_text("made meanwhile")
        else:
            out.mkdir()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert out.read_text() == "made meanwhile" if kind == "file" else list(out.iterdir()) == []


def test_a_link_to_an_empty_folder_is_not_taken_for_one(tmp_path):
    """Not told to rmdir it, which does not remove a link."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(EsmppError, match="link is a folder that esmpp did not write"):
        check_destination(tmp_path / "link", marker="manifest.json")


# What a writer of artifacts (a manifest.json that is_artifact accepts) finds in its way, and how it names it.
FOUND = {
    "an ONNX export": ({"export.json": "{}"}, "is an esmpp ONNX export, which this command does not write"),
    "a zoo": (
        {"manifest.json": '{"preset": {"name": "tiny"}, "tasks": {"digits": {}}}'},
        "is an esmpp zoo, which this command does not write",
    ),
    "another program's manifest": ({"manifest.json": "{}"}, "is a folder whose manifest.json esmpp did not write"),
    "a user's folder": ({"notes.txt": "mine"}, "is a folder that esmpp did not write (it has no manifest.json)"),
}


@pytest.mark.parametrize(("files", "named"), FOUND.values(), ids=FOUND.keys())
def test_a_refusal_names_the_kind_of_folder_it_found(tmp_path, files, named):
    found = tmp_path / "found"
    found.mkdir()
    for name, text in files.items():
        (found / name).write_text(text)
    with pytest.raises(EsmppError) as refused:
        check_destination(found, overwrite=True, marker="manifest.json", owns=is_artifact)
    assert f"found {named}, so it is not replaced" in str(refused.value)
    assert sorted(path.name for path in found.iterdir()) == sorted(files)


def test_free_space_is_measured_where_a_missing_folder_would_be_made(tmp_path):
    assert free_mib(tmp_path / "not" / "yet") == pytest.approx(free_mib(tmp_path), rel=0.01)


def test_a_folder_that_could_not_be_written_is_refused_without_creating_anything(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StorageError, match=r"file is a file\. Nothing was written: pass another --workdir"):
        check_writable_folder(tmp_path / "file" / "work", "pass another --workdir")
    check_writable_folder(tmp_path / "new" / "work", "pass another --workdir")
    monkeypatch.setattr(atomic.os, "access", lambda path, mode: False)  # as a read-only folder (root may write any)
    with pytest.raises(StorageError, match=re.escape(f"{tmp_path} is not writable")):
        check_writable_folder(tmp_path / "new" / "work", "pass another --workdir")
    assert [path.name for path in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True, ids=oct)
def test_the_published_folder_and_its_files_get_the_modes_the_umask_gives(tmp_path, umask):
    """Not mkdtemp's 0700 nor safetensors' 0600: a server running as another user reads what the umask lets it."""
    destination = tmp_path / "artifact"
    with atomic_directory(destination) as staging:
        save_file({"weight": torch.zeros(2)}, staging / "weights.safetensors")
        (staging / "sub").mkdir()
        (staging / "sub" / "notes.txt").write_text("written by open()")
    modes = {path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in tmp_path.rglob("*")}
    folder, file = 0o777 & ~umask, 0o666 & ~umask
    assert modes == {
        "artifact": folder,
        "artifact/sub": folder,
        "artifact/weights.safetensors": file,
        "artifact/sub/notes.txt": file,
    }


def _written(destination, content, **kwargs):
    with atomic_directory(destination, marker="manifest.json", **kwargs) as staging:
        (staging / "manifest.json").write_text(content)


def test_out_dot_replaces_the_current_folder_rather_than_writing_inside_it(tmp_path, monkeypatch):
    """`--out .` has no name and is its own "." entry: the staging folder was made inside the destination, which
    the move then refused (or failed with EBUSY), after the whole export."""
    _written(tmp_path / "out", "old")
    monkeypatch.chdir(tmp_path / "out")
    _written(Path("."), "new", overwrite=True)
    assert (tmp_path / "out" / "manifest.json").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_a_failed_move_into_place_puts_the_old_folder_back(tmp_path, monkeypatch):
    """The old output waited in a retired `.NAME.tmp-old-*` folder, which the next write deletes as stale."""
    destination = tmp_path / "out"
    _written(destination, "old")
    real_replace, calls = atomic.os.replace, []

    def second_fails(source, target):
        calls.append(source)
        if len(calls) == 2:  # the staging folder onto the destination
            raise OSError(errno.EIO, "Input/output error")
        real_replace(source, target)

    monkeypatch.setattr(atomic.os, "replace", second_fails)
    with pytest.raises(StorageError, match="could not write"):
        _written(destination, "new", overwrite=True)
    assert (destination / "manifest.json").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_a_write_removes_what_killed_writes_left_beside_its_destination(tmp_path):
    for left in (".out.tmp-killed", ".out.tmp-old-killed"):  # a staging folder, and a retired old output
        (tmp_path / left).mkdir()
        (tmp_path / f"{left}.lock").touch()  # its process died, and its lock with it
    _written(tmp_path / "out", "new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_a_concurrent_write_of_the_same_destination_leaves_the_others_staging_folder_alone(tmp_path):
    """Two builds writing one --out at once: each write used to delete the other's staging folder as stale."""
    destination = tmp_path / "out"
    with atomic_directory(destination, overwrite=True, marker="manifest.json") as first:
        (first / "manifest.json").write_text("first")
        _written(destination, "second", overwrite=True)
        assert (first / "manifest.json").read_text() == "first"
        assert (destination / "manifest.json").read_text() == "second"
    assert (destination / "manifest.json").read_text() == "first"  # the last to finish wins, whole
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_a_claimed_destination_is_refused_to_a_second_claim_until_released(tmp_path):
    destination = tmp_path / "artifact"
    with atomic.claimed_destination(destination):
        # flock locks open files, not processes: a second claim from this process conflicts like another's.
        with pytest.raises(EsmppError) as raised, atomic.claimed_destination(destination, "write elsewhere"):
            pass
        message = str(raised.value)
        assert f"{destination} is being written by another esmpp process now" in message
        assert message.endswith("wait for it to finish, or write elsewhere")
    assert list(tmp_path.iterdir()) == []  # the claim file goes with the claim
    with atomic.claimed_destination(destination):
        pass


def test_a_killed_claimers_leftover_file_claims_nothing_and_is_removed(tmp_path):
    leftover = tmp_path / f".artifact{atomic.CLAIM_SUFFIX}"
    leftover.write_bytes(b"")  # what SIGKILL leaves: the file, without the process that locked it
    with atomic.claimed_destination(tmp_path / "artifact"):
        assert leftover.exists()
    assert not leftover.exists()


def test_no_claim_is_taken_where_the_destination_folder_does_not_exist(tmp_path):
    with atomic.claimed_destination(tmp_path / "new" / "artifact"):
        assert not (tmp_path / "new").exists()  # making it would leave a folder behind a failed build


def test_a_filesystem_without_locks_gets_no_claim_and_keeps_no_claim_file(tmp_path, monkeypatch):
    def refuse(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(atomic.fcntl, "flock", refuse)
    with atomic.claimed_destination(tmp_path / "artifact"):
        assert list(tmp_path.iterdir()) == []
    assert list(tmp_path.iterdir()) == []


def test_a_claim_held_by_another_process_refuses_until_that_process_is_killed(tmp_path):
    destination = tmp_path / "artifact"
    holder = subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_WAIT, str(destination)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "claimed\n"
        refused = pytest.raises(EsmppError, match="is being written by another esmpp process now")
        with refused, atomic.claimed_destination(destination):
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the claim file stays
        holder.wait()
    assert (tmp_path / f".artifact{atomic.CLAIM_SUFFIX}").exists()
    with atomic.claimed_destination(destination):  # the kernel dropped the dead process's lock
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_claim_told_when_busy_waits_for_the_holder_and_then_takes_the_destination(tmp_path):
    destination, told = tmp_path / "zoo", []
    with claim_held_elsewhere(destination) as release:

        def on_busy(claim: Path) -> None:
            told.append(claim)
            release()

        refused = pytest.raises(EsmppError, match="is being written by another esmpp process now")
        with atomic.claimed_destination(destination, on_busy=on_busy), refused, atomic.claimed_destination(destination):
            pass  # the second claim is refused: this process holds the destination now
    assert told == [tmp_path / f".zoo{atomic.CLAIM_SUFFIX}"]
    assert list(tmp_path.iterdir()) == []


CLAIM_AND_WAIT = """
import sys, time
from pathlib import Path
from esmpp.atomic import claimed_destination
with claimed_destination(Path(sys.argv[1])):
    print("claimed", flush=True)
    time.sleep(60)
"""
