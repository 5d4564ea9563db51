"""Serve an exported esmpp model with onnxruntime alone (no torch, no esmpp): images in, task + label +
score out. Everything but the graph — tasks, class names, preprocessing — comes from the model's metadata.

    python -m export.serve_onnx out/model.onnx cat.jpg dog.png [--task NAME]   # from the folder holding export/
    python path/to/export/serve_onnx.py out/model.onnx cat.jpg                 # from any folder

One JSON line per image on stdout, the execution providers on stderr. A routed model (the default export) picks
each image's task itself; a model exported with ``--task-input`` needs ``--task``. onnxruntime-gpu is used when
installed (CUDA first, CPU fallback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf
from PIL import ExifTags, Image, ImageOps

ImageSource = str | Path | Image.Image | np.ndarray

# The limits of esmpp.images (this kit runs without esmpp): an image over MAX_PIXELS, or one that resizing its short
# side to the model's size would take over it, is refused (a decompression bomb or a thin strip exhausts memory).
MAX_PIXELS = 64 * 1024 * 1024


class ServingError(ValueError):
    """A problem with what was sent (model file, image, task), not a bug: the command line prints it as one line."""


@contextlib.contextmanager
def one_line_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """A ``ServingError`` in the block printed as one line, as esmpp prints its errors (a message may quote a
    multi-line one from onnxruntime), and exit code 1; this kit's commands (serve_onnx, triton) share it."""
    try:
        yield
    except ServingError as exc:
        parser.exit(1, "error: " + " ".join(str(exc).split()) + "\n")


def check_model_file(model_path: str | Path) -> Path:
    """``model_path`` as a Path, or a ``ServingError`` if it is no file."""
    path = Path(model_path)
    if path.is_dir():
        inside = f" ({path / 'model.onnx'} in it?)" if (path / "model.onnx").is_file() else ""
        raise ServingError(f"{model_path} is a folder: pass the model.onnx file that `esmpp export` wrote{inside}.")
    if not path.is_file():
        raise ServingError(f"{model_path}: no such model file; pass the model.onnx that `esmpp export` wrote.")
    return path


def unreadable_model(model_path: str | Path, exc: Exception) -> ServingError:
    """The error for a ``model_path`` that onnxruntime or onnx cannot read as an ONNX model (``exc``)."""
    return ServingError(
        f"{model_path} is not a readable ONNX model ({exc}); pass the model.onnx that `esmpp export` wrote, "
        "in its folder (its weights may be in model.onnx.data beside it)."
    )


class EsmppMetadata(NamedTuple):
    """What ``esmpp export`` writes in a model's metadata for a server: how the task is chosen, the tasks, their
    class names and the preprocessing."""

    mode: str
    tasks: list[str]
    classes: list[list[str]]
    preprocessing: dict


def read_metadata(meta: Mapping[str, str], model_path: str | Path) -> EsmppMetadata:
    """The esmpp metadata of the model ``model_path`` from its metadata entries ``meta``, or a ``ServingError``
    if they are not esmpp's, or incomplete or damaged."""
    if meta.get("esmpp.format") != "esmpp-onnx":
        raise ServingError(f"{model_path} was not written by `esmpp export` (no esmpp metadata)")
    try:
        return EsmppMetadata(
            meta["esmpp.mode"],
            json.loads(meta["esmpp.tasks"]),
            json.loads(meta["esmpp.classes"]),
            json.loads(meta["esmpp.preprocessing"]),
        )
    except (KeyError, json.JSONDecodeError) as exc:
        raise ServingError(
            f"{model_path}: its esmpp metadata is incomplete or damaged ({exc!r}); export the artifact again "
            "with `esmpp export`."
        ) from exc


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it (onnxruntime-gpu); onnxruntime falls back to the CPU
    when no GPU is usable, and ``session.get_providers()`` tells which one runs."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def check_image_exists(path: str | Path) -> Path:
    """``path`` as a Path, or a ``ServingError`` if it is no file (checked for every image before the model loads;
    the rule and message of ``esmpp.images.check_image_exists``, repeated as this kit runs without esmpp)."""
    path = Path(path)
    if path.is_dir():
        raise ServingError(
            f"{path} is a folder, not an image file: name its image files (a shell glob: {path / '*.jpg'})."
        )
    if not path.is_file():
        raise ServingError(f"{path}: no such image file.")
    return path


