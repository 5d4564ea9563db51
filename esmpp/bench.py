"""`esmpp bench`: build and runtime performance on real open_clip architectures with synthetic tasks.

Workloads: a randomly initialised pretrained tower of a real architecture (ViT-B-32, ViT-B-16, ViT-L-14)
and T synthetic fine-tunes whose task vectors look like fine-tuning deltas (low rank plus small noise),
written to disk as safetensors so that loading is part of what is measured.

- build: each method's build (ESM++ artifact, or a static merge through ``merge_streaming``) runs in a
  fresh process, with per-stage wall time and peak resident memory (:mod:`esmpp.profiling`);
- runtime: latency and throughput of the routed ESM++ encoder against the plain merged open_clip tower, in
  PyTorch and in onnxruntime (both models exported with :mod:`esmpp.onnx`, parity checked), on the GPU
  when torch sees one (the builds run on the CPU: the build has no GPU path).

Every figure is the median of several repetitions after a warm-up; ratios are taken within one run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.metadata
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import pydantic
import torch
from tqdm.auto import tqdm

from esmpp.architecture import Architecture, build_visual, linear_keys
from esmpp.artifact import Artifact, TaskInfo, repeated_names, save_artifact
from esmpp.atomic import (
    check_writable_folder,
    claimed_destination,
    exit_on_terminate,
    free_mib,
    storage_errors,
    write_failure_advice,
)
from esmpp.build import BuildOptions, RoutedKind, build_artifact, check_rank
from esmpp.checkpoints import Encoder, load_encoder, save_encoder
from esmpp.errors import ArchitectureError, ConfigError, StorageError, validation_problems
from esmpp.merge import TaskSource, apply_task_vector, merge_streaming
from esmpp.merging import available_methods, check_run_options, get_method, options_share
from esmpp.profiling import StageProfile, recording, resident_bytes, stage
from esmpp.runtime.model import Experts
from esmpp.scratch import ScratchDirectory

ROUTED_METHOD = "esm++"  # the full ESM++ build; every other name is a static merge method
DEFAULT_METHODS = (ROUTED_METHOD, "esm", "tsv", "task_arithmetic")
RUNTIMES = ("torch", "onnxruntime")
WORKDIR_HINT = "pass another --workdir"  # the bench writes its checkpoints and builds there
BUILD_STAGES = ("load", "capture", "decompose", "merge", "alpha", "experts", "prototypes", "save", "other")


# The `esmpp bench` flag that sets each field of BenchConfig, named beside the field in its errors.
FLAGS = {
    "archs": "--arch",
    "task_counts": "--tasks",
    "methods": "--methods",
    "proxy_images": "--proxy-images",
    "rank": "--rank",
    "build_repeats": "--build-repeats",
    "runtime_repeats": "--runtime-repeats",
    "batch_sizes": "--batch-sizes",
    "threads": "--threads",
    "method_options": "--method-option",
}


def _some(items: tuple[Any, ...]) -> tuple[Any, ...]:
    if not items:
        raise ValueError("give at least one")
    return items


def _each_once(items: tuple[Any, ...]) -> tuple[Any, ...]:
    repeated = repeated_names([str(item) for item in items])  # a workload or a method measured twice
    if repeated:
        raise ValueError(f"has {', '.join(repeated)} more than once: give each once")
    return items


_Count = Annotated[int, pydantic.Field(ge=1)]
_AtLeastOne, _EachOnce = pydantic.AfterValidator(_some), pydantic.AfterValidator(_each_once)


@pydantic.dataclasses.dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))
class BenchConfig:
    """What `esmpp bench` measures. Defaults fit a laptop: ViT-B-32 with 2 and 8 tasks.

    Checked when made, as the command line's flags are, so that no run starts on a value that would fail or
    mean nothing: a one-line :class:`ConfigError` names each field out of bounds (and its flag), an unknown
    method or method option, or a rank above the routed layers' width; an unknown architecture raises
    :class:`ArchitectureError`. Values are read as pydantic reads them: ``task_counts=["2", 8]`` is ``(2, 8)``."""

    archs: Annotated[tuple[str, ...], _AtLeastOne, _EachOnce] = ("ViT-B-32",)
    task_counts: Annotated[tuple[_Count, ...], _AtLeastOne, _EachOnce] = (2, 8)
    methods: Annotated[tuple[str, ...], _EachOnce] = DEFAULT_METHODS  # none: the runtime only
    proxy_images: _Count = 32
    rank: _Count = 32
    routed_kinds: Annotated[tuple[RoutedKind, ...], _AtLeastOne, _EachOnce] = ("qkv", "fc")
    build_repeats: _Count = 1
    runtime_repeats: _Count = 5
    warmup: Annotated[int, pydantic.Field(ge=0)] = 1
    batch_sizes: Annotated[tuple[_Count, ...], _AtLeastOne, _EachOnce] = (1, 32)
    runtime: bool = True
    onnx: bool = True  # also time both models in onnxruntime (each exported once per architecture)
    threads: _Count | None = None  # torch intra-op threads (None: torch's default); 1 is steadier on a busy machine
    seed: int = 0
    # Merge-method options for the whole run (`--method-option`): each method, ESM++'s backbone included,
    # gets those it has (rank_fraction=0.5: ESM with half the authors' rank budget).
    method_options: dict[str, Any] = field(default_factory=dict)

    @pydantic.model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, data: Any, handler: pydantic.ValidatorFunctionWrapHandler) -> BenchConfig:
        try:
            return handler(data)
        except pydantic.ValidationError as exc:
            raise ConfigError(f"invalid bench options: {validation_problems(exc, FLAGS)}.") from exc

    def __post_init__(self) -> None:
        # Checked now, not when run_bench reaches them: an unknown second architecture used to fail only after
        # the first one's whole benchmark.
        if not self.methods and not self.runtime:
            raise ConfigError("invalid bench options: nothing to measure: give --methods, or leave out --no-runtime.")
        check_methods(self.methods, self.method_options)
        for arch in architectures(self.archs):  # the builds' experts and the runtime's random ones
            check_rank(BuildOptions(rank=self.rank, routed_kinds=self.routed_kinds), arch)


@dataclass(frozen=True)
class Workload:
    """Checkpoints on disk: ``pretrained`` and one fine-tune per task (the first T are used)."""

    arch: str
    pretrained: Path
    finetuned: tuple[Path, ...]
    seed: int


@dataclass
class BuildRun:
    """One build in one process: totals and per-stage figures (seconds, bytes)."""

    seconds: float
    stage_seconds: dict[str, float]
    stage_peak_bytes: dict[str, int]
    peak_bytes: int
    baseline_bytes: int
    exact_peaks: bool


def synthetic_finetune(
    pretrained: dict[str, torch.Tensor], generator: torch.Generator, delta_rank: int = 16, scale: float = 0.02
) -> dict[str, torch.Tensor]:
    """A fine-tune-like copy of ``pretrained``: each matrix moves by a rank-``delta_rank`` update plus 10 %
    noise, everything else by small noise, both relative to the parameter's RMS (as fine-tuning deltas
    are small next to the weights and concentrated in few directions)."""
    state = {}
    for key, weight in pretrained.items():
        rms = float(weight.float().square().mean().sqrt()) or 1.0
        noise = torch.randn(weight.shape, generator=generator)
        if weight.ndim == 2 and min(weight.shape) > delta_rank:
            left = torch.randn(weight.shape[0], delta_rank, generator=generator)
            right = torch.randn(delta_rank, weight.shape[1], generator=generator)
            delta = (left @ right) / delta_rank**0.5 + 0.1 * noise
        else:
            delta = 0.1 * noise
        state[key] = weight + scale * rms * delta
    return state


def _architecture(arch: Architecture | str) -> Architecture:
    return arch if isinstance(arch, Architecture) else Architecture.from_name(arch)


def write_workload(arch: Architecture | str, num_tasks: int, directory: Path, seed: int = 0) -> Workload:
    """Write a random pretrained ``arch`` tower (an open_clip name such as ``ViT-B-32``) and ``num_tasks``
    synthetic fine-tunes to ``directory`` (files already there from an earlier call with the same seed
    are reused)."""
    arch = _architecture(arch)

    pretrained_path = directory / f"pretrained-{seed}.safetensors"
    paths = [directory / f"task{t}-{seed}.safetensors" for t in range(num_tasks)]
    missing = [path for path in (pretrained_path, *paths) if not path.exists()]
    if not missing:
        return Workload(arch.name, pretrained_path, tuple(paths), seed)
    torch.manual_seed(seed)
    pretrained = {key: value.detach() for key, value in build_visual(arch).state_dict().items()}
    _check_room_for(missing, sum(value.nbytes for value in pretrained.values()), directory)

    def describe(exc: Exception) -> str:  # the room check passed, but something else filled the disk
        advice = write_failure_advice(exc, directory, f"{WORKDIR_HINT} or fewer --tasks")
        return f"could not write the synthetic checkpoints under {directory} ({exc}); {advice}."

    with storage_errors(describe):
        directory.mkdir(parents=True, exist_ok=True)
        if pretrained_path in missing:
            save_encoder(Encoder(arch, pretrained, "random pretrained"), pretrained_path)
        for t, path in enumerate(tqdm(paths, desc=f"write {arch.name} fine-tunes", unit="task", leave=False)):
            if path in missing:
                generator = torch.Generator().manual_seed(seed * 1000 + t + 1)
                save_encoder(Encoder(arch, synthetic_finetune(pretrained, generator), f"task{t}"), path)
    return Workload(arch.name, pretrained_path, tuple(paths), seed)


def _check_room_for(files: list[Path], bytes_per_file: int, directory: Path) -> None:
    """Raise :class:`StorageError` before writing anything, ``directory`` itself included, when ``files``
    would not fit there (a ViT-L/14 workload at T = 20 is 25 GB), rather than part-way through."""
    needed, free = len(files) * bytes_per_file / 2**20, free_mib(directory)
    if needed > free:
        raise StorageError(
            f"the {len(files)} synthetic checkpoints still to write need {needed:.0f} MiB under {directory}, "
            f"which has {free:.0f} MiB free. Free some space, {WORKDIR_HINT}, or ask for fewer --tasks."
        )


def proxy_images(arch: Architecture, count: int, task: int, seed: int = 0) -> torch.Tensor:
    """``count`` normalised images [count, 3, H, W] for ``task``: its own random template plus noise."""
    size = arch.vision["image_size"]
    generator = torch.Generator().manual_seed(seed * 1000 + 500 + task)
    template = torch.randn(1, 3, size, size, generator=generator)
    return template + 0.5 * torch.randn(count, 3, size, size, generator=generator)


def task_sources(workload: Workload, arch: Architecture, num_tasks: int, num_proxy: int) -> list[TaskSource]:
    """The first ``num_tasks`` tasks of ``workload``, checkpoints and proxy images made when loaded, with heads."""
    sources = []
    for t, path in enumerate(workload.finetuned[:num_tasks]):
        head = torch.nn.functional.normalize(
            torch.randn(10, arch.embed_dim, generator=torch.Generator().manual_seed(t))
        )
        sources.append(
            TaskSource(
                name=f"task{t}",
                load=lambda path=path: load_encoder(path),
                proxy=partial(proxy_images, arch, num_proxy, t, workload.seed),
                proxy_count=num_proxy,
                head=head,
                classes=[f"class{c}" for c in range(10)],
            )
        )
    return sources


def run_build(workload: Workload, method: str, num_tasks: int, config: BenchConfig, out: Path) -> BuildRun:
    """Build with ``method`` (``esm++`` or a static method) over the first ``num_tasks`` tasks of
    ``workload`` and save the result under ``out``, profiling each stage. Meant for a fresh process."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    baseline = resident_bytes()
    start = time.perf_counter()
    with recording() as profile:
        with stage("load"):
            pretrained = load_encoder(workload.pretrained)
        tasks = task_sources(workload, pretrained.arch, num_tasks, config.proxy_images)
        merge_method = get_method(backbone_method(method))
        method_options = options_share(merge_method, config.method_options)
        if method == ROUTED_METHOD:
            options = BuildOptions(
                alpha=1.0, rank=config.rank, routed_kinds=config.routed_kinds, method_options=method_options
            )
            artifact = build_artifact(pretrained, tasks, options, progress=False)
            with stage("save"):
                save_artifact(artifact, out / "artifact", overwrite=True, elsewhere=WORKDIR_HINT)
        else:
            task_vector = merge_streaming(pretrained, tasks, merge_method(method_options, len(tasks)), progress=False)
            with stage("alpha"):
                merged = apply_task_vector(pretrained.state, task_vector, 1.0)

            def describe(exc: Exception) -> str:
                advice = write_failure_advice(exc, out, WORKDIR_HINT)
                return f"could not write the {method} build's merged encoder under {out} ({exc}); {advice}."

            with stage("save"), storage_errors(describe):
                save_encoder(Encoder(pretrained.arch, merged, method), out / "merged.safetensors")
    return _build_run(profile, time.perf_counter() - start, baseline)


