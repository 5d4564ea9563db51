import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import ExifTags, Image

from esmpp import images
from esmpp.architecture import Architecture
from esmpp.errors import ImageError
from esmpp.images import preprocess_images
from esmpp.runtime.predictor import Predictor
from export import serve_onnx
from export.serve_onnx import OnnxClassifier, ServingError, preprocess

REPO = Path(__file__).parents[2]


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (height, width) in enumerate([(16, 16), (23, 41), (50, 19), (31, 31)]):
        path = tmp_path / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    rgba = tmp_path / "alpha.png"
    Image.fromarray(rng.integers(0, 256, (20, 27, 4), dtype=np.uint8), mode="RGBA").save(rgba)
    grey = tmp_path / "grey.png"
    Image.fromarray(rng.integers(0, 256, (19, 26), dtype=np.uint8)).save(grey)
    return [*paths, rgba, grey]


ARCH = Architecture(embed_dim=16, vision={"image_size": 16, "layers": 1, "width": 32, "patch_size": 8})
SPEC = {"image_size": 16, "mean": list(ARCH.mean), "std": list(ARCH.std), "scale": 1 / 255}


def test_numpy_preprocessing_matches_the_runtime(image_files):
    expected = preprocess_images(image_files, ARCH).numpy()
    np.testing.assert_allclose(preprocess(image_files, SPEC), expected, atol=1e-5, rtol=0)


# Grey images of more than 8 bits, as PIL opens them (PNG keeps 16 bits; TIFF 32-bit integers and floats), and
# 32-bit integers holding 8-bit values (read as 8-bit: "I" does not say how many bits are used, the values do).
WIDE_GREY = {
    "I;16": (np.linspace(0, 65535, 23 * 41).reshape(23, 41).astype(np.uint16), "png"),
    "I": (np.linspace(0, 65535, 23 * 41).reshape(23, 41).astype(np.int32), "tiff"),
    "I, 8-bit values": (np.linspace(0, 255, 23 * 41).reshape(23, 41).astype(np.int32), "tiff"),
    "F": (np.linspace(0, 1, 23 * 41).reshape(23, 41).astype(np.float32), "tiff"),
}


@pytest.mark.parametrize("case", sorted(WIDE_GREY))
def test_wide_grey_images_are_preprocessed_as_the_runtime_does(tmp_path, case):
    """convert("RGB") clipped them at 255, where esmpp keeps the top 8 of 16 bits or scales floats from [0, 1]:
    pixels moved by up to 3.7 after normalisation, enough to change the label."""
    pixels, suffix = WIDE_GREY[case]
    path = tmp_path / f"grey.{suffix}"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == case.split(",")[0]
    expected = preprocess_images([path], ARCH).numpy()
    np.testing.assert_allclose(preprocess([path], SPEC), expected, atol=1e-5, rtol=0)


def test_float_images_out_of_0_1_are_refused_as_the_runtime_refuses_them(tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.full((16, 16), 2.0, dtype=np.float32)).save(path)
    with pytest.raises(ImageError, match=r"float pixels must be finite and in \[0, 1\]"):
        preprocess_images([path], ARCH)
    with pytest.raises(ValueError, match=re.escape(f"{path}: float pixels must be finite and in [0, 1]")):
        preprocess([path], SPEC)


def test_exif_orientation_is_applied_as_the_runtime_applies_it(tmp_path):
    """The kit classified a photo as stored (on its side), not as shown (EXIF Orientation=6: turned 90°)."""
    pixels = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    path = tmp_path / "turned.png"  # lossless, so that upright and stored pixels can be compared exactly
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    upright = preprocess([Image.fromarray(np.rot90(pixels, -1).copy())], SPEC)
    with Image.open(path) as opened:
        for source in (path, opened):
            np.testing.assert_allclose(preprocess([source], SPEC), upright, atol=1e-6, rtol=0)
    np.testing.assert_allclose(preprocess_images([path], ARCH).numpy(), upright, atol=1e-5, rtol=0)


