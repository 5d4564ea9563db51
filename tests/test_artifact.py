import hashlib
import json
import re
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from esmpp.artifact import FORMAT_VERSION, MANIFEST, TENSOR_FILES, load_artifact, read_manifest, save_artifact
from esmpp.errors import ArtifactError, EsmppError, StorageError
from esmpp.runtime.model import Experts
from tests.conftest import random_artifact


def _outputs(artifact, images):
    with torch.no_grad():
        out = artifact.to_model()(images)
    return out.embedding, out.task, out.logits


def test_save_and_load_give_bit_identical_outputs(tmp_path, artifact):
    path = save_artifact(artifact, tmp_path / "art")
    images = torch.randn(6, 3, 16, 16)
    for before, after in zip(_outputs(artifact, images), _outputs(load_artifact(path), images)):
        assert torch.equal(before, after)
    manifest = read_manifest(path)
    assert manifest["format_version"] == FORMAT_VERSION
    assert [t["name"] for t in manifest["tasks"]] == ["task0", "task1", "task2"]


def test_a_saved_artifact_is_readable_by_other_users_under_umask_022(tmp_path, artifact, umask):
    path = save_artifact(artifact, tmp_path / "art")
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {file.name: stat.S_IMODE(file.stat().st_mode) for file in path.iterdir()} == {
        name: 0o644 for name in (*TENSOR_FILES, MANIFEST)
    }


def test_discriminant_router_biases_round_trip(tmp_path):
    artifact = random_artifact(discriminant=True)
    loaded = load_artifact(save_artifact(artifact, tmp_path / "art"))
    for key, layer in artifact.experts.items():
        assert torch.equal(loaded.experts[key].prototype_bias, layer.prototype_bias)
        assert torch.equal(loaded.experts[key].prototypes, layer.prototypes)
    images = torch.randn(6, 3, 16, 16)
    for before, after in zip(_outputs(artifact, images), _outputs(loaded, images)):
        assert torch.equal(before, after)


def test_format_1_artifacts_still_load_with_the_cosine_router(tmp_path, artifact):
    path = save_artifact(artifact, tmp_path / "art")
    _edit_manifest(path, lambda m: m.update(format_version=1))
    loaded = load_artifact(path)
    assert all(layer.prototype_bias is None for layer in loaded.experts.values())


def test_router_biases_of_the_wrong_shape_are_refused(tmp_path):
    artifact = random_artifact(discriminant=True)
    key, layer = next(iter(artifact.experts.items()))
    artifact.experts[key] = Experts(layer.up, layer.down, layer.prototypes, layer.prototype_bias[:2])
    with pytest.raises(ArtifactError, match="prototype_bias has shape"):
        save_artifact(artifact, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_existing_artifact_needs_overwrite(tmp_path, artifact):
    path = save_artifact(artifact, tmp_path / "art")
    with pytest.raises(EsmppError, match="--overwrite"):
        save_artifact(artifact, path)
    save_artifact(random_artifact(seed=1), path, overwrite=True)
    assert not torch.equal(load_artifact(path).heads[0], artifact.heads[0])
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_or_truncated_file_is_refused(tmp_path, artifact, damage):
    path = save_artifact(artifact, tmp_path / "art")
    target = path / "experts.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 3]
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"experts\.safetensors is corrupted"):
        load_artifact(path)


def _edit_manifest(path, edit):
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _rewrite_tensors(path, name, tensors):
    """Replace the tensor file ``name`` and its checksum, as a deliberate edit would."""
    save_file(tensors, path / name)
    digest = hashlib.sha256((path / name).read_bytes()).hexdigest()
    _edit_manifest(path, lambda m: m["checksums"].update({name: digest}))


def test_newer_format_version_asks_for_an_upgrade(tmp_path, artifact):
    path = save_artifact(artifact, tmp_path / "art")
    _edit_manifest(path, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ArtifactError, match="Upgrade esmpp"):
        load_artifact(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("tasks"), "no 'tasks'"),
        (lambda m: m.update(tasks="cars"), "'tasks' is str, expected list"),
        (lambda m: m.update(format_version="1"), "'format_version' is str"),
        (lambda m: m["checksums"].update({"../../etc/passwd": "0"}), "expected exactly"),
        (
            lambda m: m.update(
                routed_layers=["transformer.resblocks.9.mlp.c_fc.weight"],
                ranks={"transformer.resblocks.9.mlp.c_fc.weight": 4},
            ),
            "no experts",
        ),
    ],
)
def test_malformed_manifest_is_named(tmp_path, artifact, edit, message):
    path = save_artifact(artifact, tmp_path / "art")
    _edit_manifest(path, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(path)


def _drop_last_routed_layer(manifest):
    del manifest["ranks"][manifest["routed_layers"].pop()]


def _claim_rank_7(manifest):
    manifest["ranks"] = dict.fromkeys(manifest["ranks"], 7)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # The layer's experts are still in experts.safetensors: the model would silently lose a routed layer.
        (_drop_last_routed_layer, r"experts\.safetensors holds 3 tensors the manifest does not list"),
        (lambda m: m["routed_layers"].append(m["routed_layers"][0]), "lists a layer more than once"),
        (_claim_rank_7, r"'ranks' gives .* rank 7, but experts\.safetensors holds rank-4 experts"),
        (lambda m: m["ranks"].popitem(), "'ranks' must give the rank of exactly the 'routed_layers'"),
        (lambda m: m["tasks"][1].update(name="task0"), r"task names \['task0'\] are used more than once"),
    ],
    ids=["layer dropped", "layer twice", "wrong rank", "rank missing", "task name twice"],
)
def test_manifest_that_does_not_describe_the_tensors_is_refused(tmp_path, artifact, edit, message):
    path = save_artifact(artifact, tmp_path / "art")
    _edit_manifest(path, edit)
    with pytest.raises(ArtifactError, match=message) as refusal:
        load_artifact(path)
    assert str(path) in str(refusal.value) and "ebuild" in str(refusal.value)


