"""The kinds of folder esmpp writes, told apart by what they hold: an artifact and a zoo both have a manifest.json.

Light on purpose (no torch, no onnxruntime): the writers use these to replace only a folder of their own kind,
and esmpp.atomic, below them all, to name the kind of folder it refuses to replace.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"  # an artifact's and a zoo's
EXPORT_REPORT = "export.json"  # an ONNX export's


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in the file ``path``, or None where it is missing or unreadable, is not UTF-8 JSON (or
    nests too deep for the parser), or holds another JSON value than an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: deep nesting
        return None
    return value if isinstance(value, dict) else None


def is_artifact(path: Path) -> bool:
    """Whether ``path`` holds an esmpp artifact's manifest (of any format version): the only kind of folder an
    artifact write replaces."""
    manifest = read_json_object(Path(path) / MANIFEST)
    return manifest is not None and manifest.get("format") == "esmpp-artifact"


def zoo_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of the zoo in ``root``, or None where its manifest.json is missing, unreadable or another
    folder's: a zoo's names the preset it was built from and its tasks by name (an artifact's lists its tasks)."""
    manifest = read_json_object(Path(root) / MANIFEST)
    if manifest is not None and isinstance(manifest.get("preset"), dict) and isinstance(manifest.get("tasks"), dict):
        return manifest
    return None


def is_zoo(root: Path) -> bool:
    """Whether ``root`` holds a zoo (of any format version): the only kind of folder a zoo build replaces."""
    return zoo_manifest(root) is not None


def folder_kind(path: Path) -> str | None:
    """Which kind of esmpp folder ``path`` is, in words ("an esmpp artifact"), or None where it is none of them."""
    if is_artifact(path):
        return "an esmpp artifact"
    if is_zoo(path):
        return "an esmpp zoo"
    if (Path(path) / EXPORT_REPORT).is_file():
        return "an esmpp ONNX export"
    return None
