"""The bench's building blocks on the tiny architecture (the real-scale runs are `esmpp bench`)."""

import errno
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import typer

from esmpp import artifact as artifact_module
from esmpp import atomic
from esmpp import bench as bench_module
from esmpp import checkpoints as checkpoints_module
from esmpp.bench import (
    FLAGS,
    NO_TARGETS_HINT,
    RUNTIMES,
    BenchConfig,
    BuildRun,
    format_report,
    format_runtime,
    interleaved_builds,
    median_build,
    run_bench,
    run_build,
    run_runtime,
    synthetic_finetune,
    targets,
    write_workload,
)
from esmpp.checkpoints import load_encoder
from esmpp.cli import app
from esmpp.errors import ArchitectureError, ConfigError, EsmppError, StorageError
from esmpp.merging import get_method
from tests.conftest import TINY_ARCH


def test_synthetic_task_vectors_are_low_rank_plus_small_noise(tiny_visual):
    pretrained = tiny_visual.state_dict()
    finetuned = synthetic_finetune(pretrained, torch.Generator().manual_seed(0), delta_rank=4)
    delta = finetuned["transformer.resblocks.0.mlp.c_fc.weight"] - pretrained["transformer.resblocks.0.mlp.c_fc.weight"]
    singular_values = torch.linalg.svdvals(delta)
    assert singular_values[4] < 0.2 * singular_values[3]  # the energy sits in the first 4 directions
    for key, weight in pretrained.items():
        change = (finetuned[key] - weight).norm()
        assert 0 < change < 0.1 * (weight.norm() if weight.any() else weight.numel() ** 0.5), key


def test_a_workload_that_would_not_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    free = 100 * 2**10  # three tiny checkpoints need 0.37 MiB
    monkeypatch.setattr(bench_module, "free_mib", lambda path: free / 2**20)
    with pytest.raises(StorageError, match="pass another --workdir") as raised:
        write_workload(TINY_ARCH, 2, tmp_path / "workload")
    assert str(tmp_path / "workload") in str(raised.value) and "3 synthetic checkpoints" in str(raised.value)
    assert list(tmp_path.iterdir()) == []  # not even the folder


def test_a_workdir_another_bench_is_using_is_refused_before_anything_is_written(tmp_path):
    workdir = tmp_path / "work"
    with atomic.claimed_destination(workdir), pytest.raises(EsmppError) as raised:  # as a running bench holds it
        run_bench(BenchConfig(task_counts=(2,), methods=("tsv",)), workdir, log=lambda line: None)
    assert f"{workdir} is being written by another esmpp process now" in str(raised.value)
    assert str(raised.value).endswith("wait for it to finish, or pass another --workdir")
    assert list(tmp_path.iterdir()) == []


def test_method_options_of_the_run_reach_the_builds_that_have_them(tmp_path, monkeypatch):
    workload = write_workload(TINY_ARCH, 2, tmp_path / "workload")
    config = BenchConfig(proxy_images=2, rank=2, method_options={"rank_fraction": 0.5})
    made = []
    real_merge_streaming = bench_module.merge_streaming

    def record(pretrained, tasks, method, **kwargs):
        made.append((method.name, method.options))
        return real_merge_streaming(pretrained, tasks, method, **kwargs)

    monkeypatch.setattr(bench_module, "merge_streaming", record)
    for method in ("tsv", "esm"):
        run_build(workload, method, 2, config, tmp_path)
    run_build(workload, "esm++", 2, config, tmp_path)
    assert made[0][0] == "tsv" and made[1] == ("esm", get_method("esm").parse_options({"rank_fraction": 0.5}))
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["build"]["method_options"]["rank_fraction"] == 0.5
    assert "method options: {'rank_fraction': 0.5}" in format_report(
        {"config": asdict(config), "runtime_device": "cpu", "environment": {"load_average": None}, "build": {}}
        | {"runtime": {}, "targets": {}}
    )


