"""The ESM++ artifact: one directory, safetensors for every tensor, a JSON manifest that describes them.

Layout::

    manifest.json          format version, architecture, tasks + class names, routed layers, ranks, α,
                           build options, and the sha256 of each tensor file
    backbone.safetensors   the merged visual tower (open_clip keys)
    experts.safetensors    per routed layer ``<key>.up`` [T,d_out,r], ``<key>.down`` [T,r,d_in],
                           ``<key>.prototypes`` [T,m,d_in], and with the discriminant router
                           ``<key>.prototype_bias`` [T,m] (format 2; format 1 has the cosine router only)
    heads.safetensors      ``head.<t>`` [C_t, embed_dim] per task, logits = normalize(embedding) @ headᵀ

Written atomically; loading validates the manifest, the checksums and every shape, refuses tensors and
ranks the manifest does not describe, and names what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import esmpp
from esmpp.architecture import PATCH_KEY, Architecture, block_index, build_visual, routed_kind
from esmpp.atomic import atomic_directory, check_destination
from esmpp.errors import ArchitectureError, ArtifactError
from esmpp.folders import MANIFEST, folder_kind, is_artifact, is_zoo
from esmpp.runtime.model import Experts, RoutedEncoder

# 2: the discriminant router's ``prototype_bias``. A reader of format 1 would take its weights for cosine
# prototypes and route silently wrong, so it must refuse these artifacts; format 1 still loads here (and
# a format-1 manifest over experts with biases is refused: the version was edited).
FORMAT_VERSION = 2
_FIRST_FORMAT_WITH_ROUTER_BIAS = 2
TENSOR_FILES = ("backbone.safetensors", "experts.safetensors", "heads.safetensors")
_EXPERT_PARTS = ("up", "down", "prototypes")
_OPTIONAL_EXPERT_PARTS = ("prototype_bias",)


def repeated_names(names: list[str]) -> list[str]:
    """The names used more than once in ``names``, sorted: an artifact's tasks need distinct names, since
    ``predict(task=name)`` would only ever reach the first of them."""
    return sorted({name for name in names if names.count(name) > 1})


def expert_ranks(experts: dict[str, Experts]) -> dict[str, int]:
    """The rank of each routed layer's experts, as the manifest records it."""
    return {key: int(layer.up.shape[2]) for key, layer in experts.items()}


def _expert_tensors(experts: dict[str, Experts]) -> dict[str, torch.Tensor]:
    """Every tensor of the routed layers under its file name ``<key>.<part>``."""
    return {
        f"{key}.{part}": getattr(layer, part)
        for key, layer in experts.items()
        for part in (*_EXPERT_PARTS, *_OPTIONAL_EXPERT_PARTS)
        if getattr(layer, part) is not None
    }


@dataclass
class TaskInfo:
    name: str
    classes: list[str]


