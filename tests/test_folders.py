import json

import pytest

from esmpp.folders import is_artifact, is_zoo, read_json_object

UNUSABLE = {
    "missing": None,
    "a folder": "folder",
    "not UTF-8": b"\xff\xfe{}",
    "not JSON": b"{'single': 'quotes'}",
    "nested too deep": b"[" * 100_000,  # the parser raises RecursionError
    "a list": b"[]",
    "a string": b'"manifest"',
}


@pytest.mark.parametrize("content", UNUSABLE.values(), ids=UNUSABLE.keys())
def test_a_file_without_a_json_object_reads_as_none(tmp_path, content):
    path = tmp_path / "manifest.json"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert read_json_object(path) is None
    assert not is_artifact(tmp_path) and not is_zoo(tmp_path)


def test_a_json_object_is_read(tmp_path):
    manifest = {"format": "esmpp-artifact", "tasks": [{"name": "a"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert read_json_object(tmp_path / "manifest.json") == manifest
    assert is_artifact(tmp_path) and not is_zoo(tmp_path)
