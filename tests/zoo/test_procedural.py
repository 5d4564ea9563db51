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