def _check_size(image: Image.Image, name: str, image_size: int) -> None:
    """Refuse an empty image, one over ``MAX_PIXELS``, and one whose aspect ratio is over ``MAX_PIXELS /
    image_size²`` (resized, it would be over ``MAX_PIXELS``), from the header, before any pixel is decoded."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ServingError(f"{name}: the image is empty ({width}×{height}).")
    if width * height > MAX_PIXELS:
        raise ServingError(f"{name}: {width}×{height} is over {MAX_PIXELS} pixels; downscale it first.")
    if max(width, height) * image_size**2 > MAX_PIXELS * min(width, height):
        raise ServingError(
            f"{name}: {width}×{height} is too elongated: resized to the model's {image_size}-pixel short side it "
            f"would be over {MAX_PIXELS} pixels (the aspect ratio must be at most {MAX_PIXELS / image_size**2:.0f}:1); "
            "crop it first."
        )


@contextlib.contextmanager
def _decoding(name: str) -> Iterator[None]:
    try:
        yield
    except ServingError:  # a ValueError, but not PIL's
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # what PIL raises on bad bytes
        raise ServingError(f"{name}: cannot decode the image ({exc}). Is it a valid PNG/JPEG file?") from exc


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    """A uint8 array [H, W], [H, W, 3] or [H, W, 4] as an image (esmpp takes more kinds; this kit these alone)."""
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ServingError(
            f"{name}: a numpy array of shape {array.shape} and dtype {array.dtype}; pass uint8 [H, W], [H, W, 3] "
            "or [H, W, 4] arrays, image paths or PIL images."
        )
    return Image.fromarray(np.ascontiguousarray(array))


def _open(source: ImageSource, name: str, image_size: int) -> Image.Image:
    """``source`` decoded (a path opened), its size checked first; or a ``ServingError`` naming it."""
    if isinstance(source, np.ndarray):
        source = _from_array(source, name)
    elif isinstance(source, (str, Path)):
        path = check_image_exists(source)
        with _decoding(name):
            source = Image.open(path)
    elif not isinstance(source, Image.Image):
        raise ServingError(
            f"{name}: unsupported image input ({type(source).__name__}); pass image paths, PIL images or uint8 arrays."
        )
    _check_size(source, name, image_size)
    with _decoding(name):
        source.load()
    return source


def _upright(image: Image.Image) -> Image.Image:
    """``image`` as viewers show it: a camera stores a photo as shot and notes the turn in its EXIF orientation."""
    # exif_transpose copies an image it does not turn; most have no orientation, and a copy of a large one costs.
    if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def _rgb(source: ImageSource, name: str, image_size: int) -> Image.Image:
    """``source`` as upright 8-bit RGB, converted as ``esmpp.images`` converts it (this kit runs without esmpp, so
    the rules are repeated here; tests/export/test_serve.py feeds every mode to both)."""
    image = _open(source, name, image_size)
    with _decoding(name):  # an EXIF block PIL cannot parse
        image = _upright(image)
    if image.mode.startswith("I"):
        # The top 8 of 16 bits (convert("RGB") would clip at 255, turning most of a 16-bit image white); the mode
        # "I" does not say how many bits are used, its values do: all ≤ 255 are 8-bit, all ≤ 65535 16-bit.
        pixels = np.asarray(image).astype(np.int64)
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 65535:
            raise ServingError(
                f"{name}: 32-bit integer pixels from {low} to {high}; they are read as 8-bit (0 to 255) or 16-bit "
                "(0 to 65535) values: save the image with 8 or 16 bits."
            )
        image = Image.fromarray((pixels if image.mode == "I" and high <= 255 else pixels >> 8).astype(np.uint8))
    elif image.mode == "F":
        pixels = np.asarray(image)
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise ServingError(f"{name}: float pixels must be finite and in [0, 1]; scale them, or save 8-bit.")
        image = Image.fromarray(np.round(pixels * 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels are composited on white, as the esmpp runtime does.
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return image.convert("RGB")


def preprocess(images: Sequence[ImageSource], spec: dict) -> np.ndarray:
    """Images → float32 [N, 3, S, S] following ``spec`` (the ``esmpp.preprocessing`` metadata): 8-bit RGB as
    esmpp makes it, resize the shortest side to S (bicubic), centre crop, scale to [0, 1], normalise — open_clip's
    evaluation transform. What ``esmpp.images`` refuses raises ``ServingError``: missing or undecodable files,
    empty, oversized or too elongated images, float images out of [0, 1], 32-bit integer images beyond 16 bits."""
    size = int(spec["image_size"])
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(3, 1, 1)
    batch = []
    for index, source in enumerate(images):
        image = _rgb(source, str(source) if isinstance(source, (str, Path)) else f"image {index}", size)
        width, height = image.size
        short, long = min(width, height), max(width, height)
        resized_long = int(size * long / short)
        new_size = (size, resized_long) if width <= height else (resized_long, size)
        image = image.resize(new_size, Image.Resampling.BICUBIC)
        left = round((new_size[0] - size) / 2.0)
        top = round((new_size[1] - size) / 2.0)
        image = image.crop((left, top, left + size, top + size))
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * np.float32(spec["scale"])
        batch.append((pixels - mean) / std)
    return np.stack(batch).astype(np.float32)


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max())
    return shifted / shifted.sum()


class OnnxClassifier:
    """An exported esmpp model and its metadata; ``predict(images, task=None)`` → one dict per image."""

    def __init__(self, model_path: str | Path, providers: list[str] | None = None) -> None:
        check_model_file(model_path)
        try:
            self.session = ort.InferenceSession(str(model_path), providers=providers or default_providers())
        except (InvalidProtobuf, InvalidGraph, Fail) as exc:
            raise unreadable_model(model_path, exc) from exc
        metadata = read_metadata(self.session.get_modelmeta().custom_metadata_map, model_path)
        self.mode, self.tasks, self.classes, self.preprocessing = metadata

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def predict(self, images: ImageSource | Iterable[ImageSource], task: str | None = None) -> list[dict]:
        """``[{"task", "label", "score"}]``, one per image: ``images`` is one image or any iterable of them (a
        generator is read once); score is the softmax probability within the task's classes."""
        # The esmpp Predictor's rule: a path (a str too), a PIL image or an array is iterable, but is one image.
        images = list(images) if isinstance(images, Iterable) and not isinstance(images, ImageSource) else [images]
        if not images:
            raise ServingError("no images given to predict.")
        # The task first: a wrong one fails before any image is decoded.
        if self.mode == "task_input" and task not in self.tasks:
            raise ServingError(f"this model takes the task as input: pass one of {self.tasks} (--task), got {task!r}")
        if self.mode != "task_input" and task is not None:
            raise ServingError(
                f"this model routes each image itself: give no task (got {task!r}), or export with --task-input"
            )
        feeds = {"pixel_values": preprocess(images, self.preprocessing)}
        if self.mode == "task_input":
            feeds["forced_task_id"] = np.full(len(images), self.tasks.index(task), dtype=np.int64)
        task_ids, logits = self.session.run(["task_id", "logits"], feeds)
        results = []
        for t, row in zip(task_ids.tolist(), logits):
            probabilities = _softmax(row[: len(self.classes[t])])
            best = int(probabilities.argmax())
            results.append({"task": self.tasks[t], "label": self.classes[t][best], "score": float(probabilities[best])})
        return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="model.onnx written by `esmpp export`")
    parser.add_argument("images", type=Path, nargs="+", help="image files")
    parser.add_argument("--task", help="task name (models exported with --task-input only)")
    args = parser.parse_args(argv)
    with one_line_errors(parser):
        for path in args.images:  # a mistyped path fails before the model loads
            check_image_exists(path)
        classifier = OnnxClassifier(args.model)
        results = classifier.predict(args.images, args.task)
    # On stderr: stdout is JSON lines only, for a consumer of them.
    print(f"providers: {', '.join(classifier.providers)}", file=sys.stderr)
    for path, result in zip(args.images, results):
        print(json.dumps({"image": str(path), **result}))


if __name__ == "__main__":
    main()
