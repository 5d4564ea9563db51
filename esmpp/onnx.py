"""ONNX export of the routed ESM++ encoder, checked against the PyTorch runtime with onnxruntime.

The exported graph is the real ``RoutedEncoder`` traced by ``torch.onnx.export`` (dynamo): routing is
already written with graph ops (mean, MatMul, ArgMax, Gather on the stacked experts, Einsum), so the
graph routes each image of a dynamic batch itself. Inputs ``pixel_values`` [batch, 3, H, W] float32
(+ ``forced_task_id`` [batch] int64 in task-input mode, which skips routing; an id outside [0, T) fails the run,
see :func:`esmpp.runtime.routing.forced_route`); outputs ``task_id`` [batch] int64,
``logits`` [batch, max_classes] (padding classes = ``PADDED_LOGIT``) and ``embedding`` [batch, embed_dim].
Everything a server needs (tasks, classes, preprocessing, the artifact's manifest) is in the model's
``metadata_props`` under ``esmpp.*`` keys.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from esmpp.architecture import Architecture
from esmpp.artifact import Artifact, describe_artifact, load_artifact, read_manifest
from esmpp.atomic import atomic_directory, check_destination, claimed_destination
from esmpp.errors import ConfigError, EsmppError
from esmpp.folders import EXPORT_REPORT as REPORT_FILE
from esmpp.images import normalise
from esmpp.runtime.model import PADDED_LOGIT, RoutedEncoder

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
ONNX_FORMAT_VERSION = 1
INPUT_NAMES = ("pixel_values", "forced_task_id")
OUTPUT_NAMES = ("task_id", "logits", "embedding")
# The example batch the graph is traced with; parity is checked at another size to prove the batch is dynamic.
EXAMPLE_BATCH = 2
# Weights above this size go to an external data file (protobuf cannot hold more than 2 GB).
EXTERNAL_DATA_BYTES = 1 << 30
# The opsets the exporter writes as asked (torch 2.15, onnxscript 0.7; test_onnx exports at both ends). Below 18,
# the first it has implementations for, it converts down or silently keeps 18; above 25 its version converter
# fails and it writes a graph that onnxruntime refuses.
MIN_OPSET = 18
MAX_OPSET = 25


@dataclass(frozen=True)
class Tolerance:
    """What parity requires. Errors are max |onnx − torch| / max(1, max |torch|) over each output's valid
    entries: relative to the output's scale (the zoo's heads fold in a logit scale, so logits reach about 15),
    the plain max abs difference for outputs within ±1."""

    logits: float
    embedding: float
    routing_agreement: float  # least fraction of images whose task must match; values compare on those


FP32_TOLERANCE = Tolerance(logits=1e-4, embedding=1e-4, routing_agreement=1.0)
# fp16 keeps ~3 significant digits through every block: 2% of the output scale, and a near-tie in the
# router may flip for one image in ten.
FP16_TOLERANCE = Tolerance(logits=2e-2, embedding=2e-2, routing_agreement=0.9)


@dataclass
class ParityReport:
    batch_size: int
    providers: list[str]
    routing_agreement: float  # fraction of images with the same task in ONNX and PyTorch
    logits_error: float
    embedding_error: float
    tolerance: dict[str, float]
    coverage: dict[str, int]  # task name → images of the parity batch given or routed to it
    passed: bool


@dataclass
class ExportReport:
    path: Path
    mode: str  # "routed" or "task_input"
    opset: int
    fp16: bool
    size_bytes: int
    seconds: float
    providers: list[str] = field(default_factory=list)
    parity: ParityReport | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def choose_providers() -> list[str]:
    """onnxruntime execution providers: CUDA first when onnxruntime-gpu is installed and a GPU is visible."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def inference_session(
    path: Path, providers: list[str] | None = None, threads: int | None = None
) -> ort.InferenceSession:
    """An onnxruntime session on ``providers`` (default: ``choose_providers()``) with ``threads`` intra-op
    threads (default: onnxruntime's choice). TF32 is off on CUDA so float32 results can be compared with
    PyTorch's at 1e-4."""
    providers = providers or choose_providers()
    provider_options = [{"use_tf32": "0"} if name == "CUDAExecutionProvider" else {} for name in providers]
    session_options = ort.SessionOptions()
    if threads is not None:
        session_options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), session_options, providers=providers, provider_options=provider_options)


