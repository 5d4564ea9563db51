import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import typer
from onnx import numpy_helper
from typer.testing import CliRunner

import esmpp.onnx as esmpp_onnx
from esmpp.artifact import load_artifact, read_manifest
from esmpp.cli import app
from esmpp.errors import ArtifactError, ConfigError, EsmppError
from esmpp.onnx import (
    FP32_TOLERANCE,
    MAX_OPSET,
    MIN_OPSET,
    REPORT_FILE,
    export_onnx,
    export_tower,
    verify_parity,
)
from esmpp.runtime.model import PADDED_LOGIT, Experts
from tests.conftest import random_artifact


def _run(path, pixels, task_ids=None):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"pixel_values": pixels.numpy()}
    if task_ids is not None:
        feeds["forced_task_id"] = task_ids.numpy()
    return session.run(["task_id", "logits", "embedding"], feeds)


def test_onnx_matches_the_runtime_at_another_batch_size(exported, saved_artifact):
    report, out = exported
    assert report.parity.passed and report.parity.routing_agreement == 1.0
    assert report.parity.batch_size != esmpp_onnx.EXAMPLE_BATCH
    model = load_artifact(saved_artifact).to_model()
    for batch in (1, 5):
        pixels = torch.randn(batch, 3, 16, 16)
        task_ids = torch.arange(batch) % 3 if report.mode == "task_input" else None
        task, logits, embedding = _run(out / "model.onnx", pixels, task_ids)
        with torch.no_grad():
            reference = model(pixels, task_ids)
        np.testing.assert_array_equal(task, reference.task.numpy())
        np.testing.assert_allclose(logits, reference.logits.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(embedding, reference.embedding.numpy(), atol=1e-4, rtol=0)
        assert (logits[reference.logits.numpy() == PADDED_LOGIT] == PADDED_LOGIT).all()


def test_graph_has_a_dynamic_batch_and_routes_with_graph_ops(exported):
    report, out = exported
    graph = onnx.load(str(out / "model.onnx")).graph
    names = [value.name for value in graph.input]
    assert names == (["pixel_values", "forced_task_id"] if report.mode == "task_input" else ["pixel_values"])
    assert [value.name for value in graph.output] == ["task_id", "logits", "embedding"]
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param, f"{value.name} has a fixed batch"
    ops = {node.op_type for node in graph.node}
    assert {"Gather", "Einsum"} <= ops
    assert ("ArgMax" in ops) == (report.mode == "routed")


def test_metadata_lets_a_server_run_without_the_artifact(exported, saved_artifact):
    report, out = exported
    meta = {prop.key: prop.value for prop in onnx.load(str(out / "model.onnx")).metadata_props}
    assert meta["esmpp.mode"] == report.mode
    assert json.loads(meta["esmpp.tasks"]) == ["task0", "task1", "task2"]
    assert json.loads(meta["esmpp.classes"])[2] == ["c2_0", "c2_1", "c2_2", "c2_3"]
    assert json.loads(meta["esmpp.valid_classes"]) == [2, 3, 4]
    preprocessing = json.loads(meta["esmpp.preprocessing"])
    assert preprocessing["image_size"] == 16 and len(preprocessing["mean"]) == len(preprocessing["std"]) == 3
    assert json.loads(meta["esmpp.manifest"]) == read_manifest(saved_artifact)
    assert json.loads((out / REPORT_FILE).read_text()) == json.loads(json.dumps(report.to_dict()))


def test_the_logits_metadata_states_the_formula_the_graph_computes(exported, saved_artifact):
    """It said "cosine(embedding, class head)", but heads carry the logit scale (norm 16 in the zoo)."""
    _, out = exported
    meta = {prop.key: prop.value for prop in onnx.load(str(out / "model.onnx")).metadata_props}
    assert meta["esmpp.logits"].startswith("normalize(embedding) @ head.T (the task's class heads, logit scale")
    heads = load_artifact(saved_artifact).heads
    task_ids = torch.tensor([0, 1, 2]) if meta["esmpp.mode"] == "task_input" else None
    task, logits, embedding = _run(out / "model.onnx", torch.randn(3, 3, 16, 16), task_ids)
    unit = embedding / np.linalg.norm(embedding, axis=-1, keepdims=True)
    for i, t in enumerate(task.tolist()):
        expected = unit[i] @ heads[t].numpy().T
        np.testing.assert_allclose(logits[i, : len(expected)], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("exported", [True], ids=["task_input"], indirect=True)
def test_a_forced_task_id_outside_the_tasks_fails_the_run(exported):
    """-1 gave the last task's logits with task_id -1 (ONNX's Gather reads -1 as Python does); 3 failed."""
    _, out = exported
    pixels = torch.randn(2, 3, 16, 16)
    assert _run(out / "model.onnx", pixels, torch.tensor([2, 0]))[0].tolist() == [2, 0]
    for task_ids in ([-1, 0], [0, 3], [1, -4]):
        with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="invalid index found, index = 3"):
            _run(out / "model.onnx", pixels, torch.tensor(task_ids))


def _tamper(proto):
    """Perturb the largest float initializer (not by a constant, which a LayerNorm would cancel): a broken
    export that still loads and runs."""
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda t: np.prod(t.dims))
    values = numpy_helper.to_array(target)
    noise = np.random.default_rng(0).normal(0, 0.05, values.shape).astype(values.dtype)
    target.CopyFrom(numpy_helper.from_array(values + noise, target.name))
    return proto