def test_a_disk_that_fills_while_the_workload_is_written_leaves_whole_checkpoints_only(tmp_path, monkeypatch):
    written = []

    def save_or_fill_the_disk(tensors, path, metadata):
        if len(written) == 2:  # the pretrained model and task 0 fit; task 1 does not
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        real_save_file(tensors, path, metadata)

    real_save_file = checkpoints_module.save_file
    monkeypatch.setattr(checkpoints_module, "save_file", save_or_fill_the_disk)
    with pytest.raises(StorageError, match="pass another --workdir") as raised:
        write_workload(TINY_ARCH, 2, tmp_path / "workload")
    assert str(tmp_path / "workload") in str(raised.value) and "No space left on device" in str(raised.value)
    assert "MiB are free there; free some space" in str(raised.value)
    assert sorted(path.name for path in (tmp_path / "workload").iterdir()) == [
        "pretrained-0.safetensors",
        "task0-0.safetensors",
    ]
    monkeypatch.undo()
    workload = write_workload(TINY_ARCH, 2, tmp_path / "workload")  # a rerun writes what is missing
    assert load_encoder(workload.finetuned[1]).arch == TINY_ARCH


def test_a_build_whose_output_does_not_fit_says_where_to_write_it(tmp_path, monkeypatch):
    workload = write_workload(TINY_ARCH, 2, tmp_path / "workload")
    out = tmp_path / "out"
    out.mkdir()

    def fill_the_disk(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    for module in (checkpoints_module, artifact_module):
        monkeypatch.setattr(module, "save_file", fill_the_disk)
    for method in ("tsv", "esm++"):
        with pytest.raises(StorageError, match="pass another --workdir") as raised:
            run_build(workload, method, 2, BenchConfig(proxy_images=2, rank=2), out)
        assert str(out) in str(raised.value)
        assert list(out.iterdir()) == []


def test_build_runs_report_every_stage(tmp_path):
    workload = write_workload(TINY_ARCH, 2, tmp_path / "workload")
    assert load_encoder(workload.finetuned[1]).arch == TINY_ARCH
    config = BenchConfig(proxy_images=4, rank=4)
    routed = run_build(workload, "esm++", 2, config, tmp_path)
    static = run_build(workload, "tsv", 2, config, tmp_path)
    assert (tmp_path / "artifact" / "manifest.json").is_file() and (tmp_path / "merged.safetensors").is_file()
    assert {"load", "capture", "decompose", "merge", "alpha", "experts", "prototypes", "save"} <= set(
        routed.stage_seconds
    )
    assert "experts" not in static.stage_seconds
    for run in (routed, static):
        assert run.peak_bytes >= run.baseline_bytes > 0
        assert abs(sum(run.stage_seconds.values()) - run.seconds) < 0.1 * run.seconds + 0.05
    builds = {"2": {"esm++": median_build([routed]), "tsv": median_build([static])}}
    figures = targets(builds, None, TINY_ARCH, config)
    assert figures["T2_esm++_over_tsv_build"] == builds["2"]["esm++"]["seconds"] / builds["2"]["tsv"]["seconds"]
    alone = {"2": {"esm++": builds["2"]["esm++"]}}
    report = {"runtime_device": "cpu", "environment": {"load_average": None}, "build": {"tiny": alone}, "runtime": {}}
    report["config"] = asdict(config)
    report["targets"] = {"tiny": targets(alone, None, TINY_ARCH, config)}
    assert report["targets"]["tiny"] == {}
    assert f"none in this run: {NO_TARGETS_HINT}" in format_report(report)  # says what would compute one


def test_repeated_builds_run_in_rounds_of_every_method_and_report_each_total(tmp_path, monkeypatch):
    built = []

    def fake_build(workload, method, num_tasks, config):  # the order is what is checked, not a real build
        built.append(method)
        seconds = float(len(built))
        return BuildRun(seconds, {"merge": seconds}, {"merge": 2**20}, 2**20, 2**19, exact_peaks=True)

    monkeypatch.setattr(bench_module, "run_build_isolated", fake_build)
    workload = write_workload(TINY_ARCH, 2, tmp_path / "workload")
    config = BenchConfig(methods=("esm++", "tsv"), build_repeats=3, proxy_images=2, rank=2)
    figures = interleaved_builds(workload, 2, config, log=lambda line: None)
    assert built == ["esm++", "tsv"] * 3
    assert figures["esm++"]["seconds_each"] == [1.0, 3.0, 5.0] and figures["tsv"]["seconds_each"] == [2.0, 4.0, 6.0]
    assert figures["esm++"]["seconds"] == 3.0 and figures["tsv"]["stage_seconds"] == {"merge": 4.0}
    report = {"runtime_device": "cpu", "environment": {"load_average": None}, "build": {"tiny": {"2": figures}}}
    report |= {"config": asdict(config), "runtime": {}, "targets": {}}
    assert "   2.0-6.0" in format_report(report)  # the range beside the median
    figures["esm++"] |= {"seconds": 1250.0, "seconds_each": [1250.0]}  # a ViT-L/14 build's four digits
    assert "  1250.0 1250.0-1250.0" in format_report(report)  # total and range stay apart


def test_runtime_compares_routed_and_plain_in_torch_and_onnxruntime():
    config = BenchConfig(batch_sizes=(1, 3), runtime_repeats=1, warmup=0, rank=4)
    runtime = run_runtime(TINY_ARCH, 2, config, torch.device("cpu"))
    for name in RUNTIMES:
        assert set(runtime[name]) == {"batch1", "batch3"}
        for batch, figures in runtime[name].items():
            assert figures["ratio"] == figures["routed"]["latency_ms"] / figures["plain"]["latency_ms"]
            images = int(batch.removeprefix("batch"))
            assert figures["plain"]["images_per_s"] == pytest.approx(images * 1000 / figures["plain"]["latency_ms"])
    export = runtime["onnx_export"]
    assert export["providers"] == ["CPUExecutionProvider"] and export["threads"] == torch.get_num_threads()
    assert export["plain_error"] < 1e-4 and export["routed_parity"]["passed"]
    report = {
        "config": asdict(config),
        "runtime_device": "cpu",
        "environment": {"load_average": None},
        "build": {},
        "runtime": {"tiny": runtime},
        "targets": {"tiny": targets({}, runtime, TINY_ARCH, config)},
    }
    assert {"torch_routed_over_plain_batch3", "onnxruntime_routed_over_plain_batch1"} <= set(report["targets"]["tiny"])
    table = format_report(report)
    assert "onnxruntime" in table and "CPUExecutionProvider" in table and "routed/plain" in table
    assert table.startswith("builds on the CPU (") and ", runtime on cpu" in table  # a GPU run says where each ran


def test_runtime_without_onnx_times_torch_only():
    config = BenchConfig(batch_sizes=(2,), runtime_repeats=1, warmup=0, rank=4, onnx=False)
    runtime = run_runtime(TINY_ARCH, 2, config, torch.device("cpu"))
    assert set(runtime) == {"torch", "expert_flops_ratio"}
    assert "onnxruntime" not in "\n".join(format_runtime("tiny", runtime))


@pytest.mark.parametrize("missing", ["onnxruntime", "esmpp.atomic"])
def test_runtime_skips_onnxruntime_only_when_an_onnx_package_is_missing(monkeypatch, missing):
    def failing_import(*args):
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    monkeypatch.setattr(bench_module, "onnxruntime_sessions", failing_import)
    config = BenchConfig(batch_sizes=(2,), runtime_repeats=1, warmup=0, rank=4)
    if missing == "onnxruntime":
        runtime = run_runtime(TINY_ARCH, 2, config, torch.device("cpu"))
        assert runtime["onnx_export"] == {"skipped": f"onnxruntime is not installed (No module named {missing!r})"}
        assert set(runtime["torch"]) == {"batch2"} and "onnxruntime" not in runtime
    else:  # a broken install of esmpp itself is not hidden as a skipped runtime
        with pytest.raises(ModuleNotFoundError):
            run_runtime(TINY_ARCH, 2, config, torch.device("cpu"))


# BenchConfig made from Python with values the command line refuses: (fields, part of the one-line error).
BAD_CONFIGS = {
    "no threads": ({"threads": 0}, "threads (--threads): Input should be greater than or equal to 1 (got 0)"),
    "rank 0": ({"rank": 0}, "rank (--rank): Input should be greater than or equal to 1 (got 0)"),
    "no proxy images": ({"proxy_images": -1}, "proxy_images (--proxy-images): Input should be greater than or equal"),
    "no builds": ({"build_repeats": 0}, "build_repeats (--build-repeats): Input should be greater than or equal"),
    "no timed forwards": ({"runtime_repeats": 0}, "runtime_repeats (--runtime-repeats): Input should be greater"),
    "negative warm-up": ({"warmup": -1}, "warmup: Input should be greater than or equal to 0 (got -1)"),
    "no task count": ({"task_counts": ()}, "task_counts (--tasks): give at least one (got ())"),
    "a task count of 0": ({"task_counts": (2, 0)}, "task_counts.1 (--tasks): Input should be greater than or equal"),
    "a task count twice": ({"task_counts": (2, 8, 2)}, "task_counts (--tasks): has 2 more than once: give each once"),
    "a fraction of a task": ({"task_counts": (2.5,)}, "task_counts.0 (--tasks): Input should be a valid integer"),
    "no batch size": ({"batch_sizes": ()}, "batch_sizes (--batch-sizes): give at least one"),
    "a negative batch size": ({"batch_sizes": (1, -4)}, "batch_sizes.1 (--batch-sizes): Input should be greater"),
    "a batch size twice": ({"batch_sizes": (4, 4)}, "batch_sizes (--batch-sizes): has 4 more than once"),
    "no architecture": ({"archs": ()}, "archs (--arch): give at least one"),
    "an architecture twice": ({"archs": ("ViT-B-32", "ViT-B-32")}, "archs (--arch): has ViT-B-32 more than once"),
    "a method twice": ({"methods": ("tsv", "tsv")}, "methods (--methods): has tsv more than once"),
    "unknown method": ({"methods": ("esm++", "magic")}, "no method 'magic'. Choose from esm++, averaging, esm,"),
    "no routed kind": ({"routed_kinds": ()}, "routed_kinds: give at least one"),
    "unknown routed kind": ({"routed_kinds": ("mlp",)}, "routed_kinds.0: Input should be 'patch', 'qkv',"),
    "rank above the layers' width": ({"rank": 769}, "rank 769 is more than the 768 directions"),
    "option no method has": ({"method_options": {"x": 1}}, "'x' is an option of none of the methods"),
    "misspelt field": ({"tasks": (2,)}, "tasks: Unexpected keyword argument"),
    "nothing to measure": ({"methods": (), "runtime": False}, "nothing to measure: give --methods, or leave out"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bench_config_refuses_what_the_command_line_refuses_in_one_line(case):
    """run_bench used to start (writing gigabytes of checkpoints) on a config the command line would refuse."""
    values, expected = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as raised:
        BenchConfig(**values)
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_bench_config_resolves_every_architecture_when_made():
    with pytest.raises(ArchitectureError, match="--arch: Unknown architecture 'ViT-X'"):
        BenchConfig(archs=("ViT-B-32", "ViT-X"))


def test_bench_config_reads_numbers_as_the_command_line_gives_them():
    config = BenchConfig(task_counts=["2", "8"], batch_sizes=[1], methods=())  # methods=(): the runtime only
    assert config.task_counts == (2, 8) and config.batch_sizes == (1,) and config.methods == ()


def test_the_flags_bench_config_errors_name_are_options_of_esmpp_bench():
    command = typer.main.get_command(app).commands["bench"]
    assert set(FLAGS.values()) <= {name for param in command.params for name in param.opts}
    assert set(FLAGS) <= set(BenchConfig.__dataclass_fields__)


def test_the_report_names_the_processor_its_ratios_were_measured_on():
    assert bench_module.environment()["cpu"] == bench_module.cpu_model() != ""
    report = {"runtime_device": "cpu", "environment": {"load_average": None, "cpu": "Test CPU 9000"}}
    report |= {"config": {"method_options": {}}, "build": {}, "runtime": {}, "targets": {}}
    assert "builds on the CPU (Test CPU 9000)" in format_report(report)
