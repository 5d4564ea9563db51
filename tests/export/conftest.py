"""Exported random models shared by the deployment-kit tests (one export per mode per session)."""

import pytest

from esmpp.artifact import save_artifact
from esmpp.onnx import export_onnx
from tests.conftest import random_artifact


@pytest.fixture(scope="session")
def artifact_path(tmp_path_factory):
    return save_artifact(random_artifact(num_tasks=3), tmp_path_factory.mktemp("artifact") / "art")


@pytest.fixture(scope="session", params=[False, True], ids=["routed", "task_input"])
def exported_model(request, artifact_path, tmp_path_factory):
    """(path of model.onnx, task_input)"""
    out = tmp_path_factory.mktemp("onnx") / "model"
    return export_onnx(artifact_path, out, task_input=request.param).path, request.param