def test_parity_check_catches_a_tampered_initializer(exported, saved_artifact, tmp_path):
    report, out = exported
    tampered = tmp_path / "tampered.onnx"
    onnx.save(_tamper(onnx.load(str(out / "model.onnx"))), str(tampered))
    model = load_artifact(saved_artifact).to_model()
    task_input = report.mode == "task_input"
    assert verify_parity(out / "model.onnx", model, ["a", "b", "c"], task_input, FP32_TOLERANCE).passed
    with pytest.raises(EsmppError, match=r"does not match the PyTorch runtime.*error"):
        verify_parity(tampered, model, ["a", "b", "c"], task_input, FP32_TOLERANCE)


def test_failed_parity_leaves_nothing_written(saved_artifact, tmp_path, monkeypatch):
    write = esmpp_onnx.write_model
    monkeypatch.setattr(esmpp_onnx, "write_model", lambda proto, path: write(_tamper(proto), path))
    with pytest.raises(EsmppError, match="Nothing was written"):
        export_onnx(saved_artifact, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_inconsistent_artifact_is_refused_before_export(tmp_path):
    artifact = random_artifact()
    key = next(iter(artifact.experts))
    layer = artifact.experts[key]
    artifact.experts[key] = Experts(layer.up, layer.down, layer.prototypes[:, :, :5])
    with pytest.raises(ArtifactError, match="inconsistent"):
        export_onnx(artifact, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(exported, saved_artifact):
    _, out = exported
    with pytest.raises(EsmppError, match="--overwrite"):
        export_onnx(saved_artifact, out)


def test_an_out_that_would_be_refused_is_refused_before_the_artifact_is_read(saved_artifact, tmp_path, monkeypatch):
    """The artifact (its checksums, its model) was read before the destination was looked at."""

    def read(*args, **kwargs):
        raise AssertionError("the artifact was read before --out was checked")

    monkeypatch.setattr(esmpp_onnx, "load_artifact", read)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"memories")
    with pytest.raises(EsmppError, match="photos is a folder that esmpp did not write"):
        export_onnx(saved_artifact, tmp_path / "photos")


def test_a_wrong_artifact_path_leaves_no_folder_for_out(tmp_path):
    with pytest.raises(ArtifactError, match="is not an artifact directory"):
        export_onnx(tmp_path / "nope", tmp_path / "new" / "sub" / "onnx")
    assert not (tmp_path / "new").exists()


def test_the_opset_range_is_what_the_exporter_writes_and_others_are_refused_before_any_work(
    saved_artifact, tiny_visual, tiny_arch, tmp_path
):
    """Below the range the exporter silently wrote opset 18 instead; above it, a graph onnxruntime refuses."""
    for opset in (MIN_OPSET, MAX_OPSET):
        report = export_onnx(saved_artifact, tmp_path / f"opset{opset}", opset=opset)
        assert report.opset == opset and report.parity.passed
    for opset in (MIN_OPSET - 1, MAX_OPSET + 1):
        with pytest.raises(ConfigError, match=f"--opset {opset} is not supported.*{MIN_OPSET} to {MAX_OPSET}"):
            export_onnx(saved_artifact, tmp_path / "refused", opset=opset)
        with pytest.raises(ConfigError, match=f"--opset {opset}"):
            export_tower(tiny_visual, tiny_arch, tmp_path / "tower" / "model.onnx", opset=opset)
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"opset{MIN_OPSET}", f"opset{MAX_OPSET}"]


def test_export_help_states_the_opset_range_and_the_default(exported):
    report, _ = exported
    options = {param.name: param for param in typer.main.get_command(app).commands["export"].params}
    assert f"{MIN_OPSET} to {MAX_OPSET} (default: the exporter's, {report.opset})" in options["opset"].help


def test_cli_exports_fp16_and_prints_parity_and_provider(saved_artifact, tmp_path):
    result = CliRunner().invoke(app, ["export", str(saved_artifact), "--out", str(tmp_path / "m"), "--fp16"])
    assert result.exit_code == 0, result.output
    assert "provider: CPUExecutionProvider" in result.output
    assert "routing agreement" in result.output and "tolerance 0.02" in result.output
    proto = onnx.load(str(tmp_path / "m" / "model.onnx"))
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in proto.graph.initializer}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    report = json.loads((tmp_path / "m" / REPORT_FILE).read_text())
    assert report["fp16"] and 0 < report["parity"]["logits_error"] <= 2e-2


def test_soft_top_k_routing_exports_and_matches_pytorch(tmp_path):
    """Soft routing (two weighted experts per image) is graph ops too: the traced graph matches PyTorch."""
    model = random_artifact(num_tasks=3).to_model()
    model.control.mode, model.control.top_k, model.control.temperature = "soft", 2, 0.5
    path = tmp_path / "soft.onnx"
    esmpp_onnx.write_model(esmpp_onnx._trace(model, task_input=False, opset=None), path)
    report = verify_parity(path, model, ["a", "b", "c"], task_input=False)
    assert report.passed and report.routing_agreement == 1.0
