"""The command line turns every EsmppError into one line on stderr and exit code 1; --debug shows the traceback."""

from __future__ import annotations

import json
import shutil
import sys
from typing import NoReturn

import numpy as np
import pytest
import torch
import typer
import yaml
from PIL import Image
from safetensors.torch import save_file

from esmpp import atomic, cli
from esmpp import bench as bench_module
from esmpp.architecture import build_visual
from esmpp.artifact import TaskInfo, save_artifact
from esmpp.checkpoints import Encoder, save_encoder
from esmpp.cli import run
from esmpp.errors import ArtifactError, ConfigError, StorageError
from esmpp.runtime.predictor import Predictor
from esmpp.zoo import get_preset
from tests.conftest import random_artifact
from tests.reliability.project import REPO, directory_digest, run_esmpp, write_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    config = write_project(root)
    artifact = save_artifact(random_artifact(), root / "artifact")
    image = root / "image.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    return root, config, artifact, image


def _run(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["esmpp", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        run()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _corrupted(root, artifact):
    copy = root / "corrupted"
    if not copy.exists():
        copy.mkdir()
        for file in artifact.iterdir():
            data = bytearray(file.read_bytes())
            if file.name == "experts.safetensors":
                data[len(data) // 2] ^= 0xFF
            (copy / file.name).write_bytes(bytes(data))
    return copy


def _with_ranks_claimed(root, artifact, rank):
    """A copy of ``artifact`` whose manifest claims ``rank`` for every routed layer."""
    copy = root / f"rank-{rank}"
    if not copy.exists():
        shutil.copytree(artifact, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["ranks"] = dict.fromkeys(manifest["ranks"], rank)
        (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _build_with(*flags):
    """The arguments of `esmpp build` on the project's config with ``flags``."""
    return lambda root, config, *_: ["build", config, "--out", root / "o", *flags]


CASES = {
    "missing config": (
        lambda root, config, artifact, image: ["build", root / "nope.yaml", "--out", root / "o"],
        "no such config",
    ),
    "invalid YAML": (
        lambda root, *_: ["build", _write(root / "bad.yaml", "tasks: [unclosed"), "--out", root / "o"],
        "not valid YAML",
    ),
    "config field": (
        lambda root, *_: ["build", _write(root / "field.yaml", "pretrained: 3\ntaskz: []"), "--out", root / "o"],
        "taskz",
    ),
    "unknown method": (_build_with("--method", "magic"), "Unknown merge method 'magic'"),
    "unknown routed kind": (_build_with("--routed-kinds", "mlp"), "routed_kinds.0: Input should be 'patch'"),
    "energy share above 1": (
        _build_with("--rank-energy", "1.5"),
        "rank_energy: Input should be less than or equal to 1",
    ),
    "missing artifact": (
        lambda root, config, artifact, image: ["predict", root / "nothing", image],
        "not an artifact directory",
    ),
    "corrupted artifact": (
        lambda root, config, artifact, image: ["predict", _corrupted(root, artifact), image],
        "corrupted",
    ),
    "bad image path": (
        lambda root, config, artifact, image: ["predict", artifact, root / "missing.png"],
        "no such image",
    ),
    # Every path is checked before the artifact loads (it is missing here) and before any batch runs.
    "bad image path, checked first": (
        lambda root, config, artifact, image: ["predict", root / "nothing", image, root / "missing.png"],
        "missing.png: no such image file",
    ),
    "not an image": (lambda root, config, artifact, image: ["predict", artifact, config], "cannot decode"),
    "a folder for an image": (
        lambda root, config, artifact, image: ["predict", artifact, root],
        "is a folder, not an image file: name its image files (a shell glob: ",
    ),
    "unknown task": (
        lambda root, config, artifact, image: ["predict", artifact, image, "--task", "cars"],
        "unknown task",
    ),
    "routing mode": (
        lambda root, config, artifact, image: ["predict", artifact, image, "--mode", "Soft"],
        "routing mode 'Soft' is not one of ['hard', 'soft']",
    ),
    "soft routing temperature": (
        lambda root, config, artifact, image: ["predict", artifact, image, "--mode", "soft", "--temperature", "0"],
        "temperature 0.0 is not a positive finite number",
    ),
    "soft routing top-k": (
        lambda root, config, artifact, image: ["predict", artifact, image, "--mode", "soft", "--top-k", "4"],
        "top_k 4 is more than the artifact's 3 tasks",
    ),
    "inspect edited ranks": (
        lambda root, config, artifact, image: ["inspect", _with_ranks_claimed(root, artifact, 7)],
        "rank 7, but experts.safetensors holds rank-4 experts",
    ),
    "method option without a value": (
        _build_with("--method-option", "rank_fraction"),
        "--method-option takes KEY=VALUE",
    ),
    "method option of another method": (
        _build_with("--method-option", "keep_fraction=0.2"),
        "Invalid options for merge method 'esm'",
    ),
    # Checked before the workload is written (a ViT-B/32 one is 3 GB at T = 8).
    "bench option no method has": (
        lambda root, *_: ["bench", "--workdir", root / "bench-work", "--methods", "tsv", "--method-option", "x=1"],
        "'x' is an option of none of the methods",
    ),
    "opset the exporter would not write": (
        lambda root, config, artifact, image: ["export", artifact, "--out", root / "onnx", "--opset", "17"],
        "--opset 17 is not supported: the ONNX exporter writes opsets 18 to 25",
    ),
    "overwrite needed": (lambda root, config, artifact, image: ["build", config, "--out", artifact], "--overwrite"),
    # Not told to pass --overwrite, which would not replace it either.
    "export onto a folder of the user's": (
        lambda root, config, artifact, image: ["export", artifact, "--out", root / "proxy0"],
        "proxy0 is a folder that esmpp did not write",
    ),
    # Values typer itself refuses: one line too, not its usage panel (exit 2).
    "not a choice": (
        lambda root, *_: ["build", "--zoo", "huge"],
        "Invalid value for '--zoo': 'huge' is not one of 'tiny', 'mini'. See `",  # the value once, no pydantic prefix
    ),
    "missing option": (
        lambda root, config, artifact, image: ["export", artifact],
        "Missing option '--out'. See `",
    ),
    "inspect missing": (lambda root, *_: ["inspect", root / "nothing"], "not an artifact directory"),
    # What is no artifact is named as what it is, not as an artifact to rebuild (or to build onto a file).
    "inspect an ONNX export": (
        lambda root, *_: ["inspect", _write(_made(root / "exported") / "export.json", "{}").parent],
        "exported is an esmpp ONNX export, not an artifact: give an artifact folder (what `esmpp build` writes to "
        "--out).",
    ),
    "predict with a zoo": (
        lambda root, config, artifact, image: ["predict", _zoo_manifest_in(root / "zoo"), image],
        "zoo is an esmpp zoo, not an artifact: give an artifact folder",
    ),
    "inspect a file": (
        lambda root, config, artifact, image: ["inspect", image],
        "image.png is a file, not an artifact: give an artifact folder",
    ),
    "export the folder that holds the artifact": (
        lambda root, config, artifact, *_: ["export", _holding(root / "demo-out", artifact), "--out", root / "x"],
        "demo-out is not an artifact, but holds one in ",
    ),
    # A report under a file: refused before the zoo or the workload is made (they would take minutes).
    "report under a file": (
        lambda root, config, *_: ["compare", "--zoo", "tiny", "--out", config / "report.json"],
        "cannot create the folder of --out",
    ),
    "bench report under a file": (
        lambda root, config, *_: ["bench", "--workdir", root / "bench-work", "--out", config / "bench.json"],
        "cannot create the folder of --out",
    ),
    # A report path where no report can be written, or that the artifact replaces: refused before the zoo is built.
    "report onto a folder": (
        lambda root, *_: ["compare", "--zoo", "tiny", "--out", root / "proxy0"],
        "proxy0 is a folder; give the report's file, e.g. --out",
    ),
    # demo's --out is the folder of its report: it is not told to give the report's file in --out.
    "demo report onto a folder": (
        lambda root, *_: ["demo", "--zoo", "tiny", "--out", _made(root / "demo" / "compare.json").parent],
        "demo/compare.json is a folder, where demo writes its report: remove it, or choose another --out.",
    ),
    "report inside the artifact": (
        lambda root, config, artifact, image: [
            "compare",
            "--zoo",
            "tiny",
            "--out",
            artifact / "r.json",
            "--artifact",
            artifact,
        ],
        "r.json is inside --artifact",
    ),
    # An artifact folder that cannot be made: refused before the build, not with a traceback after it.
    "artifact under a file": (lambda root, config, *_: ["build", config, "--out", config / "a"], "another --out"),
    "compare artifact under a file": (
        lambda root, config, *_: ["compare", "--zoo", "tiny", "--out", root / "r.json", "--artifact", config / "a"],
        "choose another folder for the artifact",
    ),
    # A folder that the artifact would replace, refused with the advice of the option that named it, and named.
    "compare artifact onto a folder of the user's": (
        lambda root, *_: ["compare", "--zoo", "tiny", "--out", root / "r.json", "--artifact", root / "proxy0"],
        "proxy0 is a folder that esmpp did not write (it has no manifest.json), so it is not replaced whatever the "
        "flags say: choose another folder for the artifact, or remove it yourself.",
    ),
    "build onto a zoo": (
        lambda root, *_: ["build", "--zoo", "tiny", "--out", _zoo_manifest_in(root / "zoo"), "--overwrite"],
        "zoo is an esmpp zoo, which this command does not write, so it is not replaced",
    ),
    # The zoo's task names are known from its preset: a wrong one is refused before the zoo is built (minutes).
    "build unknown zoo task": (
        lambda root, *_: ["build", "--zoo", "tiny", "--tasks", "digits,typo", "--out", root / "z"],
        "--tasks: the tiny zoo has no task 'typo'; its tasks are digits, faces, stripes, colours",
    ),
    # So is a rank above the width of its routed layers.
    "build zoo rank above the layers' width": (
        lambda root, *_: ["build", "--zoo", "tiny", "--rank", "33", "--out", root / "z"],
        "rank 33 is more than the 32 directions that the routed layers (qkv, fc) of zoo-tiny have at most",
    ),
    "compare zoo rank above the layers' width": (
        lambda root, *_: ["compare", "--zoo", "tiny", "--rank", "33", "--out", root / "r.json"],
        "rank 33 is more than the 32 directions",
    ),
    "compare bad build option": (
        lambda root, *_: ["compare", "--zoo", "tiny", "--router-shrinkage", "2", "--out", root / "r.json"],
        "invalid build options: router_shrinkage: Input should be less than or equal to 1. See `esmpp compare --help`",
    ),
    # And more prototypes per task than its 32 proxy images.
    "build zoo more prototypes than proxy images": (
        lambda root, *_: [
            "build",
            "--zoo",
            "tiny",
            "--tasks",
            "faces",
            "--prototypes-per-task",
            "33",
            "--out",
            root / "z",
        ],
        "prototypes_per_task 33 is more than the 32 proxy images of task 'faces': set `prototypes_per_task` "
        "(--prototypes-per-task) to at most 32.",
    ),
    "compare more prototypes than proxy images": (
        lambda root, *_: ["compare", "--zoo", "tiny", "--prototypes-per-task", "33", "--out", root / "r.json"],
        "prototypes_per_task 33 is more than the 32 proxy images of task 'digits'",
    ),
    "compare method twice": (
        lambda root, *_: ["compare", "--zoo", "tiny", "--methods", "tsv, tsv", "--out", root / "r.json"],
        "--methods names tsv more than once: give each once.",
    ),
    "build routed kind twice": (
        lambda root, *_: ["build", "--zoo", "tiny", "--routed-kinds", "qkv,fc,qkv", "--out", root / "z"],
        "--routed-kinds names qkv more than once",
    ),
    "demo onto a file": (
        lambda root, config, *_: ["demo", "--zoo", "tiny", "--out", config],
        "is a file; demo writes a folder there (a report and an artifact).",
    ),
    "demo into an artifact": (
        lambda root, config, artifact, image: ["demo", "--zoo", "tiny", "--out", artifact],
        "is an esmpp artifact; demo writes a folder of its own there: choose another --out.",
    ),
    "build zoo task twice": (
        lambda root, *_: ["build", "--zoo", "tiny", "--tasks", "digits, faces,digits", "--out", root / "z"],
        "--tasks names digits more than once",
    ),
    "build no zoo task": (
        lambda root, *_: ["build", "--zoo", "tiny", "--tasks", ",", "--out", root / "z"],
        "--tasks ',' names no task",
    ),
    "build config with --tasks": (
        _build_with("--tasks", "task0"),
        "--tasks selects tasks of the --zoo; with a config, list the tasks in",
    ),
    # The argument of eval is read and checked against the zoo's preset before the zoo is built (minutes).
    "eval missing checkpoint": (
        lambda root, *_: ["eval", root / "missing.safetensors", "--zoo", "tiny"],
        "missing.safetensors does not exist",
    ),
    # A folder that is not an artifact goes to the checkpoint loader, which reads model folders.
    "eval folder without model weights": (
        lambda root, *_: ["eval", root / "proxy0", "--zoo", "tiny"],
        "proxy0 is a directory without model weights: expected one of model.safetensors",
    ),
    # What the artifact loader takes for an artifact goes to it, not to the checkpoint loader (which asked for model
    # weights): a damaged one, or a folder holding one (demo's --out).
    "eval an artifact without its manifest": (
        lambda root, config, artifact, image: ["eval", _damaged(root / "no-manifest", artifact, None), "--zoo", "tiny"],
        "no-manifest/manifest.json is missing: ",
    ),
    "eval an artifact with a broken manifest": (
        lambda root, config, artifact, image: ["eval", _damaged(root / "broken", artifact, "{broken"), "--zoo", "tiny"],
        "broken/manifest.json is not valid JSON (",
    ),
    "eval the folder that holds the artifact": (
        lambda root, config, artifact, *_: ["eval", _holding(root / "demo-out", artifact), "--zoo", "tiny"],
        "demo-out is not an artifact, but holds one in ",
    ),
    "eval a zoo": (
        lambda root, *_: ["eval", _zoo_manifest_in(root / "zoo"), "--zoo", "tiny"],
        "zoo is an esmpp zoo, which eval does not measure: give an encoder checkpoint (a file, or a Hugging Face "
        "or open_clip model folder) or an esmpp artifact folder.",
    ),
    "eval an ONNX export": (
        lambda root, *_: ["eval", _write(_made(root / "onnx-export") / "export.json", "{}").parent, "--zoo", "tiny"],
        "onnx-export is an esmpp ONNX export, which eval does not measure",
    ),
    "eval checkpoint of another architecture": (
        lambda root, *_: ["eval", root / "task0.safetensors", "--zoo", "tiny"],
        # eval has no setting for the architecture: the advice is the zoo's, not the build config's.
        "architecture 'zoo-tiny' expects (17, 32). eval measures encoders of the tiny zoo's architecture; give a "
        "checkpoint fine-tuned from it.",
    ),
    "eval artifact of another image size": (
        lambda root, config, artifact, image: ["eval", artifact, "--zoo", "mini"],
        "takes 16×16 images, the mini zoo's are 32×32. Evaluate it on the zoo it was built from",
    ),
    "eval artifact task the zoo lacks": (
        lambda root, config, artifact, image: ["eval", artifact, "--zoo", "tiny"],
        "the tiny zoo has no task 'task0', 'task1', 'task2'; its tasks are digits, faces, stripes, colours",
    ),
    "bench workdir under a file": (
        lambda root, config, *_: ["bench", "--workdir", config / "work", "--tasks", "2", "--out", root / "b.json"],
        "is a file. Nothing was written: pass another --workdir",
    ),
}


def _write(path, text):
    path.write_text(text)
    return path


def _made(folder):
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _holding(folder, artifact):
    """``folder`` holding a copy of ``artifact`` in its subfolder ``artifact``, as demo's --out does; made once."""
    if not folder.exists():
        shutil.copytree(artifact, folder / "artifact")
    return folder


def _damaged(folder, artifact, manifest):
    """``folder`` holding a copy of ``artifact`` whose manifest.json holds the text ``manifest`` (None: is removed);
    made once."""
    if not folder.exists():
        shutil.copytree(artifact, folder)
        if manifest is None:
            (folder / "manifest.json").unlink()
        else:
            _write(folder / "manifest.json", manifest)
    return folder


def _zoo_manifest_in(folder):
    """``folder`` with a zoo's manifest (the preset it was built from, its tasks by name), made once."""
    folder.mkdir(exist_ok=True)
    _write(folder / "manifest.json", json.dumps({"preset": {"name": "tiny"}, "tasks": {"digits": {}}}))
    return folder


@pytest.mark.parametrize("case", sorted(CASES))
def test_errors_are_one_line_and_exit_code_1(monkeypatch, capsys, tmp_path, project, case):
    make_args, expected = CASES[case]
    cache = tmp_path / "cache"
    monkeypatch.setenv("ESMPP_CACHE", str(cache))  # where a zoo would be built
    before = directory_digest(project[2])
    code, _, err = _run(monkeypatch, capsys, *make_args(*project))
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert expected in err
    assert directory_digest(project[2]) == before  # the existing artifact is untouched
    assert not (project[0] / "bench-work").exists() and not cache.exists()  # and no long work was started


def test_a_report_folder_that_cannot_be_written_is_refused_before_the_run(monkeypatch, capsys, tmp_path, project):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ESMPP_CACHE", str(cache))
    monkeypatch.setattr(atomic.os, "access", lambda path, mode: False)  # a read-only folder (root may write any)
    code, _, err = _run(monkeypatch, capsys, "compare", "--zoo", "tiny", "--out", project[0] / "report.json")
    assert code == 1 and f"{project[0]} is not writable. Nothing was written: choose another --out" in err
    assert not cache.exists()  # no zoo was built


@pytest.mark.parametrize("command", ["build", "export", "compare"])
def test_a_destination_another_process_is_writing_is_refused_before_the_work(
    monkeypatch, capsys, tmp_path, project, command
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ESMPP_CACHE", str(cache))
    out = tmp_path / "busy"
    args, elsewhere = {
        "build": (["build", "--zoo", "tiny", "--out", out], "choose another --out"),
        "export": (["export", project[2], "--out", out], "choose another --out"),
        "compare": (
            ["compare", "--zoo", "tiny", "--out", project[0] / "r.json", "--artifact", out],
            "choose another folder for the artifact",
        ),
    }[command]
    with atomic.claimed_destination(out):  # held as a concurrent build or export would hold it
        code, _, err = _run(monkeypatch, capsys, *args)
    assert code == 1 and f"{out} is being written by another esmpp process now" in err
    assert f"wait for it to finish, or {elsewhere}" in err
    assert not cache.exists() and list(tmp_path.iterdir()) == []  # no zoo built, nothing written


def test_demo_names_its_out_folder_that_cannot_be_created_as_given(monkeypatch, capsys, tmp_path, project):
    """demo's --out is a folder: its error used to name `--out DIR/compare.json`, an option no one typed."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ESMPP_CACHE", str(cache))
    out = project[1] / "demo"  # under a file
    code, _, err = _run(monkeypatch, capsys, "demo", "--zoo", "tiny", "--out", out)
    assert code == 1 and err.startswith(f"error: cannot create --out {out} (") and err.count("\n") == 1
    assert err.endswith("). Choose another --out.\n") and "compare.json" not in err
    assert not cache.exists()  # no zoo was built


def test_eval_on_a_cache_folder_that_holds_no_zoo_names_ESMPP_CACHE(monkeypatch, capsys, tmp_path):
    """eval reads the zoo of --zoo PRESET from the cache: it has no --out to choose another of."""
    monkeypatch.setenv("ESMPP_CACHE", str(tmp_path / "cache"))
    taken = tmp_path / "cache" / "zoo" / "tiny"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("mine")
    arch = get_preset("tiny").arch
    checkpoint = save_encoder(Encoder(arch, build_visual(arch).state_dict(), "test"), tmp_path / "encoder.safetensors")
    code, _, err = _run(monkeypatch, capsys, "eval", checkpoint, "--zoo", "tiny")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert f"{taken} is a folder that esmpp did not write" in err
    assert "set ESMPP_CACHE to another folder, or remove it yourself." in err and "--out" not in err
    assert [path.name for path in taken.iterdir()] == ["notes.txt"]


# Bench options refused, each naming the option, the value given and the valid range: (flags, parts of the error).
BAD_BENCH_OPTIONS = {
    "no threads": (["--threads", "0"], ["Invalid value for '--threads'", "(got '0')", "greater than or equal to 1"]),
    "threads not a number": (["--threads", "two"], ["Invalid value for '--threads'", "(got 'two')", "integer"]),
    "negative rank": (["--rank", "-2"], ["Invalid value for '--rank'", "(got '-2')", "greater than or equal to 1"]),
    "no proxy images": (["--proxy-images", "0"], ["'--proxy-images'", "(got '0')", "greater than or equal to 1"]),
    "no builds": (["--build-repeats", "0"], ["'--build-repeats'", "(got '0')", "greater than or equal to 1"]),
    "no timed forwards": (
        ["--runtime-repeats", "0"],
        ["'--runtime-repeats'", "(got '0')", "greater than or equal to 1"],
    ),
    # The lists' rules are BenchConfig's (the Python API's too): each names the field, its flag and what was given.
    "no task count": (["--tasks", ""], ["invalid bench options: task_counts (--tasks): give at least one (got ())."]),
    "no tasks": (["--tasks", "2,0"], ["task_counts.1 (--tasks): Input should be greater than or equal to 1 (got '0')"]),
    "fraction of a task": (["--tasks", "2.5"], ["task_counts.0 (--tasks): Input should be a valid integer", "'2.5'"]),
    "empty batch": (["--batch-sizes", "0"], ["batch_sizes.0 (--batch-sizes): Input should be greater than or equal"]),
    "negative batch": (["--batch-sizes", "1,-4"], ["batch_sizes.1 (--batch-sizes): Input should be", "(got '-4')"]),
    "batch not a number": (
        ["--batch-sizes", "1,x"],
        ["batch_sizes.1 (--batch-sizes): Input should be a valid integer"],
    ),
    "a task count twice": (["--tasks", "2,8,2"], ["task_counts (--tasks): has 2 more than once: give each once"]),
    "a task count twice, written differently": (
        ["--tasks", "2,02"],
        ["task_counts (--tasks): has 2 more than once", "(got ('2', '02'))"],
    ),
    "a method twice": (["--methods", "tsv,esm,tsv"], ["methods (--methods): has tsv more than once"]),
    "rank above the layers' width": (
        ["--rank", "769"],
        ["rank 769 is more than the 768 directions that the routed layers (qkv, fc) of ViT-B-32 have at most"],
    ),
    "rank above the layers' width, runtime only": (["--methods", "", "--rank", "769"], ["rank 769 is more than"]),
    "no batch size": (["--batch-sizes", " , "], ["batch_sizes (--batch-sizes): give at least one"]),
    "no architecture": (["--arch", ""], ["archs (--arch): give at least one"]),
    # Not when its turn comes, after the first architecture's benchmark.
    "unknown second architecture": (
        ["--arch", "ViT-B-32,ViT-X"],
        ["--arch: Unknown architecture 'ViT-X'. Use an open_clip model name (e.g. "],
    ),
    # Not when the report is written, after the benchmark.
    "report is a folder": (["--out", "."], ["--out . is a folder; give the report's file, e.g. --out report.json"]),
    # esm++ is a name of the bench's, not of the merge methods: the choices name it.
    "unknown method": (
        ["--methods", "esm++,magic"],
        ["--methods 'esm++,magic': no method 'magic'. Choose from esm++, averaging, esm,"],
    ),
}


def _variant(root, name, edit):
    """A fresh project under ``root / name`` edited by ``edit(folder, config)`` (the config as a dict, written
    back after); returns its config path."""
    path = write_project(root / name)
    config = yaml.safe_load(path.read_text())
    edit(path.parent, config)
    path.write_text(yaml.safe_dump(config))
    return path


def _options(**options):
    """An edit of a project's config: these ``options:``."""
    return lambda folder, config: config["options"].update(options)


# `esmpp build` arguments (but --out) on a project under the given root, and the error's text: each is refused
# before the build starts (and before --out's folder is made).
BUILD_INPUT_CASES = {
    "alpha NaN in the config": (
        lambda root: ["build", _variant(root, "nan-alpha", _options(alpha=float("nan")))],
        "options.alpha: Input should be a finite number",
    ),
    "infinite --alpha": (
        lambda root: ["build", _variant(root, "inf-alpha", _options()), "--alpha", "inf"],
        "alpha: Input should be a finite number",
    ),
    "negative --alpha": (
        lambda root: ["build", _variant(root, "negative-alpha", _options()), "--alpha=-3"],
        "alpha: Input should be greater than or equal to 0",
    ),
    "--alpha too large for the weights": (
        lambda root: ["build", _variant(root, "huge-alpha", _options()), "--alpha", "1e39"],
        "alpha: Input should be less than or equal to 10",
    ),
    "infinite method option": (
        lambda root: ["build", _variant(root, "inf-option", _options()), "--method-option", "scale_factor=.inf"],
        "merge method 'esm': scale_factor: Input should be a finite number",
    ),
    "--rank 0": (
        lambda root: ["build", _variant(root, "rank-0", _options()), "--rank", "0"],
        "rank: Input should be greater than or equal to 1",
    ),
    "--prototypes-per-task 0": (
        lambda root: ["build", _variant(root, "prototypes-0", _options()), "--prototypes-per-task", "0"],
        "prototypes_per_task: Input should be greater than or equal to 1",
    ),
    "negative proxy_images": (
        lambda root: ["build", _variant(root, "proxy-count", lambda folder, config: config.update(proxy_images=-1))],
        "proxy_images: Input should be greater than or equal to 1",
    ),
    "--rank above the layers' width": (
        lambda root: ["build", _variant(root, "rank-wide", _options()), "--rank", "100000"],
        "rank 100000 is more than the 32 directions that the routed layers (qkv, fc) of tiny have at most",
    ),
    "more prototypes than proxy images": (
        lambda root: ["build", _variant(root, "prototypes-4", _options(prototypes_per_task=4))],
        "prototypes_per_task 4 is more than the 3 proxy images of task 'task0'",
    ),
    "validation data for some tasks only": (
        lambda root: ["build", _variant(root, "some-validation", _validation_folders(0))],
        "tasks ['task1'] have no validation data but the other tasks do",
    ),
    "NaN in the last task's head": (
        lambda root: ["build", _variant(root, "nan-head", _nan_head)],
        "head1.safetensors: the head has NaN or infinite values",
    ),
    "undecodable image in the last task's proxy folder": (
        lambda root: ["build", _variant(root, "bad-image", _truncated_proxy_image)],
        "proxy1/2.png: cannot decode the image",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BENCH_OPTIONS))
def test_bench_options_are_refused_in_one_line_before_any_work(monkeypatch, capsys, tmp_path, case):
    flags, expected = BAD_BENCH_OPTIONS[case]

    def started(*args, **kwargs):
        raise AssertionError("the bench started working before it checked its options")

    for work in ("write_workload", "run_runtime"):  # the workload's checkpoints, the runtime's models
        monkeypatch.setattr(bench_module, work, started)
    workdir = tmp_path / "work"
    code, _, err = _run(monkeypatch, capsys, "bench", "--workdir", workdir, "--out", tmp_path / "b.json", *flags)
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1
    for part in expected:
        assert part in err
    assert not workdir.exists()


def _validation_folders(*tasks):
    """An edit of a project's config: a validation folder for each of the ``tasks`` (indices), α left out to
    be chosen on them."""

    def edit(folder, config):
        del config["options"]["alpha"]
        for t in tasks:
            for label in ("0", "1", "2"):  # the head's classes, unnamed
                (folder / f"val{t}" / label).mkdir(parents=True)
                shutil.copy(folder / f"proxy{t}" / f"{label}.png", folder / f"val{t}" / label)
            config["tasks"][t]["validation"] = f"val{t}"

    return edit


def _nan_head(folder, config):
    save_file({"head": torch.full((3, 16), float("nan"))}, folder / "head1.safetensors")


def _truncated_proxy_image(folder, config):
    image = folder / "proxy1" / "2.png"
    image.write_bytes(image.read_bytes()[:60])


def _long_work(*args, **kwargs) -> NoReturn:
    raise AssertionError("the build started before its inputs were checked")


@pytest.mark.parametrize("case", sorted(BUILD_INPUT_CASES))
def test_build_inputs_are_refused_before_the_build(monkeypatch, capsys, tmp_path, case):
    monkeypatch.setattr("esmpp.build.build_artifact", _long_work)
    make_args, expected = BUILD_INPUT_CASES[case]
    out = tmp_path / "new" / "artifact"
    code, _, err = _run(monkeypatch, capsys, *make_args(tmp_path), "--out", out)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert expected in err
    assert not out.parent.exists()


def test_a_config_error_creates_no_folder_for_the_artifact(monkeypatch, capsys, project):
    root = project[0]
    code, _, err = _run(monkeypatch, capsys, "build", root / "nope.yaml", "--out", root / "new" / "artifact")
    assert code == 1 and "no such config" in err
    assert not (root / "new").exists()


def _fails(*args, **kwargs) -> NoReturn:
    raise ConfigError("the long work failed")


# A command's arguments (but --out) under the given root, and its long work, after --out is checked, made to fail.
LONG_WORK_FAILURES = {
    "slow pass of the config": (
        lambda root: ["build", _variant(root, "validated", _validation_folders(0, 1))],
        "esmpp.sources.load_labelled_folder",
    ),
    "build from a config": (lambda root: ["build", _variant(root, "plain", _options())], "esmpp.build.build_artifact"),
    "zoo build": (lambda root: ["build", "--zoo", "tiny"], "esmpp.zoo.build_zoo"),
    "compare's report": (lambda root: ["compare", "--zoo", "tiny"], "esmpp.zoo.build_zoo"),
    "demo's folder": (lambda root: ["demo", "--zoo", "tiny"], "esmpp.zoo.build_zoo"),
    "bench's report": (lambda root: ["bench", "--workdir", root / "work"], "esmpp.bench.run_bench"),
}


@pytest.mark.parametrize("case", sorted(LONG_WORK_FAILURES))
def test_a_failure_after_the_out_check_leaves_no_folder_for_out(monkeypatch, capsys, tmp_path, case):
    """Checking --out used to create its missing parent folders, left behind empty when the long work failed."""
    make_args, work = LONG_WORK_FAILURES[case]
    monkeypatch.setattr(work, _fails)
    out = tmp_path / "new" / "deeper" / "out"
    code, _, err = _run(monkeypatch, capsys, *make_args(tmp_path), "--out", out)
    assert code == 1 and err == "error: the long work failed\n"
    assert not (tmp_path / "new").exists()


def test_an_existing_out_is_refused_before_the_slow_part_of_reading_the_config(monkeypatch, capsys, tmp_path):
    config = _variant(tmp_path, "validated", _validation_folders(0, 1))
    monkeypatch.setattr("esmpp.sources.load_labelled_folder", _long_work)  # the validation images: slow ones
    out = save_artifact(random_artifact(), tmp_path / "taken")  # an artifact, replaced only with --overwrite
    code, _, err = _run(monkeypatch, capsys, "build", config, "--out", out)
    assert code == 1 and f"{out} already exists. Pass --overwrite to replace it" in err


def test_out_dot_in_an_empty_folder_is_refused_before_the_export(monkeypatch, capsys, project, tmp_path):
    """`--out .` passed the check, then the export failed after its work: the staging folder made beside `.` was in
    it, so `.` was no longer empty when the output was to be renamed onto it."""
    monkeypatch.setattr("esmpp.onnx.load_artifact", _long_work)
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(monkeypatch, capsys, "export", project[2], "--out", ".", "--overwrite")
    assert code == 1 and err == (
        "error: . is an empty folder: esmpp writes its output as a new folder, in one step, and replaces only a "
        f"folder it wrote itself. Remove it (rmdir {tmp_path}), or choose another --out.\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_good_command_still_works(monkeypatch, capsys, project):
    code, out, _ = _run(monkeypatch, capsys, "predict", project[2], project[3], "--json")
    assert code == 0 and '"task": "task' in out


def test_an_unusable_image_in_a_later_batch_is_named_by_its_file(monkeypatch, capsys, project, tmp_path):
    """Predictions run in batches of 64: an image past the first batch used to be called `image 1`."""
    _, _, artifact, image = project
    unusable = tmp_path / "float-pixels.tiff"  # decodes, but its pixels are out of [0, 1]
    Image.fromarray(np.full((16, 16), 2.0, np.float32)).save(unusable)
    code, out, err = _run(monkeypatch, capsys, "predict", artifact, *[image] * 65, unusable)
    assert code == 1 and out == ""
    assert err.startswith(f"error: {unusable}: float pixels must be finite and in [0, 1]")


def test_task_takes_an_index_unless_a_task_has_that_name(monkeypatch, capsys, project, tmp_path):
    """The unknown-task error offers "an index from 0 to 2", but --task 1 was looked up as a name."""
    _, _, artifact, image = project
    code, out, _ = _run(monkeypatch, capsys, "predict", artifact, image, "--json", "--task", "1")
    assert code == 0 and json.loads(out)["task"] == "task1" and not json.loads(out)["routed"]
    code, _, err = _run(monkeypatch, capsys, "predict", artifact, image, "--task", "3")
    assert code == 1 and err.startswith("error: unknown task 3; this artifact serves ['task0', 'task1', 'task2'] (a")
    numbered = random_artifact()
    numbered.tasks = [TaskInfo(name, task.classes) for name, task in zip(["2", "0", "1"], numbered.tasks)]
    code, out, _ = _run(
        monkeypatch, capsys, "predict", save_artifact(numbered, tmp_path / "a"), image, "--json", "--task", "1"
    )
    assert code == 0 and json.loads(out)["task"] == "1"
    task_help = next(p for p in typer.main.get_command(cli.app).commands["predict"].params if p.name == "task").help
    assert "a name, or an index from 0" in task_help


def test_soft_routing_of_a_one_task_artifact_needs_no_top_k(monkeypatch, capsys, tmp_path):
    """--mode soft alone was refused: "top_k 2 is more than the artifact's 1 tasks", a default nobody gave."""
    artifact = save_artifact(random_artifact(num_tasks=1), tmp_path / "one")
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    code, out, _ = _run(monkeypatch, capsys, "predict", artifact, image, "--json", "--mode", "soft")
    assert code == 0 and json.loads(out)["task"] == "task0"
    code, _, err = _run(monkeypatch, capsys, "predict", artifact, image, "--mode", "soft", "--top-k", "2")
    assert (
        code == 1 and err == "error: top_k 2 is more than the artifact's 1 tasks; soft routing mixes 1 to 1 experts.\n"
    )


@pytest.mark.parametrize("fault", ["truncated JPEG", "too elongated"])
def test_a_bad_image_fails_before_the_first_batch(monkeypatch, capsys, project, tmp_path, fault):
    """Only existence was checked up front: an undecodable image failed in its batch, after the batches before it
    ran (and their results were lost: the command prints when all are done)."""
    _, _, artifact, image = project
    bad = tmp_path / ("bad.jpg" if fault == "truncated JPEG" else "bad.png")
    if fault == "truncated JPEG":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:-200])
    else:
        Image.new("RGB", (1, 300_000)).save(bad)  # 16×4,800,000 pixels once resized for the 16-pixel model
    batches = []
    monkeypatch.setattr(Predictor, "predict", lambda *args, **kwargs: batches.append(args))
    code, out, err = _run(monkeypatch, capsys, "predict", artifact, *[image] * 65, bad)
    assert code == 1 and out == "" and batches == []
    assert err.startswith(f"error: {bad}: " + ("cannot decode" if fault == "truncated JPEG" else "1×300000 is too"))


def test_routing_flags_reach_the_predictor(monkeypatch, capsys, project):
    given = {}
    load = Predictor.load

    def recording_load(path, **routing):
        given.update(routing)
        return load(path, **routing)

    monkeypatch.setattr(Predictor, "load", recording_load)
    flags = ["--mode", "soft", "--top-k", "3", "--temperature", "0.5", "--route-once"]
    code, out, _ = _run(monkeypatch, capsys, "predict", project[2], project[3], "--json", *flags)
    assert code == 0 and '"task": "task' in out
    assert given == {"mode": "soft", "top_k": 3, "temperature": 0.5, "route_once": True}


@pytest.mark.parametrize(
    ("make_args", "error"),
    [
        pytest.param(lambda root, config: ["--debug", "inspect", root / "nothing"], ArtifactError, id="before"),
        pytest.param(lambda root, config: ["inspect", root / "nothing", "--debug"], ArtifactError, id="after"),
        pytest.param(
            lambda root, config: ["zoo", "build", "--preset", "tiny", "--out", config / "zoo", "--debug"],
            StorageError,
            id="after a zoo command",
        ),
        # Options are read in order: --debug must count before a value refused earlier on the line.
        pytest.param(
            lambda root, config: ["build", "--zoo", "tiny", "--rank", "abc", "--debug"],
            ConfigError,
            id="after a refused value",
        ),
    ],
)
def test_debug_before_or_after_the_command_raises_the_error_itself(monkeypatch, project, make_args, error):
    monkeypatch.setitem(cli._debug, "on", False)
    monkeypatch.setattr(sys, "argv", ["esmpp", *map(str, make_args(*project[:2]))])
    with pytest.raises(error):  # run() lets it through, with its traceback, instead of the one-line message
        run()


def test_subprocess_one_line_error_and_debug_traceback(tmp_path):
    plain = run_esmpp("inspect", tmp_path / "nothing")
    assert plain.returncode == 1 and plain.stderr.startswith("error: ") and plain.stderr.count("\n") == 1
    debug = run_esmpp("--debug", "inspect", tmp_path / "nothing")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ArtifactError" in debug.stderr
    assert (REPO / "cli.py").is_file()