def test_tensors_the_manifest_does_not_list_are_refused(tmp_path, artifact):
    path = save_artifact(artifact, tmp_path / "art")
    for name, extra in [("heads.safetensors", "head.3"), ("experts.safetensors", "stray.up")]:
        tensors = load_file(path / name)
        _rewrite_tensors(path, name, {**tensors, extra: torch.zeros(2, 16)})
        with pytest.raises(ArtifactError, match=rf"{name} holds 1 tensors the manifest does not list \({extra}\)"):
            load_artifact(path)
        _rewrite_tensors(path, name, tensors)
    load_artifact(path)


def test_format_1_manifest_over_router_biases_is_refused(tmp_path):
    path = save_artifact(random_artifact(discriminant=True), tmp_path / "art")
    _edit_manifest(path, lambda m: m.update(format_version=1))
    with pytest.raises(ArtifactError, match=r"format_version 1 has no router biases, but experts\.safetensors holds"):
        load_artifact(path)


def test_duplicate_task_names_are_not_saved(tmp_path, artifact):
    artifact.tasks[2].name = "task0"
    with pytest.raises(ArtifactError, match=r"task names \['task0'\] are used more than once"):
        save_artifact(artifact, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_missing_directory_and_manifest(tmp_path, artifact):
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        load_artifact(tmp_path / "nothing")
    damaged = save_artifact(artifact, tmp_path / "damaged")
    (damaged / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing: .*damaged is not a complete esmpp artifact"):
        load_artifact(damaged)


def _export(folder):
    (folder / "export.json").write_text("{}")


def _zoo(folder):
    (folder / MANIFEST).write_text(json.dumps({"preset": {"name": "tiny"}, "tasks": {"digits": {}}}))


# What the loader is given instead of an artifact, and what it says (it said "not a complete esmpp artifact.
# Rebuild it." of the first, "not an esmpp artifact manifest. Rebuild the artifact." of a zoo, and advised
# building onto a file).
NOT_ARTIFACTS = {
    "an empty folder": (lambda folder: None, "is not an artifact (it holds no manifest.json): give an artifact folder"),
    "an ONNX export": (_export, "is an esmpp ONNX export, not an artifact: give an artifact folder"),
    "a zoo": (_zoo, "is an esmpp zoo, not an artifact: give an artifact folder"),
}


@pytest.mark.parametrize(("make", "said"), NOT_ARTIFACTS.values(), ids=NOT_ARTIFACTS.keys())
def test_a_folder_that_is_no_artifact_is_named_as_what_it_is(tmp_path, make, said):
    folder = tmp_path / "given"
    folder.mkdir()
    make(folder)
    for load in (read_manifest, load_artifact):
        with pytest.raises(ArtifactError) as refused:
            load(folder)
        assert str(refused.value) == f"{folder} {said} (what `esmpp build` writes to --out)."


def test_a_file_is_named_as_a_file_and_one_of_an_artifact_its_folder(tmp_path, artifact):
    (tmp_path / "cat.png").write_bytes(b"pixels")
    with pytest.raises(ArtifactError, match=r"cat\.png is a file, not an artifact: give an artifact folder"):
        load_artifact(tmp_path / "cat.png")
    path = save_artifact(artifact, tmp_path / "art")
    with pytest.raises(ArtifactError) as refused:
        load_artifact(path / MANIFEST)
    assert str(refused.value) == f"{path / MANIFEST} is a file of the artifact in {path}: give that folder."


def test_a_folder_holding_artifacts_names_them(tmp_path, artifact):
    """demo's --out holds its artifact in artifact/: given the --out, the loader said to rebuild it."""
    first = save_artifact(artifact, tmp_path / "out" / "artifact")
    (tmp_path / "out" / "compare.json").write_text("{}")
    with pytest.raises(ArtifactError) as refused:
        load_artifact(tmp_path / "out")
    assert str(refused.value) == f"{tmp_path / 'out'} is not an artifact, but holds one in {first}: give that folder."
    second = save_artifact(artifact, tmp_path / "out" / "other")
    with pytest.raises(ArtifactError, match=re.escape(f"holds 2: give one of {first}, {second}.")):
        read_manifest(tmp_path / "out")


def test_a_subfolder_whose_manifest_links_out_of_it_is_not_named(tmp_path, artifact):
    """Telling what a folder holds reads no file through a link out of it, as loading does not."""
    elsewhere = save_artifact(artifact, tmp_path / "elsewhere")
    (tmp_path / "out" / "linked").mkdir(parents=True)
    (tmp_path / "out" / "linked" / MANIFEST).symlink_to(elsewhere / MANIFEST)
    with pytest.raises(ArtifactError, match=r"out is not an artifact \(it holds no manifest\.json\)"):
        load_artifact(tmp_path / "out")


def test_inconsistent_experts_are_refused_and_nothing_is_written(tmp_path, artifact):
    key = next(iter(artifact.experts))
    layer = artifact.experts[key]
    artifact.experts[key] = Experts(layer.up, layer.down[:2], layer.prototypes)
    with pytest.raises(ArtifactError, match="inconsistent"):
        save_artifact(artifact, tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_directory(tmp_path, artifact, monkeypatch):
    import esmpp.artifact as module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "_sha256", broken)
    with pytest.raises(StorageError, match=r"could not write .*art \(disk full\)"):
        save_artifact(artifact, tmp_path / "art")
    assert list(tmp_path.iterdir()) == []