def _build_run(profile: StageProfile, seconds: float, baseline: int) -> BuildRun:
    return BuildRun(
        seconds=seconds,
        stage_seconds=dict(profile.seconds),
        stage_peak_bytes=dict(profile.peak_bytes),
        peak_bytes=max(profile.peak_bytes.values(), default=0),
        baseline_bytes=baseline,
        exact_peaks=profile.exact_peaks,
    )


def run_build_isolated(workload: Workload, method: str, num_tasks: int, config: BenchConfig) -> BuildRun:
    """:func:`run_build` in a fresh spawned process, so that its peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    with (
        # Beside the workload, where the user gave room (--workdir), not in the system's temporary directory.
        ScratchDirectory(".esmpp-bench-build-", workload.pretrained.parent) as out,
        concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool,
    ):
        return pool.submit(_terminable_build, workload, method, num_tasks, config, out.path).result()


def _terminable_build(workload: Workload, method: str, num_tasks: int, config: BenchConfig, out: Path) -> BuildRun:
    """:func:`run_build` in the worker process, which cleans up its spilled summaries when terminated."""
    exit_on_terminate()
    return run_build(workload, method, num_tasks, config, out)


def median_build(runs: Sequence[BuildRun]) -> dict[str, Any]:
    """Medians over repeated builds of the total and of each stage (seconds; peak memory in MiB)."""
    stages = sorted({name for run in runs for name in run.stage_seconds})
    return {
        "seconds": statistics.median(run.seconds for run in runs),
        "peak_mib": statistics.median(run.peak_bytes for run in runs) / 2**20,
        "baseline_mib": statistics.median(run.baseline_bytes for run in runs) / 2**20,
        "stage_seconds": {s: statistics.median(run.stage_seconds.get(s, 0.0) for run in runs) for s in stages},
        "stage_peak_mib": {
            s: statistics.median(run.stage_peak_bytes.get(s, 0) for run in runs) / 2**20 for s in stages
        },
        "exact_peaks": all(run.exact_peaks for run in runs),
        "repeats": len(runs),
        "seconds_each": [run.seconds for run in runs],  # in build order, to show the spread behind the median
    }


def interleaved_builds(
    workload: Workload, num_tasks: int, config: BenchConfig, log: Callable[[str], None] = print
) -> dict[str, dict[str, Any]]:
    """:func:`median_build` of ``config.build_repeats`` builds of each of ``config.methods`` over the first
    ``num_tasks`` tasks of ``workload``, in rounds that build every method once (as
    :func:`interleaved_medians` times the runtime): a slow spell of the machine then weighs on every method
    alike instead of on the one that happened to run through it (TSV-M's ViT-B/32 build at T = 8 took 86 s,
    median of three, in one run and 103 s in the next, on one machine)."""
    runs: dict[str, list[BuildRun]] = {method: [] for method in config.methods}
    for round_number in range(1, config.build_repeats + 1):
        for method, method_runs in runs.items():
            log(f"{workload.arch} T={num_tasks} {method}: build {round_number} of {config.build_repeats}")
            method_runs.append(run := run_build_isolated(workload, method, num_tasks, config))
            log(f"  {run.seconds:.1f} s, peak {run.peak_bytes / 2**20:.0f} MiB, {run.stage_seconds}")
    return {method: median_build(method_runs) for method, method_runs in runs.items()}


def expert_bytes(arch: Architecture, kinds: Sequence[str], rank: int) -> int:
    """Bytes of one task's float32 experts (A_t and B_t of every routed layer) at ``rank``."""
    visual = build_visual_shapes(arch)
    return sum(4 * rank * (visual[key][0] + visual[key][1]) for key in linear_keys(arch, kinds))


