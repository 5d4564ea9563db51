"""The same config built twice through the CLI gives a bit-identical artifact directory (every file hashed)."""

from __future__ import annotations

from tests.reliability.project import directory_digest, run_esmpp, write_project


def test_two_cli_builds_from_one_config_are_bit_identical(tmp_path):
    # Several prototypes per task: spherical k-means (faiss) must be seeded too.
    config = write_project(tmp_path / "project", num_tasks=3, images_per_task=4, options={"prototypes_per_task": 2})
    digests = []
    for name in ("first", "second"):
        result = run_esmpp("build", config, "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr
        digests.append(directory_digest(tmp_path / name))
    assert set(digests[0]) == {"manifest.json", "backbone.safetensors", "experts.safetensors", "heads.safetensors"}
    assert digests[0] == digests[1]