class _ExportGraph(nn.Module):
    """The routed encoder with tuple outputs, the form ``torch.onnx.export`` takes."""

    def __init__(self, model: RoutedEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, pixel_values: torch.Tensor, task_id: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        output = self.model(pixel_values, task_id)
        return output.task, output.logits, output.embedding


def _artifact_and_manifest(source: Artifact | str | Path) -> tuple[Artifact, dict[str, Any]]:
    if isinstance(source, Artifact):
        source.validate()
        return source, describe_artifact(source)
    return load_artifact(Path(source)), read_manifest(Path(source))


def preprocessing_spec(arch: Architecture) -> dict[str, Any]:
    """How images become ``pixel_values`` (open_clip's evaluation transform), for servers without torch."""
    return {
        "image_size": arch.image_size,
        "resize": "shortest_side",
        "interpolation": "bicubic",
        "crop": "center",
        "channels": "RGB",
        "layout": "NCHW",
        "scale": 1.0 / 255.0,
        "mean": list(arch.mean),
        "std": list(arch.std),
    }


def export_metadata(artifact: Artifact, manifest: dict[str, Any], task_input: bool) -> dict[str, str]:
    """The ``metadata_props`` of an exported model: everything a server needs besides the graph."""
    return {
        "esmpp.format": "esmpp-onnx",
        "esmpp.format_version": str(ONNX_FORMAT_VERSION),
        "esmpp.mode": "task_input" if task_input else "routed",
        "esmpp.tasks": json.dumps([task.name for task in artifact.tasks]),
        "esmpp.classes": json.dumps([task.classes for task in artifact.tasks]),
        "esmpp.valid_classes": json.dumps([len(task.classes) for task in artifact.tasks]),
        "esmpp.padded_logit": repr(PADDED_LOGIT),
        "esmpp.logits": "normalize(embedding) @ head.T (the task's class heads, logit scale folded in); softmax "
        "over the task's valid classes",
        "esmpp.preprocessing": json.dumps(preprocessing_spec(artifact.arch)),
        "esmpp.manifest": json.dumps(manifest, sort_keys=True),
    }


def check_opset(opset: int | None) -> None:
    """Raise :class:`ConfigError` for an opset outside ``MIN_OPSET``..``MAX_OPSET``; ``None`` is the exporter's
    default."""
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(
            f"--opset {opset} is not supported: the ONNX exporter writes opsets {MIN_OPSET} to {MAX_OPSET}; "
            "pass one of those, or leave --opset out for its default."
        )


def trace_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int | None = None,
) -> onnx.ModelProto:
    """``module`` (eval mode) traced by the dynamo exporter on ``args`` at ``opset`` (see :func:`check_opset`),
    axis 0 of every input being one dynamic ``batch`` axis."""
    check_opset(opset)
    batch = torch.export.Dim("batch", min=1)
    # The exporter prints its progress on stdout; the CLI prints its own summary instead.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # Inputs share the one batch axis; the exporter warns that it keeps a single name for it.
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=tuple({0: batch} for _ in args),
            verbose=False,
        )
    return program.model_proto


def _trace(model: RoutedEncoder, task_input: bool, opset: int | None) -> onnx.ModelProto:
    size = model.arch.image_size
    pixels = torch.randn(EXAMPLE_BATCH, 3, size, size)
    args: tuple[torch.Tensor, ...] = (pixels,)
    if task_input:
        args = (pixels, torch.arange(EXAMPLE_BATCH) % model.num_tasks)
    try:
        return trace_graph(_ExportGraph(model).eval(), args, INPUT_NAMES[: len(args)], OUTPUT_NAMES, opset)
    finally:
        model.control.start_pass()  # drop the traced tensors the pass left in the routing control


def _to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Inputs and outputs stay float32 so clients are the same for both precisions.
    return convert_float_to_float16(proto, keep_io_types=True)


