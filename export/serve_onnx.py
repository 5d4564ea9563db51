"""Serve an exported esmpp model with onnxruntime alone (no torch, no esmpp): images in, task + label +
score out. Everything but the graph — tasks, class names, preprocessing — comes from the model's metadata.

    python -m export.serve_onnx out/model.onnx cat.jpg dog.png [--task NAME]

A routed model (the default export) picks each image's task itself; a model exported with
``--task-input`` needs ``--task``. onnxruntime-gpu is used when installed (CUDA first, CPU fallback).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf
from PIL import Image

ImageSource = str | Path | Image.Image


class ServingError(ValueError):
    """A problem with what was sent (model file, image, task), not a bug: the command line prints it as one line."""


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
    if not path.is_file():
        raise ServingError(f"{path}: no such image file.")
    return path


def _open(source: ImageSource, name: str) -> Image.Image:
    """``source`` decoded (a path opened), or a ``ServingError`` naming it."""
    if isinstance(source, (str, Path)):
        source = check_image_exists(source)
    try:
        image = Image.open(source) if isinstance(source, Path) else source
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # what PIL raises on bad bytes
        raise ServingError(f"{name}: cannot decode the image ({exc}). Is it a valid PNG/JPEG file?") from exc
    return image


def _rgb(source: ImageSource, name: str) -> Image.Image:
    """``source`` as 8-bit RGB, converted as ``esmpp.images`` converts it (this kit runs without esmpp, so the
    rules are repeated here; tests/export/test_serve.py feeds every mode to both)."""
    image = _open(source, name)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # The top 8 of 16 bits (32-bit values beyond 16 bits saturate): convert("RGB") would clip at 255 instead,
        # turning most of a 16-bit image white.
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
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
    evaluation transform. Missing or undecodable files and float images out of [0, 1] raise ``ServingError``."""
    size = int(spec["image_size"])
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(3, 1, 1)
    batch = []
    for index, source in enumerate(images):
        image = _rgb(source, str(source) if isinstance(source, (str, Path)) else f"image {index}")
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
        if not Path(model_path).is_file():
            raise ServingError(f"{model_path}: no such model file; pass the model.onnx that `esmpp export` wrote.")
        try:
            self.session = ort.InferenceSession(str(model_path), providers=providers or default_providers())
        except (InvalidProtobuf, InvalidGraph, Fail) as exc:
            raise ServingError(
                f"{model_path} is not a readable ONNX model ({exc}); pass the model.onnx that `esmpp export` wrote, "
                "in its folder (its weights may be in model.onnx.data beside it)."
            ) from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("esmpp.format") != "esmpp-onnx":
            raise ServingError(f"{model_path} was not written by `esmpp export` (no esmpp metadata)")
        try:
            self.mode = meta["esmpp.mode"]
            self.tasks: list[str] = json.loads(meta["esmpp.tasks"])
            self.classes: list[list[str]] = json.loads(meta["esmpp.classes"])
            self.preprocessing: dict = json.loads(meta["esmpp.preprocessing"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise ServingError(
                f"{model_path}: its esmpp metadata is incomplete or damaged ({exc!r}); export the artifact again "
                "with `esmpp export`."
            ) from exc

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def predict(self, images: Sequence[ImageSource], task: str | None = None) -> list[dict]:
        """``[{"task", "label", "score"}]``; score is the softmax probability within the task's classes."""
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
    try:
        for path in args.images:  # a mistyped path fails before the model loads
            check_image_exists(path)
        classifier = OnnxClassifier(args.model)
        results = classifier.predict(args.images, args.task)
    except ServingError as exc:
        # One line, as esmpp prints its errors (a message may quote a multi-line one from onnxruntime).
        parser.exit(1, "error: " + " ".join(str(exc).split()) + "\n")
    print(f"providers: {', '.join(classifier.providers)}")
    for path, result in zip(args.images, results):
        print(json.dumps({"image": str(path), **result}))


if __name__ == "__main__":
    main()
