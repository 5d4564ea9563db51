"""SIGKILL `esmpp build` at many points: afterwards the destination holds nothing or a complete artifact
(the previous one, or the finished new one) — never a partial one — and a rerun succeeds.

Kill points: random delays over the whole run, plus kills just after the hidden staging directory appears
(the write phase is a small part of a run). ``ESMPP_KILL_POINTS`` sets how many (CI: 6). SIGTERM, which a
process can catch, also removes the temporary files of the run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from esmpp.artifact import load_artifact
from tests.reliability.project import REPO, directory_digest, esmpp_command, esmpp_environment, run_esmpp, write_project

KILL_POINTS = max(4, int(os.environ.get("ESMPP_KILL_POINTS", "6")))  # 4+: every scenario at least once


@dataclass
class KillPoint:
    destination: Path
    overwrite: bool  # a previous artifact is there and the command replaces it
    delay: float  # seconds after the start, or after the staging directory appears
    after_staging: bool


def kill_during(command: list[str], destination: Path, delay: float, after_staging: bool) -> int | None:
    """Run ``command``; SIGKILL it ``delay`` s after its start, or after a hidden staging sibling of
    ``destination`` (``.NAME.tmp-*``, see esmpp.atomic) appears. Returns its exit code, None when killed
    (any command writing ``destination`` through ``atomic_directory`` can be tested this way)."""
    process = subprocess.Popen(
        command, cwd=REPO, env=esmpp_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    if after_staging:
        while process.poll() is None and not any(destination.parent.glob(f".{destination.name}.tmp-*")):
            time.sleep(0.002)
    time.sleep(delay)
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGKILL)
    process.wait()
    return None


def _in_parallel(commands: list[tuple]) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(lambda args: run_esmpp(*args), commands))


@pytest.mark.crash
def test_sigkilled_builds_leave_nothing_or_a_complete_artifact(tmp_path, monkeypatch):
    spills = tmp_path / "tmp"  # the builds' TMPDIR, where a killed build leaves its spilled summaries
    spills.mkdir()
    monkeypatch.setenv("TMPDIR", str(spills))
    config = write_project(tmp_path / "project")
    reference, previous = tmp_path / "reference", tmp_path / "previous"
    start = time.perf_counter()
    built = _in_parallel([("build", config, "--out", reference), ("build", config, "--out", previous, "--rank", "1")])
    duration = time.perf_counter() - start
    assert [result.returncode for result in built] == [0, 0]
    complete = {"new": directory_digest(reference), "previous": directory_digest(previous)}

    rng = random.Random(0)
    points = []
    for i in range(KILL_POINTS):
        destination = tmp_path / f"run{i}" / "artifact"
        destination.parent.mkdir()
        overwrite = i % 2 == 1
        if overwrite:
            shutil.copytree(previous, destination)
        after_staging = i % 3 == 2
        delay = rng.uniform(0, 0.05) if after_staging else rng.uniform(0.2, 1.2) * duration
        points.append(KillPoint(destination, overwrite, delay, after_staging))

    outcomes: dict[int, int | None] = {}

    def run_point(index: int, point: KillPoint) -> None:
        args = ["build", config, "--out", point.destination] + (["--overwrite"] if point.overwrite else [])
        outcomes[index] = kill_during(esmpp_command(*args), point.destination, point.delay, point.after_staging)

    threads = [threading.Thread(target=run_point, args=item) for item in enumerate(points)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    killed = sum(code is None for code in outcomes.values())
    assert all(code in (None, 0) for code in outcomes.values()), outcomes
    for point in points:
        if point.destination.exists():
            digest = directory_digest(point.destination)
            assert digest in complete.values(), f"partial artifact at {point.destination}"
            if not point.overwrite:
                assert digest == complete["new"]
            load_artifact(point.destination)
    print(f"\n{killed} of {len(points)} builds killed (delays {[round(p.delay, 2) for p in points]})")

    # An artifact is only replaced with --overwrite; a rerun succeeds over whatever a kill left and cleans
    # the leftovers: beside its destination, and the killed builds' spills.
    abandoned = [path for path in spills.iterdir() if path.is_dir()]
    print(f"{len(abandoned)} killed builds left their spill")
    existing = next(point.destination for point in points[2:] if point.destination.exists())
    before = directory_digest(existing)
    reruns = [point.destination for point in points[:2]]
    refused, *rerun_results = _in_parallel(
        [("build", config, "--out", existing)] + [("build", config, "--out", d, "--overwrite") for d in reruns]
    )
    assert refused.returncode == 1 and "--overwrite" in refused.stderr and directory_digest(existing) == before
    for destination, rerun in zip(reruns, rerun_results):
        assert rerun.returncode == 0, rerun.stderr
        assert directory_digest(destination) == complete["new"]
        assert [p.name for p in destination.parent.iterdir()] == ["artifact"]
    assert list(spills.iterdir()) == []


@pytest.mark.crash
def test_sigkilled_exports_leave_nothing_or_a_complete_model(tmp_path):
    import onnxruntime

    from esmpp.artifact import save_artifact
    from tests.conftest import random_artifact

    artifact = save_artifact(random_artifact(), tmp_path / "artifact")
    rng = random.Random(1)
    points = [KillPoint(tmp_path / f"onnx{i}", False, rng.uniform(0.0, 0.3), True) for i in range(2)]
    points += [KillPoint(tmp_path / f"onnx{i + 2}", False, rng.uniform(2.0, 8.0), False) for i in range(2)]
    killed = 0
    for point in points:
        code = kill_during(
            esmpp_command("export", artifact, "--out", point.destination),
            point.destination,
            point.delay,
            point.after_staging,
        )
        killed += code is None
        if point.destination.exists():  # the export finished before the kill: it must be whole
            onnxruntime.InferenceSession(str(point.destination / "model.onnx"))
            assert (point.destination / "export.json").is_file()
        rerun = run_esmpp("export", artifact, "--out", point.destination, "--overwrite")
        assert rerun.returncode == 0, rerun.stderr
        onnxruntime.InferenceSession(str(point.destination / "model.onnx"))
        assert not list(tmp_path.glob(f".{point.destination.name}.tmp-*"))
    assert killed >= 2, "no export was killed mid-run: the kill points are too late"


def test_sigterm_cleans_up_what_the_command_had_written(tmp_path):
    """A killed build removes its spilled summaries (the default SIGTERM skips every cleanup)."""
    script = f"""
import os, signal, tempfile, time
tempfile.tempdir = {str(tmp_path)!r}
from esmpp.atomic import exit_on_terminate
from esmpp.spill import SpillDirectory
exit_on_terminate()
with SpillDirectory():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120, capture_output=True)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr.decode()
    assert list(tmp_path.iterdir()) == []
