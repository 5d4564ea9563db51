"""The deployment-kit tests' view of the shared export fixtures (tests/conftest.py)."""

import pytest


@pytest.fixture(scope="session")
def artifact_path(saved_artifact):
    return saved_artifact


@pytest.fixture(scope="session")
def exported_model(exported):
    """(path of model.onnx, task_input)"""
    report, _ = exported
    return report.path, report.mode == "task_input"
