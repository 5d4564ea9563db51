from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors import SafetensorError, safe_open

from esmpp.artifact import check_artifact_destination, save_artifact
from esmpp.checkpoints import load_encoder
from esmpp.errors import ConfigError, DatasetError, EsmppError, StorageError
from esmpp.zoo import Zoo, build_zoo, default_root, get_preset
from esmpp.zoo import build as build_module
from esmpp.zoo.presets import ZooPreset
from tests.conftest import claim_held_elsewhere, random_artifact
from tests.reliability.project import directory_digest


def _checkpoint_hashes(zoo: Zoo) -> dict[str, str]:
    paths = [zoo.pretrained_path, *(zoo.finetuned_path(task) for task in zoo.tasks)]
    return {path.relative_to(zoo.root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}


def test_complete_build_is_reused_without_retraining(tiny_zoo: Zoo, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached zoo was rebuilt")

    monkeypatch.setattr(build_module, "_build_into", fail)
    again = build_zoo("tiny", root=tiny_zoo.root, progress=False)
    assert again.manifest == tiny_zoo.manifest


def test_a_zoo_another_process_is_building_is_waited_for_and_opened(
    tiny_zoo: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two first runs (`esmpp demo`) on a new machine: the second waits for the first's zoo, not builds its own."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the zoo was built twice")

    root = tmp_path / "zoo" / "tiny"
    root.parent.mkdir()
    monkeypatch.setattr(build_module, "_build_into", fail)
    with claim_held_elsewhere(root) as release:
        say_waiting = build_module._say_waiting

        def finish_the_other_build(claim: Path) -> None:
            say_waiting(claim)
            shutil.copytree(tiny_zoo.root, root)  # what the other process's build leaves
            release()

        monkeypatch.setattr(build_module, "_say_waiting", finish_the_other_build)
        zoo = build_zoo("tiny", root=root, progress=False)
    assert zoo.manifest == tiny_zoo.manifest
    assert "another esmpp process is building this zoo now" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.rglob("*") if path.parent == root.parent) == ["tiny"]


def test_the_cache_folder_is_made_before_the_zoo_is_claimed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Else two first runs on a new machine, with no cache folder yet, could not claim the zoo and both build it."""
    claimed = []

    def record(root: Path, *args: object, **kwargs: object) -> None:
        claimed.append(root)
        raise KeyboardInterrupt  # stop before the build

    monkeypatch.setenv("ESMPP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build_module, "claimed_destination", record)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(_one_task_in_two_steps(), progress=False)
    assert claimed == [tmp_path / "cache" / "zoo" / "tiny"] and claimed[0].parent.is_dir()


def test_same_seed_builds_identical_checkpoints(tiny_zoo: Zoo, tmp_path: Path) -> None:
    rebuilt = build_zoo("tiny", root=tmp_path / "tiny", progress=False)
    assert _checkpoint_hashes(rebuilt) == _checkpoint_hashes(tiny_zoo)
    assert list(tmp_path.iterdir()) == [tmp_path / "tiny"], "the staging directory was left behind"


def test_layout_and_manifest(tiny_zoo: Zoo) -> None:
    preset = get_preset("tiny")
    assert tiny_zoo.tasks == list(preset.tasks)
    assert tiny_zoo.arch == preset.arch
    for task in tiny_zoo.tasks:
        task_dir = tiny_zoo.root / "tasks" / task
        assert {p.name for p in task_dir.iterdir()} == {
            "finetuned.safetensors",
            "head.safetensors",
            "data.npz",
        }
        entry = tiny_zoo.manifest["tasks"][task]
        assert set(entry["accuracy"]) == {"pretrained", "finetuned"}
        assert set(entry["accuracy"]["finetuned"]) == {"val", "test"}
    assert tiny_zoo.manifest["preset"]["finetune"]["steps"] == preset.finetune.steps
    assert tiny_zoo.manifest["build_seconds"]["total"] > 0 and tiny_zoo.manifest["build_seconds"]["cpu"] > 0
    assert "load_digits" in tiny_zoo.manifest["tasks"]["digits"]["source"]
    assert json.loads((tiny_zoo.root / "manifest.json").read_text()) == tiny_zoo.manifest


def test_checkpoints_carry_canonical_keys_and_architecture(tiny_zoo: Zoo) -> None:
    with safe_open(tiny_zoo.finetuned_path(tiny_zoo.tasks[0]), framework="pt") as handle:
        keys = set(handle.keys())
    assert "transformer.resblocks.0.attn.in_proj_weight" in keys and "conv1.weight" in keys
    assert not any(key.startswith("visual.") for key in keys)
    assert load_encoder(tiny_zoo.finetuned_path(tiny_zoo.tasks[0])).arch == tiny_zoo.arch


def _one_task_in_two_steps() -> ZooPreset:
    return get_preset("tiny").model_copy(
        update={
            "tasks": ("stripes",),
            "pretrain": get_preset("tiny").pretrain.model_copy(update={"steps": 2}),
            "finetune": get_preset("tiny").finetune.model_copy(update={"steps": 2}),
        }
    )


def test_force_rebuilds_in_place(tmp_path: Path) -> None:
    small = _one_task_in_two_steps()
    first = build_zoo(small, root=tmp_path / "z", progress=False)
    (first.root / "stale").write_text("left from an earlier build")
    second = build_zoo(small, root=tmp_path / "z", force=True, progress=False)
    assert not (second.root / "stale").exists()
    assert second.tasks == ["stripes"]


@pytest.mark.parametrize(
    ("root", "elsewhere"),
    [(None, "set ESMPP_CACHE to another folder"), ("z", "choose another folder for the zoo")],
    ids=["in the cache", "at a root given"],
)
def test_a_full_disk_leaves_no_zoo_and_says_where_else_to_build_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root: str | None, elsewhere: str
) -> None:
    """The advice names the setting that placed the zoo: ESMPP_CACHE means nothing to a zoo built at --out."""

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setenv("ESMPP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build_module, "save_file", disk_full)  # the task heads
    with pytest.raises(StorageError, match=rf"could not write .*free some space, or {elsewhere}"):
        build_zoo(_one_task_in_two_steps(), root=tmp_path / root if root else None, progress=False)
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []


def test_a_folder_of_the_users_is_never_replaced_by_a_zoo(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"memories")
    for force in (False, True):
        with pytest.raises(EsmppError, match="photos is a folder that esmpp did not write"):
            build_zoo(_one_task_in_two_steps(), root=tmp_path / "photos", force=force, progress=False)
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"memories"


def test_an_artifact_is_never_replaced_by_a_zoo(tmp_path: Path) -> None:
    """An artifact has a manifest.json too: `zoo build --out ARTIFACT --force` replaced it."""
    artifact = save_artifact(random_artifact(), tmp_path / "artifact")
    before = directory_digest(artifact)
    with pytest.raises(DatasetError, match="artifact: it is an esmpp artifact; choose another folder for the zoo"):
        build_zoo(_one_task_in_two_steps(), root=artifact, progress=False)
    refused = "artifact is an esmpp artifact, which this command does not write, so it is not replaced"
    with pytest.raises(EsmppError, match=refused):
        build_zoo(_one_task_in_two_steps(), root=artifact, force=True, progress=False)
    assert directory_digest(artifact) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["artifact"]


def test_a_cache_folder_that_holds_no_zoo_is_kept_and_ESMPP_CACHE_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zoo of --zoo PRESET is in the cache: the advice is to move ESMPP_CACHE, not to choose another --out
    (eval has none) nor to 'build the zoo in another folder' (--zoo PRESET reads only the cache)."""
    monkeypatch.setenv("ESMPP_CACHE", str(tmp_path / "cache"))
    small = _one_task_in_two_steps()
    taken = default_root(small.name)
    (taken / "photos").mkdir(parents=True)
    for force in (False, True):
        with pytest.raises(EsmppError, match=r"did not write.*: set ESMPP_CACHE to another folder, or remove it"):
            build_zoo(small, force=force, progress=False)
    shutil.rmtree(taken)
    artifact = save_artifact(random_artifact(), taken)
    before = directory_digest(artifact)
    with pytest.raises(DatasetError, match="it is an esmpp artifact; set ESMPP_CACHE to another folder"):
        build_zoo(small, progress=False)
    with pytest.raises(EsmppError, match=r"is an esmpp artifact, .*: set ESMPP_CACHE to another folder"):
        build_zoo(small, force=True, progress=False)
    assert directory_digest(artifact) == before


def test_force_replaces_a_zoo_of_a_format_this_esmpp_no_longer_reads(tmp_path: Path) -> None:
    small = _one_task_in_two_steps()
    old = build_zoo(small, root=tmp_path / "z", progress=False)
    (old.root / "manifest.json").write_text(json.dumps({**old.manifest, "format_version": 0}))
    with pytest.raises(DatasetError, match=r"format version 0.*--force"):
        Zoo.load(old.root)
    assert build_zoo(small, root=old.root, force=True, progress=False).manifest["format_version"] == 1


def test_default_root_follows_esmpp_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ESMPP_CACHE", str(tmp_path))
    assert default_root("mini") == tmp_path / "zoo" / "mini"
    monkeypatch.delenv("ESMPP_CACHE")
    assert default_root("tiny") == Path.home() / ".cache" / "esmpp" / "zoo" / "tiny"


def test_missing_zoo_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="esmpp zoo build"):
        Zoo.load(tmp_path)


def test_unknown_preset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="tiny"):
        build_zoo("huge")


