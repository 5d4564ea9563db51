from __future__ import annotations

import numpy as np
import pytest

from esmpp.zoo import procedural


@pytest.mark.parametrize(
    ("generate", "classes"),
    [
        (procedural.shapes, len(procedural.SHAPE_NAMES)),
        (procedural.stripes, len(procedural.STRIPE_ANGLES)),
        (procedural.positions, len(procedural.POSITION_NAMES)),
    ],
)
def test_generators_are_seeded_and_cover_their_classes(generate, classes: int) -> None:
    images, labels = generate(300, 24, np.random.default_rng(7))
    assert images.shape == (300, 24, 24, 3) and images.dtype == np.uint8
    assert set(labels.tolist()) == set(range(classes))
    again, _ = generate(300, 24, np.random.default_rng(7))
    np.testing.assert_array_equal(images, again)
    # the object is visible: images are not flat
    assert images.reshape(300, -1).std(axis=1).min() > 5


def test_glyph_classes_share_their_template() -> None:
    templates = procedural.glyph_templates(10, 3, np.random.default_rng(0))
    images, labels = procedural.glyphs(templates, 200, 32, np.random.default_rng(1))
    assert images.shape == (200, 32, 32, 3) and labels.max() < 10
    # two renderings of the same class are closer (in the stroke mask) than renderings of different ones
    masks = np.abs(images.astype(np.float32) - np.median(images, axis=(1, 2), keepdims=True)).mean(-1) > 40
    flat = masks.reshape(200, -1).astype(np.float32)
    same = [(i, j) for i in range(200) for j in range(i + 1, 200) if labels[i] == labels[j]]
    other = [(i, j) for i in range(200) for j in range(i + 1, 200) if labels[i] != labels[j]]

    def overlap(pairs: list[tuple[int, int]]) -> float:
        return float(
            np.mean([(flat[i] * flat[j]).sum() / (np.sqrt(flat[i].sum() * flat[j].sum()) + 1e-6) for i, j in pairs])
        )

    assert overlap(same) > overlap(other)