def build_visual_shapes(arch: Architecture) -> dict[str, torch.Size]:
    """Parameter shapes of ``arch``'s tower without allocating its weights."""
    with torch.device("meta"):
        return {key: value.shape for key, value in build_visual(arch).state_dict().items()}


def interleaved_medians(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int, synchronize: bool
) -> dict[str, float]:
    """Median wall time of each of ``calls`` over ``repeats`` rounds after ``warmup`` untimed ones. A round
    runs every call once, so that load from other processes hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for index in range(warmup + repeats):
        for name, call in calls.items():
            if synchronize:
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if synchronize:
                torch.cuda.synchronize()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def random_experts(arch: Architecture, num_tasks: int, rank: int, kinds: Sequence[str], seed: int = 0) -> dict:
    """Experts of the right shapes with small random factors and random unit prototypes."""
    generator = torch.Generator().manual_seed(seed)
    shapes = build_visual_shapes(arch)
    experts = {}
    for key in linear_keys(arch, kinds):
        d_out, d_in = shapes[key]
        experts[key] = Experts(
            up=torch.randn(num_tasks, d_out, rank, generator=generator) / d_out**0.5,
            down=0.01 * torch.randn(num_tasks, rank, d_in, generator=generator),
            prototypes=torch.randn(num_tasks, 1, d_in, generator=generator),
        )
    return experts


def runtime_artifact(arch: Architecture | str, num_tasks: int, config: BenchConfig) -> Artifact:
    """A random artifact with the shapes of a real ESM++ build of ``arch``: experts of rank ``config.rank``
    on ``config.routed_kinds``, random prototypes, unit-row heads of 10 classes."""
    arch = _architecture(arch)
    torch.manual_seed(config.seed)
    backbone = {key: value.detach() for key, value in build_visual(arch).state_dict().items()}
    experts = random_experts(arch, num_tasks, config.rank, config.routed_kinds, config.seed)
    tasks = [TaskInfo(f"task{t}", [f"class{c}" for c in range(10)]) for t in range(num_tasks)]
    heads = [torch.nn.functional.normalize(torch.randn(10, arch.embed_dim), dim=-1) for _ in tasks]
    return Artifact(arch, tasks, backbone, experts, heads, {"method": "random"})


def plain_tower(artifact: Artifact) -> torch.nn.Module:
    """The plain open_clip tower of the artifact's merged backbone, which the routed encoder is measured against."""
    visual = build_visual(artifact.arch)
    visual.load_state_dict(artifact.backbone, strict=True)
    return visual.eval()


