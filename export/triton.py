"""Generate a Triton Inference Server model repository for an exported esmpp model.

Layout::

    <repository>/<name>/config.pbtxt        backend "onnxruntime", batching, inputs/outputs from the graph
    <repository>/<name>/esmpp.json          the model's esmpp.* metadata (tasks, classes, preprocessing)
    <repository>/<name>/<version>/model.onnx (+ model.onnx.data)

Run as ``python -m export.triton MODEL.onnx REPOSITORY [--name esmpp] [--max-batch-size 64] [--cpu]`` from the
folder that holds ``export/`` (as a module: it imports ``export.serve_onnx``, and run as a file it would shadow
the ``triton`` compiler package on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from export.serve_onnx import ServingError, check_model_file, one_line_errors, read_metadata, unreadable_model

# ONNX element types → Triton data types (model_config.proto's DataType).
TRITON_TYPES = {
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
}


class EnumValue(str):
    """A protobuf enum value: written bare in text format (``TYPE_FP32``), where strings are quoted."""


def tensor_config(value: onnx.ValueInfoProto) -> dict:
    """One graph input/output as a Triton tensor entry: the batch axis (first, dynamic) is left out of
    ``dims``; a tensor that is only a batch ([batch]) is declared ``dims: [1]`` and reshaped to ``[]``."""
    tensor = value.type.tensor_type
    if tensor.elem_type not in TRITON_TYPES:
        raise ServingError(f"{value.name}: ONNX element type {tensor.elem_type} has no Triton data type")
    dims = list(tensor.shape.dim)
    if not dims or dims[0].HasField("dim_value"):
        raise ServingError(f"{value.name}: the first axis must be a dynamic batch axis for Triton's batching")
    if any(not dim.HasField("dim_value") for dim in dims[1:]):
        raise ServingError(f"{value.name}: only the batch axis may be dynamic, got {dims}")
    entry = {"name": value.name, "data_type": EnumValue(TRITON_TYPES[tensor.elem_type])}
    if len(dims) == 1:
        return {**entry, "dims": [1], "reshape": {"shape": []}}
    return {**entry, "dims": [dim.dim_value for dim in dims[1:]]}


def triton_config(
    model: onnx.ModelProto,
    name: str,
    max_batch_size: int = 64,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32),
    max_queue_delay_microseconds: int = 500,
    gpu: bool = True,
) -> dict:
    """The ``ModelConfig`` of ``model`` as nested dicts/lists (``config_text`` writes it)."""
    if max_batch_size < 1:
        # Below 1, Triton drops the batch axis from every shape and refuses dynamic batching.
        raise ServingError(
            f"max_batch_size (--max-batch-size) must be at least 1, got {max_batch_size}: the model batches along"
            " its first axis."
        )
    return {
        "name": name,
        "backend": "onnxruntime",
        "max_batch_size": max_batch_size,
        "input": [tensor_config(value) for value in model.graph.input],
        "output": [tensor_config(value) for value in model.graph.output],
        "dynamic_batching": {
            "preferred_batch_size": [size for size in preferred_batch_sizes if size <= max_batch_size],
            "max_queue_delay_microseconds": max_queue_delay_microseconds,
        },
        "instance_group": [{"count": 1, "kind": EnumValue("KIND_GPU" if gpu else "KIND_CPU")}],
    }


def _scalar(value) -> str:
    if isinstance(value, EnumValue):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def config_text(config: dict, indent: int = 0) -> str:
    """Protobuf text format of a config built from dicts (messages), lists (repeated fields) and scalars."""
    pad = "  " * indent
    lines = []
    for key, value in config.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", config_text(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            items = [f"{pad}  {{\n{config_text(item, indent + 2)}\n{pad}  }}" for item in value]
            lines += [f"{pad}{key} [", ",\n".join(items), f"{pad}]"]
        elif isinstance(value, list):
            items = ", ".join(_scalar(item) for item in value)
            lines.append(f"{pad}{key}: [ {items} ]" if items else f"{pad}{key}: [ ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


def write_triton_repository(
    model_path: Path,
    repository: Path,
    name: str = "esmpp",
    version: int = 1,
    max_batch_size: int = 64,
    gpu: bool = True,
) -> Path:
    """Write ``repository/name`` for the exported ``model_path`` (its external data file comes along);
    returns the model directory. What cannot be written as Triton would load it is a ``ServingError``, raised
    before anything is written but for a failing write."""
    if version < 1:
        raise ServingError(
            f"version (--version) must be at least 1, got {version}: Triton ignores a version folder whose name"
            " starts with 0 or is not a number."
        )
    model_path = check_model_file(model_path)
    try:
        # Binary protobuf, as `esmpp export` writes it and onnxruntime reads it (onnx guesses from the suffix).
        model = onnx.load(str(model_path), format="protobuf", load_external_data=False)
    except DecodeError as exc:
        raise unreadable_model(model_path, exc) from exc
    entries = {prop.key: prop.value for prop in model.metadata_props}
    read_metadata(entries, model_path)  # the same model that serve_onnx serves, for esmpp.json's clients
    config = triton_config(model, name, max_batch_size=max_batch_size, gpu=gpu)
    data_files = sorted(
        {entry.value for tensor in model.graph.initializer for entry in tensor.external_data if entry.key == "location"}
    )
    for data_file in data_files:
        if not (model_path.parent / data_file).is_file():
            raise ServingError(
                f"{model_path.parent / data_file} is missing: {model_path.name} keeps its weights there; copy it "
                "beside the model as `esmpp export` wrote it."
            )
    model_dir = Path(repository) / name
    version_dir = model_dir / str(version)
    existing = next(folder for folder in (version_dir, *version_dir.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise ServingError(f"{existing} is a file: give a folder for the model repository (it is made if missing).")
    try:
        version_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_path, version_dir / "model.onnx")
        for data_file in data_files:
            shutil.copyfile(model_path.parent / data_file, version_dir / data_file)
        (model_dir / "config.pbtxt").write_text(config_text(config) + "\n")
        metadata = {key: value for key, value in entries.items() if key.startswith("esmpp.")}
        (model_dir / "esmpp.json").write_text(json.dumps(metadata, indent=2))
    except OSError as exc:  # a forbidden folder, a full disk
        raise ServingError(f"could not write {model_dir} ({exc}); choose another repository folder.") from exc
    return model_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="model.onnx written by `esmpp export`")
    parser.add_argument("repository", type=Path, help="Triton model repository directory")
    parser.add_argument("--name", default="esmpp")
    parser.add_argument("--version", type=int, default=1, help="version folder, at least 1 (default: 1)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="at least 1 (default: 64)")
    parser.add_argument("--cpu", action="store_true", help="KIND_CPU instances instead of KIND_GPU")
    args = parser.parse_args(argv)
    with one_line_errors(parser):
        model_dir = write_triton_repository(
            args.model, args.repository, args.name, args.version, args.max_batch_size, gpu=not args.cpu
        )
    print(f"Triton model repository entry: {model_dir}")


if __name__ == "__main__":
    main()