def test_a_zoo_is_never_replaced_by_an_artifact(tmp_path: Path) -> None:
    """A zoo has a manifest.json too: `esmpp build --out ZOO --overwrite` and `compare --artifact ZOO` replaced it."""
    zoo = build_zoo(_one_task_in_two_steps(), root=tmp_path / "zoo", progress=False)
    before = directory_digest(zoo.root)
    refused = "zoo is an esmpp zoo, which this command does not write, so it is not replaced"
    with pytest.raises(EsmppError, match=refused):
        check_artifact_destination(zoo.root, overwrite=True)
    with pytest.raises(EsmppError, match=refused):
        save_artifact(random_artifact(), zoo.root, overwrite=True)
    assert directory_digest(zoo.root) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["zoo"]
    artifact = save_artifact(random_artifact(), tmp_path / "artifact")
    assert save_artifact(random_artifact(), artifact, overwrite=True) == artifact  # an artifact still is


def test_a_manifest_nested_too_deep_is_no_zoo_and_is_not_replaced(tmp_path: Path) -> None:
    """The zoo's manifest reader let the parser's RecursionError through: a traceback, where an artifact's
    reader (the same file name) said the folder was not one."""
    folder = tmp_path / "deep"
    folder.mkdir()
    (folder / "manifest.json").write_text("[" * 100_000)
    with pytest.raises(DatasetError, match="No zoo in"):
        Zoo.load(folder)
    with pytest.raises(EsmppError, match="not replaced"):
        build_zoo(_one_task_in_two_steps(), root=folder, force=True, progress=False)
    assert [path.name for path in folder.iterdir()] == ["manifest.json"]
