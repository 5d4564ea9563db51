import errno

import pytest
from safetensors import SafetensorError

from esmpp.atomic import atomic_directory, is_write_failure
from esmpp.errors import StorageError

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
    assert "choose another --out" in message and raised.value.__cause__ is failure
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "error", [ValueError("a bug"), SafetensorError("You are trying to save a non contiguous tensor")]
)
def test_other_errors_pass_through_unchanged(tmp_path, error):
    with pytest.raises(type(error)) as raised, atomic_directory(tmp_path / "artifact"):
        raise error
    assert raised.value is error and not is_write_failure(error)
    assert list(tmp_path.iterdir()) == []
