"""Shared fixtures: a tiny open_clip ViT (width 32, 2 layers, 2 heads, patch 8, 16×16 images)."""

from __future__ import annotations

import pytest
import torch

from esmpp.architecture import Architecture, build_visual


@pytest.fixture
def tiny_arch() -> Architecture:
    return Architecture(
        embed_dim=16,
        vision={"width": 32, "layers": 2, "patch_size": 8, "image_size": 16, "head_width": 16},
        name="tiny",
    )


@pytest.fixture
def tiny_visual(tiny_arch: Architecture) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_visual(tiny_arch)


@pytest.fixture
def tiny_images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