def write_model(proto: onnx.ModelProto, path: Path) -> None:
    """Save ``proto`` at ``path``, its weights in ``EXTERNAL_DATA_FILE`` beside it when they exceed
    ``EXTERNAL_DATA_BYTES``."""
    weights = sum(len(tensor.raw_data) for tensor in proto.graph.initializer)
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=weights > EXTERNAL_DATA_BYTES,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_FILE,
    )


def probe_images(arch: Architecture, count: int, seed: int = 0) -> torch.Tensor:
    """Synthetic normalised images [count, 3, H, W]: smooth colour fields of varied frequency and contrast
    plus pixel noise, a wider spread of routing features than white noise alone."""
    generator = torch.Generator().manual_seed(seed)
    size = arch.image_size
    images = []
    for i in range(count):
        coarse = torch.rand(1, 3, 2 + i % 7, 2 + i % 7, generator=generator)
        smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        noise = torch.rand(1, 3, size, size, generator=generator)
        mix = float(torch.rand(1, generator=generator))
        images.append((mix * smooth + (1 - mix) * noise).clamp(0, 1))
    return normalise(torch.cat(images), arch)


def _parity_inputs(
    model: RoutedEncoder, task_input: bool, batch_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A parity batch: in task-input mode every task in turn; in routed mode, from a pool of probe images,
    one routed to each task the router picks for any of them, then the rest of the pool."""
    T = model.num_tasks
    if task_input:
        return probe_images(model.arch, batch_size, seed), torch.arange(batch_size) % T
    pool = probe_images(model.arch, max(4 * batch_size, 8 * T), seed)
    with torch.no_grad():
        tasks = model(pool).task
    firsts = [int(torch.nonzero(tasks == t)[0]) for t in range(T) if (tasks == t).any()]
    rest = [i for i in range(pool.shape[0]) if i not in firsts]
    return pool[(firsts + rest)[:batch_size]], None


def _scaled_error(onnx_values: np.ndarray, reference: np.ndarray, valid: np.ndarray | None = None) -> float:
    """max |onnx − reference| / max(1, max |reference[valid]|); padding entries count in the difference
    (they must match too) but not in the scale (−1e4 would hide every real error)."""
    if reference.size == 0:
        return 0.0
    scale = max(1.0, float(np.abs(reference if valid is None else reference[valid]).max()))
    return float(np.abs(onnx_values - reference).max()) / scale


def verify_parity(
    path: Path,
    model: RoutedEncoder,
    task_names: list[str],
    task_input: bool,
    tolerance: Tolerance = FP32_TOLERANCE,
    batch_size: int | None = None,
    providers: list[str] | None = None,
    seed: int = 0,
) -> ParityReport:
    """Run the ONNX model at ``path`` and the PyTorch ``model`` on the same parity batch (default size
    max(8, T), never the export's example batch) and compare routing, logits and embeddings.

    Raises ``EsmppError`` with the numbers when they differ beyond ``tolerance``."""
    batch_size = batch_size or max(8, model.num_tasks)
    if batch_size == EXAMPLE_BATCH:
        batch_size += 1
    pixels, task_ids = _parity_inputs(model, task_input, batch_size, seed)
    with torch.no_grad():
        reference = model(pixels, task_ids)
    session = inference_session(path, providers)
    feeds = {"pixel_values": pixels.numpy()}
    if task_input:
        feeds["forced_task_id"] = task_ids.numpy()
    onnx_task, onnx_logits, onnx_embedding = session.run(list(OUTPUT_NAMES), feeds)
    ref_task = reference.task.numpy()
    agree = onnx_task == ref_task
    valid_classes = model.head_mask[reference.task].numpy()[agree]
    logits_error = _scaled_error(onnx_logits[agree], reference.logits.numpy()[agree], valid_classes)
    embedding_error = _scaled_error(onnx_embedding[agree], reference.embedding.numpy()[agree])
    report = ParityReport(
        batch_size=batch_size,
        providers=session.get_providers(),
        routing_agreement=float(agree.mean()),
        logits_error=logits_error,
        embedding_error=embedding_error,
        tolerance=asdict(tolerance),
        coverage={name: int((ref_task == t).sum()) for t, name in enumerate(task_names)},
        passed=bool(
            agree.mean() >= tolerance.routing_agreement
            and logits_error <= tolerance.logits
            and embedding_error <= tolerance.embedding
        ),
    )
    if not report.passed:
        raise EsmppError(
            f"{path}: the ONNX model does not match the PyTorch runtime on {batch_size} images "
            f"({', '.join(report.providers)}): routing agreement {report.routing_agreement:.3f} "
            f"(need ≥ {tolerance.routing_agreement}), logits error {logits_error:.3g} (need ≤ {tolerance.logits}), "
            f"embedding error {embedding_error:.3g} (need ≤ {tolerance.embedding}). Nothing was written; "
            "rerun with --debug and report the bug."
        )
    return report


def export_tower(
    visual: nn.Module,
    arch: Architecture,
    path: Path,
    opset: int | None = None,
    providers: list[str] | None = None,
    tolerance: float = FP32_TOLERANCE.embedding,
) -> float:
    """Export a plain open_clip visual tower to ``path`` (input ``pixel_values`` [batch, 3, H, W], output
    ``embedding`` [batch, embed_dim]) — the baseline the routed graph is measured against — and check it
    with onnxruntime on probe images. Returns the error (as in ``verify_parity``); raises ``EsmppError``
    above ``tolerance``."""
    size = arch.image_size
    proto = trace_graph(
        visual.eval(), (torch.randn(EXAMPLE_BATCH, 3, size, size),), INPUT_NAMES[:1], OUTPUT_NAMES[2:], opset
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_model(proto, path)
    pixels = probe_images(arch, EXAMPLE_BATCH + 1)
    with torch.no_grad():
        reference = visual(pixels).numpy()
    (embedding,) = inference_session(path, providers).run(None, {INPUT_NAMES[0]: pixels.numpy()})
    error = _scaled_error(embedding, reference)
    if error > tolerance:
        raise EsmppError(f"{path}: the ONNX tower does not match PyTorch (embedding error {error:.3g} > {tolerance}).")
    return error


def export_onnx(
    artifact: Artifact | str | Path,
    out_dir: Path,
    opset: int | None = None,
    fp16: bool = False,
    task_input: bool = False,
    check: bool = True,
    overwrite: bool = False,
) -> ExportReport:
    """Export an ESM++ artifact (directory or ``Artifact``) to ``out_dir/model.onnx`` + ``export.json``.

    ``task_input``: the graph takes ``forced_task_id`` [batch] and skips routing. ``fp16``: weights and compute in
    float16, inputs and outputs float32. ``check``: onnxruntime parity with the PyTorch runtime before
    anything is moved into place. Written atomically: a failure leaves ``out_dir`` as it was. An ``opset``
    outside ``MIN_OPSET``..``MAX_OPSET``, and an ``out_dir`` that could not be written, are refused before the
    artifact is read."""
    check_opset(opset)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if not isinstance(artifact, Artifact):
        read_manifest(Path(artifact))  # a wrong path fails before the check below makes --out's parent folders
    with claimed_destination(out_dir):  # a second export to out_dir is refused before its export
        check_destination(out_dir, overwrite, marker=REPORT_FILE)
        artifact, manifest = _artifact_and_manifest(artifact)
        model = artifact.to_model()
        with atomic_directory(out_dir, overwrite=overwrite, marker=REPORT_FILE) as staging:
            proto = _trace(model, task_input, opset)
            onnx.helper.set_model_props(proto, export_metadata(artifact, manifest, task_input))
            if fp16:
                proto = _to_fp16(proto)
            write_model(proto, staging / MODEL_FILE)
            parity = None
            if check:
                parity = verify_parity(
                    staging / MODEL_FILE,
                    model,
                    [task.name for task in artifact.tasks],
                    task_input,
                    FP16_TOLERANCE if fp16 else FP32_TOLERANCE,
                )
            report = ExportReport(
                path=out_dir / MODEL_FILE,
                mode="task_input" if task_input else "routed",
                opset=next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")),
                fp16=fp16,
                size_bytes=sum(file.stat().st_size for file in staging.iterdir()),
                seconds=time.perf_counter() - start,
                providers=parity.providers if parity else choose_providers(),
                parity=parity,
            )
            (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return report