@dataclass
class Artifact:
    """Everything the runtime needs; ``build`` records how it was made (method, α, ranks...).

    ``timings`` (seconds per build stage) are reported but not saved: the same inputs must give the same
    bytes on disk."""

    arch: Architecture
    tasks: list[TaskInfo]
    backbone: dict[str, torch.Tensor]
    experts: dict[str, Experts]
    heads: list[torch.Tensor]
    build: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def validate(self, source: str = "artifact") -> None:
        """Check that experts, prototypes and heads agree with each other, the tasks and the architecture."""
        T = len(self.tasks)
        if T == 0:
            raise ArtifactError(f"{source}: no tasks. Rebuild it with `esmpp build`.")
        repeated = repeated_names([task.name for task in self.tasks])
        if repeated:
            raise ArtifactError(
                f"{source}: task names {repeated} are used more than once. Give each task its own name and rebuild."
            )
        tensors = {
            **{f"backbone {key}": value for key, value in self.backbone.items()},
            **_expert_tensors(self.experts),
            **{f"head {t}": head for t, head in enumerate(self.heads)},
        }
        for name, tensor in tensors.items():
            if tensor.dtype != torch.float32:  # the runtime computes in float32 and mixes these tensors freely
                raise ArtifactError(f"{source}: {name} is {tensor.dtype}, expected torch.float32. Rebuild it.")
        if len(self.heads) != T:
            raise ArtifactError(f"{source}: {len(self.heads)} heads for {T} tasks. Rebuild it with `esmpp build`.")
        for t, (task, head) in enumerate(zip(self.tasks, self.heads)):
            if head.ndim != 2 or head.shape != (len(task.classes), self.arch.embed_dim):
                raise ArtifactError(
                    f"{source}: head of task {task.name!r} has shape {tuple(head.shape)}, expected "
                    f"({len(task.classes)}, {self.arch.embed_dim}) (classes × embed_dim). Rebuild it."
                )
            if not torch.isfinite(head).all():
                raise ArtifactError(f"{source}: head {t} ({task.name!r}) has non-finite values. Rebuild it.")
        with torch.device("meta"):  # shapes only: a manifest may claim a huge architecture
            reference = {key: value.shape for key, value in build_visual(self.arch).state_dict().items()}
        missing = sorted(set(reference) - set(self.backbone))
        extra = sorted(set(self.backbone) - set(reference))
        if missing or extra:
            raise ArtifactError(
                f"{source}: backbone keys do not match architecture {self.arch.name!r}: missing {missing[:3]}, "
                f"unexpected {extra[:3]}. The artifact is corrupted or from another architecture; rebuild it."
            )
        for key, tensor in self.backbone.items():
            if tensor.shape != reference[key]:
                raise ArtifactError(
                    f"{source}: backbone {key!r} has shape {tuple(tensor.shape)}, expected "
                    f"{tuple(reference[key])}. Rebuild the artifact."
                )
        if not self.experts:
            raise ArtifactError(f"{source}: no routed layers. Rebuild it with `esmpp build`.")
        for key, layer in self.experts.items():
            if routed_kind(key) is None or key not in reference:
                raise ArtifactError(f"{source}: routed layer {key!r} is not a linear layer of this architecture.")
            d_out, d_in = reference[key][0], reference[key].numel() // reference[key][0]
            up, down, protos = layer.up, layer.down, layer.prototypes
            ok = (
                up.ndim == 3
                and down.ndim == 3
                and protos.ndim == 3
                and up.shape[0] == down.shape[0] == protos.shape[0] == T
                and up.shape[1] == d_out
                and down.shape[2] == d_in
                and protos.shape[2] == d_in
                and up.shape[2] == down.shape[1]
            )
            if not ok:
                raise ArtifactError(
                    f"{source}: experts of {key!r} are inconsistent: up {tuple(up.shape)}, down "
                    f"{tuple(down.shape)}, prototypes {tuple(protos.shape)}; expected [T={T}, {d_out}, r], "
                    f"[T, r, {d_in}], [T, m, {d_in}]. Rebuild the artifact."
                )
            bias = layer.prototype_bias
            if bias is not None and bias.shape != protos.shape[:2]:
                raise ArtifactError(
                    f"{source}: {key}.prototype_bias has shape {tuple(bias.shape)}, expected "
                    f"{tuple(protos.shape[:2])} (tasks × prototypes). Rebuild the artifact."
                )
        for name, tensor in _expert_tensors(self.experts).items():
            if not torch.isfinite(tensor).all():
                raise ArtifactError(f"{source}: {name} has non-finite values. Rebuild the artifact.")

    def to_model(self) -> RoutedEncoder:
        self.validate()
        return RoutedEncoder(self.arch, self.backbone, self.experts, self.heads)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}


def describe_artifact(artifact: Artifact) -> dict[str, Any]:
    """The manifest of ``artifact`` without the checksums (which exist only once its files are written)."""
    return {
        "format": "esmpp-artifact",
        "format_version": FORMAT_VERSION,
        "esmpp_version": esmpp.__version__,
        "architecture": artifact.arch.to_dict(),
        "tasks": [{"name": task.name, "classes": task.classes} for task in artifact.tasks],
        "routed_layers": list(artifact.experts),
        "ranks": expert_ranks(artifact.experts),
        "build": artifact.build,
    }


def check_artifact_destination(path: Path, overwrite: bool = False, elsewhere: str = "choose another --out") -> None:
    """Fail now, before the long work, where :func:`save_artifact` would fail at the end (see
    :func:`check_destination`): ``path`` exists and is not an artifact to replace, or cannot be written."""
    check_destination(path, overwrite, elsewhere, marker=MANIFEST, owns=is_artifact)


