import io

import numpy as np
import pytest
import torch
from PIL import Image

from esmpp.errors import ImageError
from esmpp.images import load_image, preprocess_images, preprocess_uint8
from tests.conftest import TINY_ARCH


def test_preprocessing_user_images_matches_the_dataset_path():
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    torch.testing.assert_close(preprocess_images(list(images), TINY_ARCH), preprocess_uint8(images, TINY_ARCH))


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (20, 10), 7),
        Image.new("RGBA", (8, 8), (10, 20, 30, 0)),
        Image.new("P", (8, 8)),
        Image.new("I;16", (8, 8), 4000),
        Image.new("1", (5, 5)),
        np.zeros((9, 9), np.uint16),
        np.ones((3, 8, 8), np.float32),
        np.zeros((8, 8, 4), np.uint8),
        torch.rand(3, 12, 12),
    ],
)
def test_supported_inputs_become_model_sized_rgb(image):
    batch = preprocess_images([image], TINY_ARCH)
    assert batch.shape == (1, 3, 16, 16) and torch.isfinite(batch).all()


def test_rgba_is_composited_on_white():
    assert load_image(Image.new("RGBA", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_png_file_round_trip(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(path)
    assert load_image(path).getpixel((3, 3)) == (1, 2, 3)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((4, 4, 7), np.uint8), "not an image"),
        (np.full((4, 4), 3.0), r"in \[0, 1\]"),
        (np.zeros((4, 4), np.complex64), "unsupported pixel dtype"),
        (Image.new("RGB", (0, 0)), "empty"),
        ("missing.png", "no such image file"),
        (3.5, "unsupported image input"),
    ],
)
def test_bad_inputs_are_named(image, message):
    with pytest.raises(ImageError, match=message):
        load_image(image)


def test_corrupted_file_is_named(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="JPEG")
    path = tmp_path / "broken.jpg"
    path.write_bytes(buffer.getvalue()[:40])
    with pytest.raises(ImageError, match=r"broken\.jpg: cannot decode"):
        load_image(path)
