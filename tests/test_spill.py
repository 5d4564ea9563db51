import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from esmpp import spill as spill_module
from esmpp.errors import StorageError
from esmpp.merging import get_method
from esmpp.merging.esm import EssentialSummary
from esmpp.spill import Parked, SpillDirectory, unpark

REPO = Path(__file__).resolve().parents[1]


def _summary() -> EssentialSummary:
    generator = torch.Generator().manual_seed(0)
    return EssentialSummary(
        basis=torch.randn(6, 2, generator=generator).T,  # not contiguous
        eigenvalues=torch.rand(2, generator=generator, dtype=torch.float64),
        coordinates=torch.randn(2, 5, generator=generator),
        delta_norm=1.25,
    )


def test_a_parked_item_comes_back_bit_for_bit(tmp_path):
    summary = _summary()
    with SpillDirectory(tmp_path) as spill:
        parked = spill.park(summary)
        assert isinstance(parked, Parked) and parked.path.parent == spill.path
        again = unpark(parked)
    assert type(again) is EssentialSummary and again.delta_norm == summary.delta_norm
    for name in ("basis", "eigenvalues", "coordinates"):
        loaded, original = getattr(again, name), getattr(summary, name)
        assert torch.equal(loaded, original) and loaded.dtype == original.dtype
    assert unpark(summary) is summary


def test_the_spill_directory_goes_also_on_errors(tmp_path):
    with pytest.raises(RuntimeError), SpillDirectory(tmp_path) as spill:
        spill.park(_summary())
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_methods_park_only_inside_spilling(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    method = get_method("esm")(None, num_tasks=2)
    summary = _summary()
    assert method.park(summary) is summary
    with method.spilling():
        assert isinstance(method.park(summary), Parked)
    assert method.park(summary) is summary and list(tmp_path.iterdir()) == []


def test_a_full_disk_is_reported_with_the_spill_directory_and_the_way_out(tmp_path, monkeypatch):
    real_save = spill_module.save_file
    calls = []

    def save_until_full(tensors, path):
        calls.append(path)
        if len(calls) > 1:  # what safetensors raises on ENOSPC
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, path)

    monkeypatch.setattr(spill_module, "save_file", save_until_full)
    with pytest.raises(StorageError) as raised, SpillDirectory(tmp_path) as spill:
        spill.park(_summary())
        parked_bytes = calls[0].stat().st_size
        spill.park(_summary())
    message = str(raised.value)
    assert str(spill.path) in message and "No space left on device" in message and "TMPDIR=" in message
    assert f"{parked_bytes / 2**20:.1f} MiB were parked" in message and spill.bytes_parked == parked_bytes
    assert list(tmp_path.iterdir()) == []


def test_the_spill_of_a_sigkilled_build_is_removed_by_a_later_one(tmp_path):
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from tests.test_spill import _summary
from esmpp.spill import SpillDirectory
spill = SpillDirectory({str(tmp_path)!r})
spill.park(_summary())
print(spill.path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    abandoned = Path(result.stdout.strip())
    assert abandoned.parent == tmp_path and len(list(abandoned.glob("*.safetensors"))) == 1
    with SpillDirectory(tmp_path) as spill:
        assert sorted(tmp_path.iterdir()) == [spill.path, spill.path.with_name(f"{spill.path.name}.lock")]
