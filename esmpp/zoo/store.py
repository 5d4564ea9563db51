"""A built zoo on disk and its read-only view, ``Zoo``.

Layout of a zoo directory::

    manifest.json                    recipe, sizes, seeds, accuracies, build time, architecture
    pretrained.safetensors           θ0, canonical visual keys
    tasks/<task>/finetuned.safetensors   θt
    tasks/<task>/head.safetensors    frozen head [num_classes, embed_dim] under key "head"
    tasks/<task>/data.npz            <split>_images uint8 [N, H, W, 3], <split>_labels int64 [N]

Checkpoints are written with ``esmpp.checkpoints.save_encoder`` (architecture in the safetensors metadata).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from esmpp.architecture import Architecture
from esmpp.errors import DatasetError
from esmpp.folders import MANIFEST, folder_kind, zoo_manifest
from esmpp.zoo.datasets import SPLITS

PRETRAINED = "pretrained.safetensors"
FINETUNED = "finetuned.safetensors"
HEAD = "head.safetensors"
DATA = "data.npz"
FORMAT_VERSION = 1


class Zoo:
    """A built zoo: pretrained and fine-tuned checkpoints, frozen heads and data splits of each task."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.arch = Architecture.from_dict(manifest["architecture"])
        self.tasks: list[str] = list(manifest["tasks"])

    @classmethod
    def load(cls, root: str | Path, elsewhere: str = "build the zoo in another folder") -> Zoo:
        """Open the zoo built in ``root``; a folder that holds something else is refused with how to build
        the zoo ``elsewhere``."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise DatasetError(
                f"No zoo in {root}: {MANIFEST} is missing. Build one with `esmpp zoo build` (or esmpp.zoo.build_zoo)."
            )
        manifest = zoo_manifest(root)
        if manifest is None:
            kind = folder_kind(root)
            found = f"it is {kind}" if kind is not None else f"its {MANIFEST} is not a zoo's, or not readable"
            raise DatasetError(f"No zoo in {root}: {found}; {elsewhere}.")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"The zoo in {root} has format version {manifest.get('format_version')!r}, this esmpp reads "
                f"{FORMAT_VERSION}. Rebuild it with `esmpp zoo build --force`."
            )
        return cls(root, manifest)

    def __repr__(self) -> str:
        return f"Zoo({str(self.root)!r}, preset={self.preset_name!r}, tasks={self.tasks})"

    @property
    def preset_name(self) -> str:
        """The name of the preset the zoo was built from (tiny, mini, or a variant's)."""
        return self.manifest["preset"]["name"]

    def _task_dir(self, task: str) -> Path:
        if task not in self.tasks:
            raise DatasetError(f"Task {task!r} is not in the zoo at {self.root}; it has: {', '.join(self.tasks)}.")
        return self.root / "tasks" / task

    @property
    def pretrained_path(self) -> Path:
        return self.root / PRETRAINED

    def finetuned_path(self, task: str) -> Path:
        return self._task_dir(task) / FINETUNED

    def head(self, task: str) -> torch.Tensor:
        """Frozen head of ``task`` [num_classes, embed_dim], scale folded in (see esmpp.evaluation)."""
        return load_file(self._task_dir(task) / HEAD)["head"]

    def class_names(self, task: str) -> list[str]:
        self._task_dir(task)
        return list(self.manifest["tasks"][task]["class_names"])

    def split(self, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images uint8 [N, H, W, 3], labels int64 [N])`` of ``split`` in train/val/test/proxy."""
        if split not in SPLITS:
            raise DatasetError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
        path = self._task_dir(task) / DATA
        data = _read_npz(path, path.stat().st_mtime_ns)
        return data[f"{split}_images"], data[f"{split}_labels"]


@cache
def _read_npz(path: Path, modified_ns: int) -> dict[str, np.ndarray]:
    # Cached (keyed by modification time, so a rebuilt zoo is re-read): evaluation asks for the same
    # splits once per method.
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}
