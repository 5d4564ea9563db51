"""Turning images into the normalised tensors an encoder expects.

Two doors: ``preprocess_uint8`` for datasets already at the model's size (the zoo, benchmarks), and
``load_image`` / ``preprocess_images`` for what users send (paths, PIL images, arrays, tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from open_clip.transform import image_transform
from PIL import Image

from esmpp.architecture import Architecture
from esmpp.errors import ImageError

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor


def normalise(pixels: torch.Tensor, arch: Architecture) -> torch.Tensor:
    """``pixels`` [N, 3, H, W] in [0, 1] → normalised with the architecture's mean and std."""
    mean = torch.tensor(arch.mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(arch.std, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean) / std


def preprocess_uint8(images: np.ndarray, arch: Architecture) -> torch.Tensor:
    """``images`` uint8 [N, H, W, 3] at the model's size → float32 [N, 3, H, W], normalised."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return normalise(pixels, arch)


# Larger inputs are refused rather than decoded (a decompression bomb can exhaust memory).
MAX_PIXELS = 64 * 1024 * 1024


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW → HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(
            f"{name}: array of shape {array.shape} is not an image; expected [H, W], [H, W, 3|4] or [3, H, W]."
        )
    if array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageError(f"{name}: float pixels must be finite and in [0, 1]; scale them or pass uint8.")
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported pixel dtype {array.dtype}; pass uint8, uint16 or float in [0, 1].")
    return Image.fromarray(np.ascontiguousarray(array))


def _check_size(image: Image.Image, name: str) -> None:
    """Refuse empty and oversized images from their header, before any pixel is decoded."""
    if image.width < 1 or image.height < 1:
        raise ImageError(f"{name}: the image is empty ({image.width}×{image.height}).")
    if image.width * image.height > MAX_PIXELS:
        raise ImageError(f"{name}: {image.width}×{image.height} is over {MAX_PIXELS} pixels; downscale it first.")


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    # export/serve_onnx.py repeats these rules for servers without esmpp: change both (tests/export/test_serve.py).
    _check_size(image, name)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = _from_array(np.asarray(image), name)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def check_image_exists(path: Path) -> Path:
    """``path``, or the ``ImageError`` that loading it would raise if it is no file: a check cheap enough to make
    for every image of a long list before the long work (:func:`check_image_file` decodes it too)."""
    if not path.is_file():
        raise ImageError(f"{path}: no such image file.")
    return path


@contextmanager
def _decoded(path: Path, name: str) -> Iterator[Image.Image]:
    """The image file ``path`` opened and decoded (its size checked from the header first); a missing or
    undecodable file, or one that fails in the block, raises ``ImageError`` naming it."""
    check_image_exists(path)
    try:
        with Image.open(path) as opened:
            _check_size(opened, name)
            opened.load()
            yield opened
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{path}: cannot decode the image ({exc}). Is it a valid PNG/JPEG file?") from exc


def check_image_file(path: Path) -> None:
    """Raise now the ``ImageError`` that :func:`load_image` would raise for ``path`` later. The file is decoded
    in full: PIL's ``verify()`` is cheaper but checks only a PNG's chunk checksums and passes a truncated JPEG."""
    with _decoded(Path(path), str(path)):
        pass


def load_image(source: ImageInput, name: str | None = None) -> Image.Image:
    """Any supported input → an RGB PIL image. Paths, PIL images (any mode: grayscale, RGBA composited on
    white, 16-bit, palette), numpy arrays ([H,W], [H,W,3|4], [3,H,W]; uint8, uint16, bool or float in
    [0, 1]) and tensors ([3,H,W] float in [0, 1]). Anything else raises ``ImageError`` naming the input: a
    file by its path, anything else by ``name`` (default: its type)."""
    # A path names its file best, whatever the caller calls it (a position in a batch means nothing to a user).
    name = str(source) if isinstance(source, (str, Path)) else name or type(source).__name__
    if isinstance(source, (str, Path)):
        with _decoded(Path(source), name) as opened:
            return _to_rgb(opened, name)
    if isinstance(source, Image.Image):
        _check_size(source, name)
        try:
            source.load()
            return _to_rgb(source, name)
        except (OSError, ValueError) as exc:
            raise ImageError(f"{name}: cannot decode the image ({exc}).") from exc
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu()
        # numpy has no bfloat16: floats go through float32, which every float dtype fits in.
        source = (source.float() if source.is_floating_point() else source).numpy()
    if isinstance(source, np.ndarray):
        if source.size == 0:
            raise ImageError(f"{name}: the array is empty (shape {source.shape}).")
        return _to_rgb(_from_array(source, name), name)
    raise ImageError(f"{name}: unsupported image input; pass a path, a PIL image, a numpy array or a tensor.")


def image_preprocessor(arch: Architecture) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's own evaluation transform for ``arch`` (resize, centre crop, normalise): PIL → [3,H,W]."""
    return image_transform(arch.image_size, is_train=False, mean=arch.mean, std=arch.std)


def preprocess_images(images: Sequence[ImageInput], arch: Architecture, first_index: int = 0) -> torch.Tensor:
    """User images of any supported kind → normalised batch [N, 3, H, W] for ``arch``. Errors name a file by
    its path, another input as ``image N``, its position counted from ``first_index`` (a caller that sends its
    images in batches passes the batch's offset)."""
    transform = image_preprocessor(arch)
    return torch.stack([transform(load_image(image, f"image {first_index + i}")) for i, image in enumerate(images)])
