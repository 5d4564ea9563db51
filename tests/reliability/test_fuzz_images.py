"""Fuzzing the image entry points (`load_image`, `preprocess_images`) with what users may send: files with
corrupted or random bytes, every PIL mode, arrays and tensors of any shape and dtype, a decompression bomb."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from esmpp.errors import EsmppError, ImageError
from esmpp.images import MAX_PIXELS, load_image, preprocess_images
from tests.conftest import TINY_ARCH
from tests.reliability.cases import attempt

MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "I;16", "I;16B"]
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
sizes = st.integers(min_value=0, max_value=24)
files = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _check_loaded(result: Image.Image | EsmppError) -> None:
    """An accepted image is RGB, non-empty, and preprocesses to the model's input."""
    if isinstance(result, EsmppError):
        assert isinstance(result, ImageError), result
        return
    assert result.mode == "RGB" and result.width >= 1 and result.height >= 1
    pixels = preprocess_images([result], TINY_ARCH)
    assert pixels.shape == (1, 3, 16, 16) and torch.isfinite(pixels).all()


def _pil_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new(mode, (width, height))
    if width and height:
        raw = rng.integers(0, 256, len(image.tobytes()), dtype=np.uint8).tobytes()
        image.frombytes(raw)
    return image


def _encoded(mode: str, size: tuple[int, int], fmt: str, seed: int) -> bytes | None:
    """``size`` image in ``mode`` saved as ``fmt``; None when PIL cannot write that combination."""
    buffer = io.BytesIO()
    try:
        _pil_image(mode, *size, seed).save(buffer, format=fmt)
    except (OSError, ValueError, KeyError, MemoryError):  # formats that cannot hold this image
        return None
    return buffer.getvalue()


@files
@given(
    mode=st.sampled_from(MODES),
    size=st.tuples(sizes, sizes),
    seed=st.integers(0, 2**16),
)
def test_pil_images_of_every_mode(mode, size, seed):
    _check_loaded(attempt("load_image(PIL)", load_image, _pil_image(mode, *size, seed)))


@files
@given(
    mode=st.sampled_from(MODES),
    size=st.tuples(sizes, sizes),
    fmt=st.sampled_from(sorted(FORMATS)),
    seed=st.integers(0, 2**16),
    damage=st.sampled_from(["none", "truncate", "flip", "splice"]),
    where=st.floats(0, 1),
    noise=st.binary(min_size=1, max_size=64),
)
def test_files_valid_truncated_or_corrupted(tmp_path, mode, size, fmt, seed, damage, where, noise):
    data = _encoded(mode, size, fmt, seed)
    if data is None:
        return
    cut = int(where * len(data))
    if damage == "truncate":
        data = data[:cut]
    elif damage == "flip":
        data = data[:cut] + bytes(b ^ 0xFF for b in data[cut : cut + 4]) + data[cut + 4 :]
    elif damage == "splice":
        data = data[:cut] + noise + data[cut + len(noise) :]
    path = tmp_path / f"image{FORMATS[fmt]}"
    path.write_bytes(data)
    _check_loaded(attempt("load_image(file)", load_image, path))


@files
@given(data=st.binary(max_size=512), suffix=st.sampled_from([".png", ".jpg", ".gif", ".txt", ""]))
def test_random_bytes_files(tmp_path, data, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    _check_loaded(attempt("load_image(file)", load_image, path))


dtypes = st.sampled_from(
    [np.uint8, np.uint16, np.int8, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_, np.complex64]
)
shapes = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    st.tuples(st.sampled_from([1, 3, 4]), sizes, sizes),
    st.tuples(sizes, sizes, st.sampled_from([1, 2, 3, 4, 5])),
)


@given(array=hnp.arrays(dtypes, shapes))
def test_arrays_of_any_shape_and_dtype(array):
    _check_loaded(attempt("load_image(array)", load_image, array))


@given(
    shape=shapes,
    dtype=st.sampled_from(
        [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int16, torch.bool]
    ),
    scale=st.sampled_from([1.0, 255.0, -1.0, float("nan")]),
)
def test_tensors_of_any_shape_and_dtype(shape, dtype, scale):
    tensor = (torch.rand(shape) * scale).to(dtype)
    _check_loaded(attempt("load_image(tensor)", load_image, tensor))


@given(junk=st.one_of(st.none(), st.integers(), st.text(max_size=8), st.lists(st.integers(), max_size=3)))
def test_unsupported_inputs(junk):
    result = attempt("load_image(other)", load_image, junk)
    assert isinstance(result, ImageError) or isinstance(junk, str)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` RGB pixels, with a tiny (wrong) compressed body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("side", [int(MAX_PIXELS**0.5) + 1, 100_000, 2**31 - 1])
def test_decompression_bomb_is_refused_from_the_header(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    result = attempt("load_image(bomb)", load_image, path)
    assert isinstance(result, ImageError) and "pixels" in str(result)


def test_lazily_opened_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(10_000, 10_000))  # over MAX_PIXELS, under PIL's own limit
    with Image.open(path) as lazy, pytest.raises(ImageError, match="pixels"):
        load_image(lazy)


def test_preprocess_a_mixed_batch(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (5, 3), 128).save(path)
    batch = [path, Image.new("RGBA", (1, 1)), np.zeros((7, 2), np.uint16), torch.rand(3, 9, 9)]
    pixels = attempt("preprocess_images", preprocess_images, batch, TINY_ARCH)
    assert pixels.shape == (4, 3, 16, 16)
    bad = attempt("preprocess_images", preprocess_images, [path, tmp_path / "missing.png"], TINY_ARCH)
    assert isinstance(bad, ImageError) and "missing.png" in str(bad)