def save_artifact(
    artifact: Artifact, path: Path, overwrite: bool = False, elsewhere: str = "choose another --out"
) -> Path:
    """Validate ``artifact`` and write it to the directory ``path`` atomically; a failed write says how to
    write ``elsewhere`` (see :func:`atomic_directory`)."""
    artifact.validate()
    path = Path(path)
    expert_tensors = _expert_tensors(artifact.experts)
    with atomic_directory(path, overwrite, elsewhere, marker=MANIFEST, owns=is_artifact) as staging:
        save_file(_contiguous(artifact.backbone), staging / "backbone.safetensors")
        save_file(_contiguous(expert_tensors), staging / "experts.safetensors")
        save_file(_contiguous({f"head.{t}": h for t, h in enumerate(artifact.heads)}), staging / "heads.safetensors")
        manifest = {
            **describe_artifact(artifact),
            "checksums": {name: _sha256(staging / name) for name in TENSOR_FILES},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return path


def _require(manifest: dict[str, Any], key: str, kind: type | tuple[type, ...], source: Path) -> Any:
    if key not in manifest:
        raise ArtifactError(f"{source}: manifest has no {key!r}. The artifact is incomplete; rebuild it.")
    value = manifest[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ArtifactError(
            f"{source}: manifest field {key!r} is {type(value).__name__}, expected {getattr(kind, '__name__', kind)}."
            " The manifest was edited or corrupted; rebuild the artifact."
        )
    return value


def _member(path: Path, name: str, missing: str) -> Path:
    """``path/name`` if it is a regular file inside ``path``. A link pointing elsewhere is refused: an artifact
    from a stranger (a tarball, say) must not make the loader read files outside its directory."""
    file = path / name
    if not file.is_file():
        raise ArtifactError(f"{file} is missing: {missing}")
    if file.resolve().parent != path.resolve():
        raise ArtifactError(f"{file} is a link to a file outside the artifact directory; copy the file itself in.")
    return file


# What every command that loads an artifact (predict, inspect, export, Predictor.load) takes.
_GIVE_AN_ARTIFACT = "give an artifact folder (what `esmpp build` writes to --out)"


def _holds_artifact(folder: Path) -> bool:
    """Whether ``folder`` is an artifact by its own manifest.json: a link out of it is not read (see
    :func:`_member`)."""
    manifest = folder / MANIFEST
    return manifest.is_file() and manifest.resolve().parent == folder.resolve() and is_artifact(folder)


def _has_artifact_files(folder: Path, names: tuple[str, ...] = (MANIFEST, *TENSOR_FILES)) -> bool:
    """Whether ``folder`` has any of the files ``names`` (default: an artifact's own), even as a broken link:
    told by name, none is opened."""
    return any((folder / name).exists() or (folder / name).is_symlink() for name in names)


def _artifacts_held(folder: Path) -> list[Path]:
    """The subfolders of ``folder`` that are artifacts by their own manifests. A subfolder that is a link is
    skipped: it may lead out of ``folder``, whose files alone are read."""
    try:
        return [
            child
            for child in sorted(folder.iterdir())
            if child.is_dir() and not child.is_symlink() and _holds_artifact(child)
        ]
    except OSError:  # unreadable: a folder without artifacts, as far as can be told
        return []


def names_an_artifact(path: Path) -> bool:
    """Whether the loader takes ``path`` for an artifact, whole or damaged (a folder with a manifest.json that is
    no zoo's or any of an artifact's tensor files), or for a folder holding artifacts in subfolders, which it
    names: the rule by which ``esmpp eval`` tells an artifact from a checkpoint folder, so that the loader's
    messages are the ones given. Only files inside ``path`` are read."""
    if not path.is_dir() or is_zoo(path):
        return False
    return _has_artifact_files(path) or (folder_kind(path) is None and bool(_artifacts_held(path)))


def _refuse_what_is_no_artifact(path: Path) -> None:
    """Before the manifest is read, refuse a ``path`` that has none, saying what it is instead: missing, a file,
    an ONNX export, a folder that holds artifacts in subfolders (named), or any other folder. A folder holding
    some of an artifact's tensor files passes: it is a damaged artifact, which :func:`read_manifest` names as
    such."""
    if not path.exists():
        raise ArtifactError(f"{path} is not an artifact directory. Create one with `esmpp build CONFIG --out {path}`.")
    if not path.is_dir():
        # Told by the names beside it, not by reading their manifest: only the path given is the loader's to read.
        if _has_artifact_files(path.parent, TENSOR_FILES):
            raise ArtifactError(f"{path} is a file of the artifact in {path.parent}: give that folder.")
        raise ArtifactError(f"{path} is a file, not an artifact: {_GIVE_AN_ARTIFACT}.")
    if _has_artifact_files(path):
        return
    if (kind := folder_kind(path)) is not None:
        raise ArtifactError(f"{path} is {kind}, not an artifact: {_GIVE_AN_ARTIFACT}.")
    held = [str(child) for child in _artifacts_held(path)]
    if len(held) == 1:
        raise ArtifactError(f"{path} is not an artifact, but holds one in {held[0]}: give that folder.")
    if held:
        raise ArtifactError(f"{path} is not an artifact, but holds {len(held)}: give one of {', '.join(held)}.")
    raise ArtifactError(f"{path} is not an artifact (it holds no {MANIFEST}): {_GIVE_AN_ARTIFACT}.")


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and validate ``path/manifest.json`` (format, version, field types); tensors are not read."""
    path = Path(path)
    _refuse_what_is_no_artifact(path)
    manifest_path = _member(path, MANIFEST, f"{path} is not a complete esmpp artifact. Rebuild it.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: deep nesting
        raise ArtifactError(f"{manifest_path} is not valid JSON ({exc}). Rebuild the artifact.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "esmpp-artifact":
        if (kind := folder_kind(path)) is not None:  # a zoo's manifest, read from inside the folder as above
            raise ArtifactError(f"{path} is {kind}, not an artifact: {_GIVE_AN_ARTIFACT}.")
        raise ArtifactError(f"{manifest_path} is not an esmpp artifact manifest. Rebuild the artifact.")
    version = _require(manifest, "format_version", int, manifest_path)
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path} has format version {version}, newer than this esmpp understands ({FORMAT_VERSION}). "
            "Upgrade esmpp (pip install -U esmpp) to load it."
        )
    if version < 1:
        raise ArtifactError(f"{manifest_path}: invalid format version {version}.")
    try:
        Architecture.from_dict(_require(manifest, "architecture", dict, manifest_path))
    except ArchitectureError as exc:
        raise ArtifactError(f"{manifest_path}: {exc} Rebuild the artifact.") from exc
    tasks = _require(manifest, "tasks", list, manifest_path)
    for task in tasks:
        if not (
            isinstance(task, dict)
            and isinstance(task.get("name"), str)
            and isinstance(task.get("classes"), list)
            and all(isinstance(c, str) for c in task["classes"])
        ):
            raise ArtifactError(f"{manifest_path}: malformed task entry {task!r}; expected {{name, classes}}.")
    routed = _require(manifest, "routed_layers", list, manifest_path)
    if not all(isinstance(key, str) for key in routed):
        raise ArtifactError(f"{manifest_path}: 'routed_layers' must be a list of parameter names.")
    if len(set(routed)) != len(routed):
        raise ArtifactError(f"{manifest_path}: 'routed_layers' lists a layer more than once. Rebuild the artifact.")
    ranks = _require(manifest, "ranks", dict, manifest_path)
    if not all(isinstance(rank, int) for rank in ranks.values()):
        raise ArtifactError(f"{manifest_path}: 'ranks' must map routed layers to integers.")
    if set(ranks) != set(routed):
        raise ArtifactError(
            f"{manifest_path}: 'ranks' must give the rank of exactly the 'routed_layers'. Rebuild the artifact."
        )
    _require(manifest, "build", dict, manifest_path)
    checksums = _require(manifest, "checksums", dict, manifest_path)
    if set(checksums) != set(TENSOR_FILES):
        # The file names are fixed by the format: a manifest can never point outside the directory.
        raise ArtifactError(
            f"{manifest_path}: checksums list {sorted(checksums)}, expected exactly {list(TENSOR_FILES)}."
        )
    return manifest


def _load_tensors(path: Path, name: str, expected: str) -> dict[str, torch.Tensor]:
    file = _member(path, name, "the artifact is incomplete; rebuild it.")
    digest = _sha256(file)
    if digest != expected:
        raise ArtifactError(
            f"{file} is corrupted or was modified: sha256 {digest[:12]}… does not match the manifest's "
            f"{str(expected)[:12]}…. Copy the artifact again or rebuild it."
        )
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{file} is not a readable safetensors file ({exc}). Rebuild the artifact.") from exc


def load_artifact(path: Path) -> Artifact:
    """Load and validate an artifact directory; ``ArtifactError`` names the file and the problem."""
    path = Path(path)
    manifest = read_manifest(path)
    tensors = {name: _load_tensors(path, name, manifest["checksums"][name]) for name in TENSOR_FILES}
    stored_blocks = {block_index(key) for key in tensors["backbone.safetensors"]} - {None}
    try:
        arch = Architecture.from_dict(manifest["architecture"])
        # Building even a shapes-only tower costs time per layer: check the depth against the file first.
        if arch.layers != len(stored_blocks):
            raise ValueError(f"{arch.layers} layers, but backbone.safetensors holds {len(stored_blocks)} blocks")
        with torch.device("meta"):
            build_visual(arch)
    except (ArchitectureError, ValueError, TypeError, KeyError) as exc:
        raise ArtifactError(f"{path / MANIFEST}: invalid architecture ({exc}). Rebuild the artifact.") from exc
    experts_file = tensors["experts.safetensors"]
    experts = {}
    for key in manifest["routed_layers"]:
        names = [f"{key}.{part}" for part in _EXPERT_PARTS]
        if any(name not in experts_file for name in names) or (block_index(key) is None and key != PATCH_KEY):
            raise ArtifactError(f"{path / 'experts.safetensors'}: no experts for routed layer {key!r}. Rebuild it.")
        bias = experts_file.get(f"{key}.prototype_bias")
        if bias is not None and manifest["format_version"] < _FIRST_FORMAT_WITH_ROUTER_BIAS:
            # A format-1 reader would route with these weights as cosine prototypes: the version is wrong.
            raise ArtifactError(
                f"{path / MANIFEST}: format_version {manifest['format_version']} has no router biases, but "
                f"experts.safetensors holds {key}.prototype_bias. Rebuild the artifact."
            )
        experts[key] = Experts(*(experts_file[name] for name in names), bias)
    _refuse_unlisted(path / "experts.safetensors", experts_file, _expert_tensors(experts))
    heads_file = tensors["heads.safetensors"]
    tasks = [TaskInfo(task["name"], list(task["classes"])) for task in manifest["tasks"]]
    try:
        heads = {f"head.{t}": heads_file[f"head.{t}"] for t in range(len(tasks))}
    except KeyError as exc:
        raise ArtifactError(f"{path / 'heads.safetensors'}: missing {exc}. Rebuild the artifact.") from exc
    _refuse_unlisted(path / "heads.safetensors", heads_file, heads)
    artifact = Artifact(arch, tasks, tensors["backbone.safetensors"], experts, list(heads.values()), manifest["build"])
    artifact.validate(str(path))
    stored_ranks = expert_ranks(experts)  # the shapes are known to be consistent once validated
    wrong = [key for key, rank in manifest["ranks"].items() if rank != stored_ranks[key]]
    if wrong:
        key = wrong[0]
        raise ArtifactError(
            f"{path / MANIFEST}: 'ranks' gives {key!r} rank {manifest['ranks'][key]}, but experts.safetensors holds "
            f"rank-{stored_ranks[key]} experts for it ({len(wrong)} layers differ). Rebuild the artifact."
        )
    return artifact


def _refuse_unlisted(file: Path, stored: dict[str, torch.Tensor], listed: dict[str, torch.Tensor]) -> None:
    """Refuse tensors in ``file`` that the manifest does not account for: a layer dropped from 'routed_layers'
    or a head of a task no longer listed would otherwise be left out of the model without a word."""
    unlisted = sorted(set(stored) - set(listed))
    if unlisted:
        raise ArtifactError(
            f"{file} holds {len(unlisted)} tensors the manifest does not list ({', '.join(unlisted[:3])}). "
            "The manifest was edited or the file replaced; rebuild the artifact."
        )
