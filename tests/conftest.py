"""Shared fixtures. ``tiny_zoo`` builds the tiny preset once per test session (seconds) into a temp dir."""

from __future__ import annotations

import pytest

from esmpp.zoo import Zoo, build_zoo


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return build_zoo("tiny", root=tmp_path_factory.mktemp("zoo") / "tiny", progress=False)
