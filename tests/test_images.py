import io

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps

from esmpp import images
from esmpp.errors import ImageError
from esmpp.images import check_image_file, load_image, preprocess_images, preprocess_uint8
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


@pytest.mark.parametrize("kind", ["file", "PIL", "array"])
def test_too_elongated_images_are_refused_before_resizing(monkeypatch, tmp_path, kind):
    """A 1×1,000,000 PNG passed the pixel limit and became 16×16,000,000 pixels (224×224,000,000 at 224) when
    resized. The limit applies to the resized image too: aspect ratio at most MAX_PIXELS / S² (10:1 here)."""
    monkeypatch.setattr(images, "MAX_PIXELS", 10 * 16 * 16)
    arrays = {"fits": np.zeros((10, 1), np.uint8), "wide": np.zeros((1, 11), np.uint8)}
    sources = dict(arrays)
    if kind != "array":
        sources = {name: Image.fromarray(array) for name, array in arrays.items()}
    if kind == "file":
        for name, image in sources.items():
            image.save(tmp_path / f"{name}.png")
        sources = {name: tmp_path / f"{name}.png" for name in sources}
    assert preprocess_images([sources["fits"]], TINY_ARCH).shape == (1, 3, 16, 16)
    message = r"11×1 is too elongated: .* 16-pixel short side .* over 2560 pixels \(.* must be at most 10:1\)"
    with pytest.raises(ImageError, match=message):
        preprocess_images([sources["fits"], sources["wide"]], TINY_ARCH)
    if kind == "file":  # the check made before the first batch finds it too
        with pytest.raises(ImageError, match=rf"wide\.png: {message}"):
            check_image_file(sources["wide"], TINY_ARCH.image_size)


def _turned_jpeg(path, orientation: int) -> None:
    """A 40×20 JPEG, black left half and white right half, that viewers show turned as ``orientation`` says."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 20:] = 255
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes())


def test_exif_orientation_is_applied_to_files_and_pil_images(tmp_path):
    """A phone photo with Orientation=6 (turned 90° clockwise when shown) was classified as stored, on its side."""
    path = tmp_path / "turned.jpg"
    _turned_jpeg(path, 6)
    with Image.open(path) as opened:
        loaded = [load_image(path), load_image(opened)]
    for image in loaded:
        assert image.size == (20, 40)  # shown upright: the stored left (black) half on top
        assert image.getpixel((10, 5)) < (30, 30, 30) and image.getpixel((10, 35)) > (225, 225, 225)
    with Image.open(path) as opened:  # an image the user turned already has no orientation left to apply
        assert load_image(ImageOps.exif_transpose(opened)).size == (20, 40)


def test_32_bit_integer_images_are_read_by_their_values(tmp_path):
    """Mode "I" images holding 8-bit values were shifted as 16-bit ones (>> 8): all black."""
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    cases = {"8-bit": ramp.astype(np.int32), "16-bit": ramp.astype(np.int32) * 256 + 255}
    for name, values in cases.items():
        path = tmp_path / f"{name}.tiff"
        Image.fromarray(values).save(path)
        assert Image.open(path).mode == "I"
        np.testing.assert_array_equal(np.asarray(load_image(path))[..., 0], ramp, err_msg=name)
    beyond = tmp_path / "beyond.tiff"
    Image.fromarray(np.array([[0, 65536]], np.int32)).save(beyond)
    with pytest.raises(ImageError, match=r"beyond\.tiff: 32-bit integer pixels from 0 to 65536; .* 8 or 16 bits"):
        load_image(beyond)
    with pytest.raises(ImageError, match="32-bit integer pixels from -1 to 0"):
        load_image(Image.fromarray(np.array([[-1, 0]], np.int32)))


def test_16_bit_images_keep_their_top_8_bits_whatever_the_input_type(tmp_path):
    """uint16 arrays were divided by 257, 16-bit PIL images and PNGs shifted by 8: one pixel, two values."""
    values = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)  # x·256: // 257 gives x - 1 (x ≥ 1)
    path = tmp_path / "16-bit.png"
    Image.fromarray(values).save(path)
    for source in (values, Image.fromarray(values), path):
        np.testing.assert_array_equal(np.asarray(load_image(source))[..., 0], values >> 8, err_msg=type(source))


def test_a_folder_is_named_as_a_folder(tmp_path):
    """It was reported as "no such image file", though it exists."""
    with pytest.raises(ImageError, match=rf"{tmp_path} is a folder, not an image file: .* glob: {tmp_path}/\*\.jpg"):
        load_image(tmp_path)


def test_check_image_file_raises_what_loading_would(tmp_path):
    """The check decodes a JPEG reduced (every byte still read) and converts the pixels, as loading does."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(buffer, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 3 // 4])
    out_of_range = tmp_path / "float.tiff"
    Image.fromarray(np.full((4, 4), 2.0, np.float32)).save(out_of_range)
    for path, message in [(truncated, "cannot decode"), (out_of_range, r"in \[0, 1\]")]:
        with pytest.raises(ImageError, match=message):
            load_image(path)
        with pytest.raises(ImageError, match=message):
            check_image_file(path)