def latency_figures(seconds: dict[str, float], batch: int) -> dict[str, Any]:
    """Seconds per call of ``plain`` and ``routed`` at ``batch`` → latency (ms), throughput (images/s) and
    ``ratio`` = routed / plain latency."""
    figures: dict[str, Any] = {
        name: {"latency_ms": 1000 * value, "images_per_s": batch / value} for name, value in seconds.items()
    }
    figures["ratio"] = figures["routed"]["latency_ms"] / figures["plain"]["latency_ms"]
    return figures


def onnxruntime_sessions(artifact: Artifact, directory: Path, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export the routed model (``esmpp.onnx.export_onnx``, parity checked) and the plain tower
    (``export_tower``, checked) under ``directory`` → (onnxruntime sessions ``plain`` and ``routed`` with
    ``threads`` intra-op threads, what the exports did)."""
    from esmpp import onnx as esmpp_onnx

    start = time.perf_counter()
    report = esmpp_onnx.export_onnx(artifact, directory / "routed")
    plain_path = directory / "plain" / esmpp_onnx.MODEL_FILE
    plain_error = esmpp_onnx.export_tower(plain_tower(artifact), artifact.arch, plain_path)
    sessions = {
        "plain": esmpp_onnx.inference_session(plain_path, threads=threads),
        "routed": esmpp_onnx.inference_session(report.path, threads=threads),
    }
    export = {
        "providers": sessions["routed"].get_providers(),
        "threads": threads,
        "export_seconds": time.perf_counter() - start,
        "routed_parity": asdict(report.parity) if report.parity else None,
        "plain_error": plain_error,
    }
    return sessions, export


def _onnxruntime_call(session: Any, pixels: torch.Tensor) -> Callable[[], object]:
    """One forward of ``session`` with the input already on the session's device (as PyTorch's is) and the
    outputs left there, so that both runtimes are timed alike."""
    import onnxruntime

    device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    feeds = {"pixel_values": onnxruntime.OrtValue.ortvalue_from_numpy(pixels.numpy(), device)}
    return partial(session.run_with_ort_values, None, feeds)


# The packages the onnxruntime half of the runtime figures needs; without one of them it is skipped.
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


def measure_runtime(artifact: Artifact, config: BenchConfig, device: torch.device) -> dict[str, Any]:
    """Latency (ms) and throughput (images/s) of the routed ESM++ encoder of ``artifact`` and of the plain
    merged tower (open_clip, the same backbone) at each batch size: in PyTorch on ``device`` and, with
    ``config.onnx``, in onnxruntime (``esmpp.onnx.choose_providers``; on the CPU as many threads as
    PyTorch). ``ratio`` = routed / plain latency within one runtime. Each runtime's pair is timed
    interleaved, one runtime after the other, so that one runtime's spinning thread pool does not slow the
    other's."""
    plain = plain_tower(artifact).to(device)
    routed = artifact.to_model().to(device)
    result: dict[str, Any] = {"torch": {}, "expert_flops_ratio": expert_flops_ratio(artifact)}
    size = artifact.arch.image_size
    with ScratchDirectory("esmpp-bench-onnx-") as scratch:
        sessions = None
        if config.onnx:
            try:
                sessions, result["onnx_export"] = onnxruntime_sessions(artifact, scratch.path, torch.get_num_threads())
                result["onnxruntime"] = {}
            except ModuleNotFoundError as exc:
                # Only a missing ONNX package is a reason to skip: any other import failure is a bug to see.
                if (exc.name or "").partition(".")[0] not in ONNX_PACKAGES:
                    raise
                result["onnx_export"] = {"skipped": f"{exc.name} is not installed ({exc})"}
        for batch in config.batch_sizes:
            pixels = torch.randn(batch, 3, size, size)
            on_device = pixels.to(device)
            with torch.inference_mode():
                seconds = interleaved_medians(
                    {"plain": partial(plain, on_device), "routed": partial(routed, on_device)},
                    config.runtime_repeats,
                    config.warmup,
                    device.type == "cuda",
                )
            result["torch"][f"batch{batch}"] = latency_figures(seconds, batch)
            if sessions is not None:
                calls = {name: _onnxruntime_call(session, pixels) for name, session in sessions.items()}
                seconds = interleaved_medians(calls, config.runtime_repeats, config.warmup, False)
                result["onnxruntime"][f"batch{batch}"] = latency_figures(seconds, batch)
    return result


