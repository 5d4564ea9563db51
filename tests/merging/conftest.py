from collections.abc import Callable

import pytest
import torch

from esmpp.architecture import Architecture, build_visual, linear_kind
from esmpp.merging import LayerStats

TINY = Architecture(embed_dim=8, vision={"image_size": 8, "patch_size": 4, "width": 16, "layers": 2, "head_width": 8})

TaskVectors = dict[str, list[torch.Tensor]]
Stats = dict[str, list[LayerStats]]


@pytest.fixture(scope="session")
def tiny_shapes() -> dict[str, torch.Size]:
    """Parameter shapes of a 2-block, width-16 open_clip ViT."""
    return {key: value.shape for key, value in build_visual(TINY).state_dict().items()}


def random_stats(d_in: int, generator: torch.Generator, num_tokens: int = 40) -> LayerStats:
    """Statistics of anisotropic, offset random tokens (``num_tokens × d_in``)."""
    scales = torch.logspace(-1, 1, d_in, dtype=torch.float64)
    tokens = torch.randn(num_tokens, d_in, generator=generator, dtype=torch.float64) * scales + 0.3
    return LayerStats(gram=tokens.T @ tokens, mean=tokens.mean(0), num_tokens=num_tokens)


@pytest.fixture
def make_stats() -> Callable[[int, torch.Generator], LayerStats]:
    """Factory: (d_in, generator) → LayerStats of random tokens."""
    return random_stats


@pytest.fixture
def tiny_task_vectors(tiny_shapes) -> Callable[[int, int], tuple[TaskVectors, Stats]]:
    """Factory: (num_tasks, seed) → random task vectors of the tiny ViT, LayerStats of its linear layers."""

    def make(num_tasks: int, seed: int = 0) -> tuple[TaskVectors, Stats]:
        generator = torch.Generator().manual_seed(seed)
        deltas = {
            key: [0.01 * torch.randn(shape, generator=generator) for _ in range(num_tasks)]
            for key, shape in tiny_shapes.items()
        }
        stats = {
            key: [random_stats(shape[1], generator) for _ in range(num_tasks)]
            for key, shape in tiny_shapes.items()
            if linear_kind(key) is not None
        }
        return deltas, stats

    return make
