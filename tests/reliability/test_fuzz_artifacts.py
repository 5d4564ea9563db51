"""Fuzzing artifact loading (`read_manifest`, `load_artifact`, then serving what was accepted) with damaged
manifests and tensor files. Checksums are recomputed after most edits: they detect accidents, not
attackers, so everything behind them must hold on its own. No file outside the artifact is ever opened."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from esmpp.artifact import MANIFEST, TENSOR_FILES, load_artifact, read_manifest, save_artifact
from esmpp.cli import inspect
from esmpp.errors import ArtifactError, EsmppError
from esmpp.runtime.predictor import Predictor
from tests.conftest import random_artifact
from tests.reliability.cases import attempt

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
dtypes = st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8, torch.bool])


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return save_artifact(random_artifact(num_tasks=2, rank=2), tmp_path_factory.mktemp("template") / "art")


@contextmanager
def _copy(template: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as root:
        yield Path(shutil.copytree(template, Path(root) / "art"))


_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _opened.append(str(Path(args[0] if not isinstance(args[0], bytes) else args[0].decode()).resolve()))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while ``_opened`` is a list


def _load_and_serve(path: Path) -> None:
    """The contract: read_manifest and load_artifact accept or raise EsmppError, opening only files inside
    ``path``; an accepted artifact serves predictions (or refuses them with an EsmppError)."""
    global _opened
    _opened = []
    try:
        attempt("read_manifest", read_manifest, path)
        attempt("esmpp inspect", inspect, path)
        artifact = attempt("load_artifact", load_artifact, path)
    finally:
        opened, _opened = _opened, None
    inside = str(path.resolve())
    outside = [name for name in opened if not name.startswith(inside + "/") and "site-packages" not in name]
    assert not outside, f"opened files outside the artifact: {outside}"
    if isinstance(artifact, EsmppError):
        assert isinstance(artifact, ArtifactError), artifact
        return
    images = list(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    predictor = attempt("Predictor", Predictor, artifact)
    if not isinstance(predictor, EsmppError):
        attempt("Predictor.predict", predictor.predict, images)


def _rehash(path: Path, name: str) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["checksums"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / MANIFEST).write_text(json.dumps(manifest))


@given(data=st.data())
def test_manifest_fields_deleted_or_replaced(template, data):
    with _copy(template) as path:
        manifest = json.loads((path / MANIFEST).read_text())
        container, key = None, None
        node = manifest
        while isinstance(node, (dict, list)) and node and (container is None or data.draw(st.booleans())):
            key = data.draw(st.sampled_from(sorted(node)) if isinstance(node, dict) else st.integers(0, len(node) - 1))
            container, node = node, node[key]
        if container is None:
            return
        if data.draw(st.booleans()):
            del container[key]
        else:
            container[key] = data.draw(json_values)
        (path / MANIFEST).write_text(json.dumps(manifest))
        _load_and_serve(path)


@given(
    vision=st.dictionaries(
        st.sampled_from(
            [
                "width",
                "layers",
                "patch_size",
                "image_size",
                "head_width",
                "mlp_ratio",
                "pool_type",
                "timm_model_name",
                "ls_init_value",
            ]
        ),
        st.integers(-3, 10**9) | st.floats(-1, 8) | st.text(max_size=4) | st.none(),
        max_size=3,
    ),
    embed_dim=st.integers(-2, 5000),
)
def test_architecture_values(template, vision, embed_dim):
    with _copy(template) as path:
        manifest = json.loads((path / MANIFEST).read_text())
        manifest["architecture"]["vision"].update(vision)
        manifest["architecture"]["embed_dim"] = embed_dim
        (path / MANIFEST).write_text(json.dumps(manifest))
        _load_and_serve(path)


@given(raw=st.binary(max_size=300) | st.integers(1, 100_000).map(lambda depth: b"[" * depth + b"]" * depth))
def test_manifest_bytes(template, raw):
    with _copy(template) as path:
        (path / MANIFEST).write_bytes(raw)
        _load_and_serve(path)


@given(
    name=st.sampled_from(TENSOR_FILES),
    damage=st.sampled_from(["truncate", "random", "header"]),
    where=st.floats(0, 1),
    noise=st.binary(min_size=1, max_size=32),
    rehash=st.booleans(),
)
def test_tensor_file_bytes(template, name, damage, where, noise, rehash):
    with _copy(template) as path:
        data = (path / name).read_bytes()
        if damage == "truncate":
            data = data[: int(where * len(data))]
        elif damage == "random":
            data = noise * 8
        else:  # inside the 8-byte length or the JSON header
            cut = int(where * min(len(data), 200))
            data = data[:cut] + noise + data[cut + len(noise) :]
        (path / name).write_bytes(data)
        if rehash:
            _rehash(path, name)
        _load_and_serve(path)


@given(
    name=st.sampled_from(TENSOR_FILES),
    edit=st.sampled_from(["drop", "extra", "shape", "dtype", "nonfinite", "empty"]),
    pick=st.integers(0, 10**6),
    shape=st.lists(st.integers(0, 5), max_size=4),
    dtype=dtypes,
    value=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
)
def test_tensor_contents(template, name, edit, pick, shape, dtype, value):
    with _copy(template) as path:
        tensors = load_file(path / name)
        key = sorted(tensors)[pick % len(tensors)]
        if edit == "drop":
            del tensors[key]
        elif edit == "extra":
            tensors[f"{key}.extra"] = torch.zeros(shape)
        elif edit == "shape":
            tensors[key] = torch.zeros(shape)
        elif edit == "dtype":
            tensors[key] = tensors[key].to(dtype)
        elif edit == "nonfinite":
            tensors[key] = tensors[key].clone().view(-1).index_fill(0, torch.tensor([0]), value).view_as(tensors[key])
        else:
            tensors = {}
        save_file(tensors, path / name)
        _rehash(path, name)
        _load_and_serve(path)


@pytest.mark.parametrize(
    "target", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../backbone.safetensors"]
)
def test_checksum_names_cannot_point_outside(template, target):
    with _copy(template) as path:
        outside = path.parent / "outside.safetensors"
        shutil.copy(path / "backbone.safetensors", outside)
        manifest = json.loads((path / MANIFEST).read_text())
        manifest["checksums"][target] = manifest["checksums"].pop("backbone.safetensors")
        (path / MANIFEST).write_text(json.dumps(manifest))
        _load_and_serve(path)
        assert isinstance(attempt("load_artifact", load_artifact, path), ArtifactError)


@pytest.mark.parametrize("name", [MANIFEST, *TENSOR_FILES])
def test_symlinks_out_of_the_artifact_are_not_followed(template, name):
    """A shipped artifact (say, a tarball) may hold links; the files they point to are not read."""
    with _copy(template) as path:
        outside = path.parent / f"outside-{name}"
        shutil.move(path / name, outside)
        (path / name).symlink_to(outside)
        _load_and_serve(path)
        assert isinstance(attempt("load_artifact", load_artifact, path), ArtifactError)


def test_unchanged_template_loads_and_serves(template):
    with _copy(template) as path:
        _load_and_serve(path)
        assert not isinstance(attempt("load_artifact", load_artifact, path), EsmppError)


def test_a_subfolder_that_links_to_an_artifact_elsewhere_is_not_read(template, tmp_path):
    """Naming the artifacts a folder holds reads their manifests: one behind a linked subfolder lies outside."""
    given = tmp_path / "given"
    given.mkdir()
    (given / "linked").symlink_to(template, target_is_directory=True)
    _load_and_serve(given)
    refused = attempt("load_artifact", load_artifact, given)
    assert isinstance(refused, ArtifactError) and "holds no manifest.json" in str(refused), refused


@pytest.mark.parametrize("name", [MANIFEST, *TENSOR_FILES])
def test_a_file_of_an_artifact_is_named_without_reading_the_files_beside_it(template, name):
    """Given one file, only that path is the loader's: it tells the artifact around it by the names there."""
    with _copy(template) as path:
        _load_and_serve(path / name)
        refused = attempt("load_artifact", load_artifact, path / name)
        assert str(refused) == f"{path / name} is a file of the artifact in {path}: give that folder."