def _refusals(tmp_path) -> dict:
    """Inputs both esmpp and the kit refuse, with what both say after the input's name."""
    bomb, thin = tmp_path / "9000x9000.png", tmp_path / "thin.png"
    Image.new("L", (9000, 9000)).save(bomb)
    Image.new("L", (1, 300_000)).save(thin)  # at 16 pixels: 16×4,800,000, over the 64M pixels
    return {
        "empty": (Image.new("RGB", (0, 0)), "the image is empty (0×0)."),
        "over the pixel limit": (bomb, "9000×9000 is over 67108864 pixels; downscale it first."),
        "too elongated": (
            thin,
            "1×300000 is too elongated: resized to the model's 16-pixel short side it would be over 67108864 pixels "
            "(the aspect ratio must be at most 262144:1); crop it first.",
        ),
        "folder": (tmp_path, f"is a folder, not an image file: name its image files (a shell glob: {tmp_path}/*.jpg)."),
        "beyond 16 bits": (
            Image.fromarray(np.array([[0, 70000]], np.int32)),
            "32-bit integer pixels from 0 to 70000; they are read as 8-bit (0 to 255) or 16-bit (0 to 65535) "
            "values: save the image with 8 or 16 bits.",
        ),
    }


def test_images_the_runtime_refuses_are_refused_alike(tmp_path):
    """The kit served an empty image (ZeroDivisionError), a 9000×9000 one and a thin strip (gigabytes when resized)
    that esmpp refuses, and called a folder a missing file."""
    assert serve_onnx.MAX_PIXELS == images.MAX_PIXELS
    for case, (source, message) in _refusals(tmp_path).items():
        with pytest.raises(ImageError) as runtime:
            preprocess_images([source], ARCH)
        with pytest.raises(ServingError) as kit:
            preprocess([source], SPEC)
        assert str(kit.value) == str(runtime.value), case
        assert str(kit.value).endswith(message), (case, str(kit.value))


def test_predictions_match_the_torch_predictor(exported_model, artifact_path, image_files):
    model_path, task_input = exported_model
    classifier = OnnxClassifier(model_path, providers=["CPUExecutionProvider"])
    assert classifier.providers == ["CPUExecutionProvider"]
    predictor = Predictor.load(artifact_path)
    task = "task1" if task_input else None
    with torch.no_grad():
        expected = predictor.predict(list(image_files), task=task)
    results = classifier.predict(image_files, task=task)
    assert [(r["task"], r["label"]) for r in results] == [(p.task, p.label) for p in expected]
    np.testing.assert_allclose([r["score"] for r in results], [p.score for p in expected], atol=1e-4)


def test_predict_takes_what_its_docs_say(exported_model, artifact_path, image_files):
    """A bare path was iterated by characters, an empty list and an array raised numpy's or PIL's errors."""
    model_path, task_input = exported_model
    classifier = OnnxClassifier(model_path, providers=["CPUExecutionProvider"])
    task = "task1" if task_input else None
    array = np.asarray(Image.open(image_files[1]))
    predictor = Predictor.load(artifact_path)
    with torch.no_grad():
        expected = [(p.task, p.label) for p in predictor.predict([image_files[0], array], task=task)]
    for single, pair in [(str(image_files[0]), expected[0]), (array, expected[1])]:
        assert [(r["task"], r["label"]) for r in classifier.predict(single, task=task)] == [pair]
    # Any iterable, read once, as the Predictor reads it: a generator was taken for one image and refused.
    given = classifier.predict((source for source in [image_files[0], array]), task=task)
    assert [(r["task"], r["label"]) for r in given] == expected
    refusals = {
        "no images given to predict.": [],
        "image 0: a numpy array of shape (4, 4) and dtype float32; pass uint8 [H, W], [H, W, 3] or [H, W, 4] arrays, "
        "image paths or PIL images.": [np.zeros((4, 4), np.float32)],
        "image 1: unsupported image input (int); pass image paths, PIL images or uint8 arrays.": [array, 3],
    }
    for message, sources in refusals.items():
        with pytest.raises(ServingError) as refused:
            classifier.predict(sources, task=task)
        assert str(refused.value) == message