def run_runtime(arch: Architecture | str, num_tasks: int, config: BenchConfig, device: torch.device) -> dict[str, Any]:
    """:func:`measure_runtime` on a random artifact of ``arch`` with ``num_tasks`` tasks."""
    return measure_runtime(runtime_artifact(arch, num_tasks, config), config, device)


def expert_flops_ratio(artifact: Artifact) -> float:
    """The experts' extra multiply-adds per token over the tower's linear layers (qkv, out, fc, proj)."""
    shapes = build_visual_shapes(artifact.arch)
    dense = sum(shapes[key].numel() for key in linear_keys(artifact.arch, ("qkv", "out", "fc", "proj")))
    extra = sum(layer.up.shape[2] * (layer.up.shape[1] + layer.down.shape[2]) for layer in artifact.experts.values())
    return extra / dense


def cpu_model() -> str:
    """The processor's name, as Linux's /proc/cpuinfo gives it (else what ``platform`` knows): float64 LAPACK
    speeds differ by 2x between machines of the same core count (an AMD EPYC's 3072² eigh took 4.6 s, an
    Intel Xeon's 2.2-2.7 s, both with torch's MKL), so build ratios are comparable only on one model."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Versions, processor, CPU count, threads and load: what a reader needs to judge the figures."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_bench(config: BenchConfig, workdir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every workload of ``config`` (checkpoints under ``workdir``; its values were checked when it was
    made) and return the JSON-able report."""
    with contextlib.ExitStack() as claims:
        if config.methods:  # the builds write their checkpoints and outputs there
            # Claimed for the whole run: a second bench there would rewrite the checkpoints under this one.
            claims.enter_context(claimed_destination(workdir, WORKDIR_HINT))
            check_writable_folder(workdir, WORKDIR_HINT)
        return _run_workloads(config, workdir, log)


