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
from PIL import ExifTags, Image, ImageOps

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


# Larger inputs are refused rather than decoded (a decompression bomb can exhaust memory), and so are inputs that
# resizing their short side to the model's would take over it (a thin strip).
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
        array = (array >> 8).astype(np.uint8)  # the top 8 bits, as of a 16-bit image file
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageError(f"{name}: float pixels must be finite and in [0, 1]; scale them or pass uint8.")
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported pixel dtype {array.dtype}; pass uint8, uint16 or float in [0, 1].")
    return Image.fromarray(np.ascontiguousarray(array))


def _check_size(image: Image.Image, name: str, image_size: int | None = None) -> None:
    """Refuse empty and oversized images from their header, before any pixel is decoded. With the model's
    ``image_size``, refuse too an image that resizing its short side to it would take over ``MAX_PIXELS``: one whose
    aspect ratio is over ``MAX_PIXELS / image_size²`` (1337:1 at 224 pixels; a 1×1,000,000 strip would become
    224×224,000,000)."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: the image is empty ({width}×{height}).")
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: {width}×{height} is over {MAX_PIXELS} pixels; downscale it first.")
    if image_size is not None and max(width, height) * image_size**2 > MAX_PIXELS * min(width, height):
        raise ImageError(
            f"{name}: {width}×{height} is too elongated: resized to the model's {image_size}-pixel short side it "
            f"would be over {MAX_PIXELS} pixels (the aspect ratio must be at most {MAX_PIXELS / image_size**2:.0f}:1); "
            "crop it first."
        )


def _upright(image: Image.Image) -> Image.Image:
    """``image`` as viewers show it: a camera stores a photo as shot and notes the turn in its EXIF orientation."""
    # exif_transpose copies an image it does not turn; most have no orientation, and a copy of a large one costs.
    if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def _integer_pixels(image: Image.Image, name: str) -> np.ndarray:
    """A 16- or 32-bit integer image's pixels as uint16, or as uint8 for an "I" image whose values all fit 8 bits:
    the mode "I" does not say how many bits are used (PIL reads 8- and 16-bit TIFFs and PNGs saved as 32-bit
    integers as it), the values do."""
    pixels = np.asarray(image)
    if image.mode != "I":  # "I;16", "I;16B", ...
        return pixels.astype(np.uint16)
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > 65535:
        raise ImageError(
            f"{name}: 32-bit integer pixels from {low} to {high}; they are read as 8-bit (0 to 255) or 16-bit "
            "(0 to 65535) values: save the image with 8 or 16 bits."
        )
    return pixels.astype(np.uint8 if high <= 255 else np.uint16)


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """A decoded ``image`` whose size is checked → upright 8-bit RGB."""
    # export/serve_onnx.py repeats these rules for servers without esmpp: change both (tests/export/test_serve.py).
    image = _upright(image)
    if image.mode.startswith("I"):
        image = _from_array(_integer_pixels(image, name), name)
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
    if path.is_dir():
        raise ImageError(
            f"{path} is a folder, not an image file: name its image files (a shell glob: {path / '*.jpg'})."
        )
    if not path.is_file():
        raise ImageError(f"{path}: no such image file.")
    return path


@contextmanager
def _decoded(path: Path, name: str, image_size: int | None = None, reduced: bool = False) -> Iterator[Image.Image]:
    """The image file ``path`` opened and decoded (its size checked from the header first, for a model of
    ``image_size`` when given); a missing or undecodable file, or one that fails in the block, raises
    ``ImageError`` naming it. ``reduced``: a JPEG is decoded at 1/8 of its size (every byte is still decoded, so
    a damaged file fails alike; 3.4× faster on a 12-megapixel photo), for a check."""
    check_image_exists(path)
    try:
        with Image.open(path) as opened:
            _check_size(opened, name, image_size)
            if reduced:
                opened.draft(None, (1, 1))  # a no-op for other formats
            opened.load()
            yield opened
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{path}: cannot decode the image ({exc}). Is it a valid PNG/JPEG file?") from exc


def check_image_file(path: Path, image_size: int | None = None) -> None:
    """Raise now the ``ImageError`` that :func:`load_image` would raise for ``path`` later (for a model of
    ``image_size``: :func:`preprocess_images`). The file is decoded (a JPEG at reduced size): PIL's ``verify()``
    is cheaper but checks only a PNG's chunk checksums and passes a truncated JPEG."""
    with _decoded(Path(path), str(path), image_size, reduced=True) as opened:
        _to_rgb(opened, str(path))


def load_image(source: ImageInput, name: str | None = None, image_size: int | None = None) -> Image.Image:
    """Any supported input → an RGB PIL image. Paths, PIL images (any mode: grayscale, RGBA composited on
    white, 16-bit, palette; turned as their EXIF orientation says, as viewers show them), numpy arrays ([H,W],
    [H,W,3|4], [3,H,W]; uint8, uint16, bool or float in [0, 1]) and tensors ([3,H,W] float in [0, 1]). Anything
    else, and an image too elongated for a model of ``image_size`` (when given), raises ``ImageError`` naming the
    input: a file by its path, anything else by ``name`` (default: its type)."""
    # A path names its file best, whatever the caller calls it (a position in a batch means nothing to a user).
    name = str(source) if isinstance(source, (str, Path)) else name or type(source).__name__
    if isinstance(source, (str, Path)):
        with _decoded(Path(source), name, image_size) as opened:
            return _to_rgb(opened, name)
    if isinstance(source, Image.Image):
        _check_size(source, name, image_size)
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
        image = _from_array(source, name)
        _check_size(image, name, image_size)
        return _to_rgb(image, name)
    raise ImageError(f"{name}: unsupported image input; pass a path, a PIL image, a numpy array or a tensor.")


def image_preprocessor(arch: Architecture) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's own evaluation transform for ``arch`` (resize, centre crop, normalise): PIL → [3,H,W]."""
    return image_transform(arch.image_size, is_train=False, mean=arch.mean, std=arch.std)


def preprocess_images(images: Sequence[ImageInput], arch: Architecture, first_index: int = 0) -> torch.Tensor:
    """User images of any supported kind → normalised batch [N, 3, H, W] for ``arch``. Errors name a file by
    its path, another input as ``image N``, its position counted from ``first_index`` (a caller that sends its
    images in batches passes the batch's offset)."""
    transform = image_preprocessor(arch)
    return torch.stack(
        [transform(load_image(image, f"image {first_index + i}", arch.image_size)) for i, image in enumerate(images)]
    )