def test_the_task_argument_must_fit_the_export_mode(exported_model, image_files):
    model_path, task_input = exported_model
    classifier = OnnxClassifier(model_path, providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="pass one of" if task_input else "routes each image itself"):
        classifier.predict(image_files, task=None if task_input else "task0")


def test_command_line_prints_one_json_line_per_image(exported_model, image_files):
    model_path, task_input = exported_model
    command = [sys.executable, "-m", "export.serve_onnx", str(model_path), *map(str, image_files[:2])]
    command += ["--task", "task2"] if task_input else []
    output = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert output.returncode == 0, output.stderr
    # Only JSON lines on stdout (the providers line came first there), for a consumer of them.
    results = [json.loads(line) for line in output.stdout.strip().splitlines()]
    assert output.stderr.startswith("providers: ")
    assert [r["image"] for r in results] == [str(p) for p in image_files[:2]]
    assert all(0 < r["score"] <= 1 for r in results)
    assert not task_input or all(r["task"] == "task2" for r in results)


def test_the_server_runs_as_a_script_from_any_folder(exported_model, image_files, tmp_path):
    """The README's script form: serve_onnx.py imports nothing else of the kit, so that one file serves."""
    model_path, task_input = exported_model
    command = [sys.executable, str(REPO / "export" / "serve_onnx.py"), str(model_path), str(image_files[0])]
    command += ["--task", "task0"] if task_input else []
    output = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert output.returncode == 0, output.stderr
    assert json.loads(output.stdout)["image"] == str(image_files[0])


def _serve(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "export.serve_onnx", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO)


def test_command_line_errors_are_one_line_naming_the_fault(exported_model, image_files, tmp_path):
    """A missing file, a file that is no image and a wrong --task used to end in a Python traceback."""
    model_path, task_input = exported_model
    missing, not_an_image = tmp_path / "missing.png", tmp_path / "notes.png"
    not_an_image.write_text("not pixels")
    good_task = ["--task", "task1"] if task_input else []  # so that only the fault at hand is wrong
    wrong_task = (["--task", "cars"], "pass one of ['task0', 'task1', 'task2']")
    if not task_input:
        wrong_task = (["--task", "task0"], "this model routes each image itself: give no task")
    cases = {
        "missing image": ([model_path, image_files[0], missing, *good_task], f"error: {missing}: no such image file"),
        "not an image": ([model_path, not_an_image, *good_task], f"error: {not_an_image}: cannot decode the image"),
        "wrong task": ([model_path, image_files[0], *wrong_task[0]], wrong_task[1]),
        "missing model": (
            [tmp_path / "model.onnx", image_files[0]],
            f"error: {tmp_path / 'model.onnx'}: no such model",
        ),
    }
    for name, (args, expected) in cases.items():
        output = _serve(*args)
        assert output.returncode == 1, (name, output.stderr)
        assert output.stderr.startswith("error: ") and output.stderr.count("\n") == 1, (name, output.stderr)
        assert expected in output.stderr, (name, output.stderr)
        assert output.stdout == "", name


def test_serving_kit_does_not_import_torch():
    code = "import sys, export.serve_onnx, export.triton; print('torch' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert output.stdout.strip() == "False", output.stderr


@pytest.mark.parametrize("damage", ["missing", "not JSON"])
def test_damaged_metadata_is_a_serving_error(exported_model, tmp_path, damage):
    """A model with the esmpp format mark but a metadata entry missing or garbled used to raise a KeyError."""
    model = onnx.load(exported_model[0])
    entries = [entry for entry in model.metadata_props if entry.key == "esmpp.preprocessing"]
    if damage == "missing":
        model.metadata_props.remove(entries[0])
    else:
        entries[0].value = "{not json"
    onnx.save_model(model, tmp_path / "model.onnx")
    with pytest.raises(ServingError, match=r"esmpp metadata is incomplete or damaged.*export the artifact again"):
        OnnxClassifier(tmp_path / "model.onnx")
