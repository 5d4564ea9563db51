"""Turning images into the normalised tensors an encoder expects.

Two doors: ``preprocess_uint8`` for datasets already at the model's size (the zoo, benchmarks), and
``load_image`` / ``preprocess_images`` for what users send (paths, PIL images, arrays, tensors).
"""

from __future__ import annotations

import numpy as np
import torch

from esmpp.architecture import Architecture


def normalise(pixels: torch.Tensor, arch: Architecture) -> torch.Tensor:
    """``pixels`` [N, 3, H, W] in [0, 1] → normalised with the architecture's mean and std."""
    mean = torch.tensor(arch.mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(arch.std, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean) / std


def preprocess_uint8(images: np.ndarray, arch: Architecture) -> torch.Tensor:
    """``images`` uint8 [N, H, W, 3] at the model's size → float32 [N, 3, H, W], normalised."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return normalise(pixels, arch)