def _run_workloads(config: BenchConfig, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """:func:`run_bench` once ``workdir`` is claimed and checked."""
    archs = architectures(config.archs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    # Only the runtime moves to a GPU: the build (capture, decompositions, merge) runs on the CPU.
    report: dict[str, Any] = {"config": asdict(config), "environment": environment(), "runtime_device": str(device)}
    report["build"], report["runtime"], report["targets"] = {}, {}, {}
    for arch in archs:
        arch_name = arch.name
        builds: dict[str, dict[str, Any]] = {}
        if config.methods:  # the runtime alone needs no checkpoints on disk
            log(f"{arch_name}: writing {max(config.task_counts)} synthetic fine-tunes under {workdir}")
            workload = write_workload(arch_name, max(config.task_counts), workdir / arch_name, config.seed)
            for num_tasks in config.task_counts:
                builds[str(num_tasks)] = interleaved_builds(workload, num_tasks, config, log)
        report["build"][arch_name] = builds
        if config.runtime:
            num_tasks = max(config.task_counts)
            log(f"{arch_name} runtime T={num_tasks} on {device}" + (" (+ onnxruntime)" if config.onnx else ""))
            report["runtime"][arch_name] = run_runtime(arch_name, num_tasks, config, device)
        report["targets"][arch_name] = targets(builds, report["runtime"].get(arch_name), arch, config)
    report["environment"]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return report


def check_methods(methods: Sequence[str], method_options: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` before any work when a name of ``methods`` (``--methods``) is neither
    ``esm++`` nor a static merge method, or a ``--method-option`` is an option of none of them or has a value
    one of them refuses."""
    known = (ROUTED_METHOD, *available_methods())
    unknown = [method for method in methods if method not in known]
    if unknown:
        raise ConfigError(
            f"--methods {','.join(methods)!r}: no method {', '.join(map(repr, unknown))}. Choose from "
            f"{', '.join(known)}, or give '' to measure the runtime only."
        )
    check_run_options([backbone_method(method) for method in methods], method_options)


def architectures(names: Sequence[str]) -> list[Architecture]:
    """The open_clip architectures ``names`` (``--arch``), all resolved before any work: a mistyped second
    name would otherwise fail only after the first architecture's whole benchmark."""
    try:
        return [Architecture.from_name(name) for name in names]
    except ArchitectureError as exc:
        raise ArchitectureError(f"--arch: {exc}") from exc


def backbone_method(method: str) -> str:
    """The static merge method a bench ``method`` runs: ``esm++`` builds its backbone with ESM."""
    return BuildOptions().method if method == ROUTED_METHOD else method


NO_TARGETS_HINT = (
    "build ratios need tsv among --methods, the peak growth two --tasks counts with esm++, "
    "routed/plain the runtime (drop --no-runtime)"
)


def targets(
    builds: dict[str, dict[str, Any]], runtime: dict[str, Any] | None, arch: Architecture, config: BenchConfig
) -> dict[str, Any]:
    """The issue's acceptance figures that this run can compute (ratios within this run)."""
    result: dict[str, Any] = {}
    for num_tasks, by_method in builds.items():
        tsv = by_method.get("tsv")
        if tsv is None:
            continue
        for method in (ROUTED_METHOD, "esm"):
            if method in by_method:
                result[f"T{num_tasks}_{method}_over_tsv_build"] = by_method[method]["seconds"] / tsv["seconds"]
    counts = sorted(int(t) for t in builds)
    if len(counts) > 1 and all(ROUTED_METHOD in builds[str(t)] for t in counts):
        low, high = counts[0], counts[-1]
        growth = builds[str(high)][ROUTED_METHOD]["peak_mib"] - builds[str(low)][ROUTED_METHOD]["peak_mib"]
        budget = (high - low) * expert_bytes(arch, config.routed_kinds, config.rank) / 2**20
        result[f"peak_growth_T{low}_to_T{high}_mib"] = growth
        result[f"experts_of_{high - low}_tasks_mib"] = budget
        result["peak_growth_over_experts"] = growth / budget
    for name in RUNTIMES:
        for batch, figures in (runtime or {}).get(name, {}).items():
            result[f"{name}_routed_over_plain_{batch}"] = figures["ratio"]
    return result


def format_report(report: dict[str, Any]) -> str:
    """The report as plain-text tables: build stages per workload, runtime, targets."""
    load = report["environment"]["load_average"]
    cpu = report["environment"].get("cpu", "an unrecorded CPU")
    lines = [f"builds on the CPU ({cpu}), runtime on {report['runtime_device']}, load average {load}"]
    if report["config"]["method_options"]:
        lines.append(f"method options: {report['config']['method_options']}")
    for arch_name, builds in report["build"].items():
        if not builds:
            continue
        lines.append(f"\n{arch_name} build (s; peak MiB)")
        header = f"{'T':>3} {'method':<16}{'total':>8}{'range':>14}{'peak':>8}"
        lines.append(header + "".join(f"{s[:8]:>9}" for s in BUILD_STAGES))
        for num_tasks, by_method in builds.items():
            for method, figures in by_method.items():
                cells = "".join(f"{figures['stage_seconds'].get(s, 0.0):>9.2f}" for s in BUILD_STAGES)
                spread = f"{min(figures['seconds_each']):.1f}-{max(figures['seconds_each']):.1f}"
                totals = f"{figures['seconds']:>8.1f} {spread:>13}{figures['peak_mib']:>8.0f}"
                lines.append(f"{num_tasks:>3} {method:<16}{totals}{cells}")
    for arch_name, runtime in report["runtime"].items():
        lines.extend(format_runtime(arch_name, runtime))
    for arch_name, figures in report["targets"].items():
        lines.append(f"\n{arch_name} targets")
        lines.extend(f"  {name:<36} {value:.3f}" for name, value in figures.items())
        if not figures:
            lines.append(f"  none in this run: {NO_TARGETS_HINT}")
    return "\n".join(lines)


def format_runtime(name: str, runtime: dict[str, Any]) -> list[str]:
    """The figures of :func:`measure_runtime` as table lines, one per runtime and batch size."""
    lines = [f"\n{name} runtime (ms per batch; images/s)"]
    lines.append(
        f"  {'runtime':<12}{'batch':>6}{'plain ms':>11}{'/s':>8}{'routed ms':>11}{'/s':>8}{'routed/plain':>14}"
    )
    for runtime_name in RUNTIMES:
        for batch, figures in runtime.get(runtime_name, {}).items():
            plain, routed = figures["plain"], figures["routed"]
            lines.append(
                f"  {runtime_name:<12}{batch.removeprefix('batch'):>6}{plain['latency_ms']:>11.1f}"
                f"{plain['images_per_s']:>8.1f}{routed['latency_ms']:>11.1f}{routed['images_per_s']:>8.1f}"
                f"{figures['ratio']:>14.3f}"
            )
    export = runtime.get("onnx_export")
    if export is not None and "skipped" in export:
        lines.append(f"  onnxruntime skipped: {export['skipped']}")
    elif export is not None:
        parity = export["routed_parity"]
        lines.append(
            f"  onnxruntime: {', '.join(export['providers'])}, {export['threads']} threads; exports took "
            f"{export['export_seconds']:.1f} s; ONNX vs PyTorch: plain embedding error {export['plain_error']:.1e}, "
            f"routed {parity['embedding_error']:.1e}, routing agreement {parity['routing_agreement']:.2f}"
        )
    lines.append(f"  experts' extra FLOPs over the linear layers: {runtime['expert_flops_ratio']:.1%}")
    return lines
