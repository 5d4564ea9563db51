from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esmpp.architecture import Architecture, build_visual
from esmpp.zoo.presets import TrainRecipe
from esmpp.zoo.training import class_mean_head, shifted, train, warmup_cosine


@settings(deadline=None, max_examples=50)
@given(steps=st.integers(2, 500), warmup_fraction=st.floats(0.0, 0.5))
def test_schedule_warms_up_then_decays_to_zero(steps: int, warmup_fraction: float) -> None:
    factors = [warmup_cosine(step, steps, warmup_fraction) for step in range(steps)]
    peak = int(np.argmax(factors))
    assert factors[peak] == pytest.approx(1.0)
    assert all(0.0 <= f <= 1.0 for f in factors)
    pairs = list(itertools.pairwise(factors))
    assert all(a <= b + 1e-12 for a, b in pairs[:peak])
    assert all(a >= b - 1e-12 for a, b in pairs[peak:])
    assert warmup_cosine(steps, steps, warmup_fraction) == pytest.approx(0.0, abs=1e-12)


def test_shift_moves_the_batch_and_zero_shift_is_identity() -> None:
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    generator = torch.Generator().manual_seed(0)
    assert shifted(images, 0, generator) is images
    moved = [shifted(images, 2, generator) for _ in range(8)]
    assert all(m.shape == images.shape for m in moved)
    assert any(not torch.equal(m, images) for m in moved)


ARCH = Architecture(embed_dim=16, vision={"image_size": 8, "layers": 1, "width": 16, "patch_size": 4, "head_width": 8})


def test_class_mean_head_points_at_each_class_mean() -> None:
    torch.manual_seed(0)
    encoder = build_visual(ARCH)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 4)
    head = class_mean_head(encoder, images, labels, 3, ARCH, scale=5.0)
    assert head.shape == (3, 16)
    torch.testing.assert_close(head.norm(dim=1), torch.full((3,), 5.0))


def test_training_with_a_frozen_head_lowers_the_loss_and_keeps_the_head() -> None:
    torch.manual_seed(0)
    encoder = build_visual(ARCH)
    images, labels = torch.randn(16, 3, 8, 8), torch.arange(16) % 2
    head = torch.nn.functional.normalize(torch.randn(2, 16), dim=1) * 10.0
    frozen = head.clone()

    def loss() -> float:
        with torch.no_grad():
            logits = torch.nn.functional.normalize(encoder(images), dim=1) @ head.T
            return torch.nn.functional.cross_entropy(logits, labels).item()

    before = loss()
    recipe = TrainRecipe(steps=30, batch_size=16, lr=3e-3, weight_decay=0.0)
    train(encoder, head, lambda: (images, labels), recipe, description="test", progress=False)
    assert loss() < before
    assert torch.equal(head, frozen)
    assert not encoder.training
