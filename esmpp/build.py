"""The ESM++ builder: pretrained + T fine-tuned encoders → one routed artifact.

Stages (each timed, each streaming over tasks with one fine-tuned checkpoint in memory):
1. merge: the backbone's task vector with a static method (ESM by default);
2. alpha: α given, or chosen on the tasks' labelled validation data (golden-section on [0, 2]), or 1 when
   no task has any (some tasks only is an error);
3. experts: per task, the rank-r ESD expert of the residual W_t − W_merged at each routed layer under the
   task's own activations (those the merge captured of the fine-tuned model where it captured that layer's
   Gram: parked on disk in between, not captured again; option ``rank_energy``: r per layer, the fewest
   directions that keep that share of every task's residual shift), and the task's prototypes (mean
   routed-layer input on its proxy images);
4. prototypes (option ``prototype_source="runtime"``): prototypes re-measured in the routed model itself
   with the task forced — the feature space the router actually sees;
5. the router: the prototypes themselves (cosine router, the paper's), or a linear discriminant fitted on
   the same proxy features (``router="discriminant"``, see :mod:`esmpp.experts`);
6. the artifact, written atomically.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import pydantic
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from esmpp.allocator import release_free_memory
from esmpp.architecture import ROUTED_KINDS, Architecture, as_matrix, routed_keys, weight_shapes
from esmpp.artifact import Artifact, TaskInfo, repeated_names
from esmpp.capture import ActivationStats, capture_statistics
from esmpp.checkpoints import Encoder, check_compatible
from esmpp.errors import ConfigError, validation_problems
from esmpp.experts import discriminant_router, rank_for_energy, residual_expert, task_prototypes, within_task_scatter
from esmpp.merge import (
    TaskSource,
    apply_task_vector,
    batches,
    golden_section_search,
    merge_streaming,
    proxy_batches,
)
from esmpp.merging import get_method
from esmpp.profiling import stage
from esmpp.runtime.model import Experts, RoutedEncoder
from esmpp.spill import Parked, SpillDirectory


@dataclass
class BuildOptions:
    """Every choice of the ESM++ build, with the authors' defaults."""

    method: str = "esm"
    method_options: dict[str, Any] = field(default_factory=dict)
    alpha: float | None = None  # None: search on every task's validation data (1.0 when no task has any)
    rank: int = 32
    rank_energy: float | None = None  # r per layer by retained energy, at most ``rank``; None: ``rank`` everywhere
    routed_kinds: tuple[str, ...] = ("qkv", "fc")
    prototype_source: Literal["finetuned", "runtime"] = "finetuned"
    prototypes_per_task: int = 1
    router: Literal["cosine", "discriminant"] = "cosine"
    router_shrinkage: float = 0.1
    batch_size: int = 64
    alpha_evaluations: int = 10

    def check(self) -> None:
        """Raise a one-line ConfigError naming each option out of its bounds (those of :class:`OptionsConfig`)."""
        try:
            OptionsConfig.model_validate({name: getattr(self, name) for name in OptionsConfig.model_fields})
        except pydantic.ValidationError as exc:
            raise ConfigError(f"invalid build options: {validation_problems(exc)}.") from exc


_DEFAULTS = BuildOptions()

# α scales the merged task vector onto the pretrained weights. Below 0 it moves them away from every task; the
# search covers ALPHA_SEARCH, and MAX_ALPHA leaves room to extrapolate well past it, where a larger α only ruins
# the backbone (1e39 overflows float32: the build used to fail after the merge, on a non-finite artifact).
# `esmpp build --alpha`'s help states both without importing this module (a test keeps them in step).
ALPHA_SEARCH = (0.0, 2.0)
MAX_ALPHA = 10.0


RoutedKind = Literal[ROUTED_KINDS]  # the architecture's list, as the choices pydantic names in its errors


class OptionsConfig(pydantic.BaseModel):
    """BuildOptions' choices, validated: the one statement of their bounds, for a build config's `options:`,
    the command line's flags and :meth:`BuildOptions.check` alike. Floats must be finite: a NaN or infinite α,
    share or shrinkage would only show as a broken artifact after the build."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)
    method: str = _DEFAULTS.method
    method_options: dict[str, Any] = pydantic.Field(default_factory=dict)
    alpha: float | None = pydantic.Field(_DEFAULTS.alpha, ge=0.0, le=MAX_ALPHA)
    rank: int = pydantic.Field(_DEFAULTS.rank, ge=1)
    rank_energy: float | None = pydantic.Field(_DEFAULTS.rank_energy, gt=0.0, le=1.0)
    routed_kinds: list[RoutedKind] = pydantic.Field(list(_DEFAULTS.routed_kinds), min_length=1)
    prototype_source: Literal["finetuned", "runtime"] = _DEFAULTS.prototype_source
    prototypes_per_task: int = pydantic.Field(_DEFAULTS.prototypes_per_task, ge=1)
    router: Literal["cosine", "discriminant"] = _DEFAULTS.router
    router_shrinkage: float = pydantic.Field(_DEFAULTS.router_shrinkage, ge=0.0, le=1.0)

    @pydantic.model_validator(mode="after")
    def _discriminant_router_on_runtime_prototypes(self) -> OptionsConfig:
        if self.router == "discriminant" and self.prototype_source != "runtime":
            raise ValueError(
                "the discriminant router is fitted on the features the routed model itself sees: use it with "
                "prototype_source='runtime' (--prototypes runtime). Fitted on the fine-tuned models' features it "
                "learns to tell the models apart rather than the images (28 % routing on the mini zoo)"
            )
        return self

    def to_build_options(self) -> BuildOptions:
        data = self.model_dump()
        data["routed_kinds"] = tuple(data["routed_kinds"])
        return BuildOptions(**data)


def check_rank(options: BuildOptions, arch: Architecture) -> None:
    """Refuse a ``rank`` above the largest min(d_in, d_out) of the routed layers of ``arch``: no expert can have
    more directions than that, so the rest would be empty, and the build record would claim them. Needs only
    the architecture, so a zoo build can be checked before the zoo is built."""
    kinds = options.routed_kinds
    shapes = weight_shapes(arch)
    matrices = (as_matrix(torch.empty(shapes[key], device="meta")) for key in routed_keys(arch, kinds))
    largest = max(min(matrix.shape) for matrix in matrices)
    if options.rank > largest:
        raise ConfigError(
            f"rank {options.rank} is more than the {largest} directions that the routed layers ({', '.join(kinds)}) "
            f"of {arch.name} have at most (min(d_in, d_out)): set `rank` (--rank) to at most {largest}."
        )


def check_prototypes_per_task(
    options: BuildOptions, proxy_counts: Mapping[str, int], more_images: str | None = "give the task more proxy images"
) -> None:
    """Refuse more prototypes per task than the proxy images of the task that has fewest (``proxy_counts``:
    task name → how many it has): a prototype stands for a group of a task's proxy images, so with more
    prototypes than images some would repeat an image. ``more_images``: how to give a task more, where the
    caller can say (a zoo's are fixed: None)."""
    if not proxy_counts:  # no count known before the images load: checked then (see _checked_as_they_load)
        return
    fewest = min(proxy_counts, key=proxy_counts.__getitem__)
    available = proxy_counts[fewest]
    if options.prototypes_per_task > available:
        raise ConfigError(
            f"prototypes_per_task {options.prototypes_per_task} is more than the {available} proxy images of task "
            f"{fewest!r}: set `prototypes_per_task` (--prototypes-per-task) to at most {available}"
            + (f", or {more_images}." if more_images else ".")
        )


def _checked_as_they_load(task: TaskSource, options: BuildOptions) -> TaskSource:
    """``task``, whose ``proxy_count`` is unknown, with its proxy images checked against ``options`` each time
    they load (:func:`check_prototypes_per_task`): the build stops at their first load (the merge's, if the
    method captures statistics, else the experts'), not after the merge, in :func:`task_prototypes`."""

    def proxy() -> torch.Tensor:
        images = task.proxy()
        if images.shape[0]:  # none at all: proxy_batches says so in its own words
            check_prototypes_per_task(options, {task.name: images.shape[0]})
        return images

    return replace(task, proxy=proxy)


def check_alpha_search(options: BuildOptions, has_validation: Mapping[str, bool]) -> None:
    """Refuse a build that would search α (none given) with validation data for only some of the tasks
    (``has_validation``: task name → whether it has some). A search on some tasks would favour them; without
    this, the build used to take α = 1 silently, as if no task had any."""
    missing = [name for name, present in has_validation.items() if not present]
    if options.alpha is None and 0 < len(missing) < len(has_validation):
        raise ConfigError(
            f"tasks {missing} have no validation data but the other tasks do, and α is chosen on every task's "
            "validation data or on none: give each task a `validation:` folder, or set `alpha` (--alpha)."
        )


def _embed(visual: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([visual(batch) for batch in batches(images, batch_size)])


def validation_accuracy(visual: torch.nn.Module, tasks: Sequence[TaskSource], batch_size: int = 256) -> float:
    """Mean over tasks of the accuracy (%) of ``visual`` + each task's head on its validation data."""
    scores = []
    for task in tasks:
        images, labels = task.validation
        logits = F.normalize(_embed(visual, images, batch_size), dim=-1) @ task.head.T
        scores.append((logits.argmax(dim=-1) == labels).float().mean().item() * 100)
    return sum(scores) / len(scores)


def choose_alpha(
    pretrained: Encoder,
    task_vector: dict[str, torch.Tensor],
    tasks: Sequence[TaskSource],
    evaluations: int = 10,
    progress: bool = True,
) -> tuple[float, list[tuple[float, float]]]:
    """α maximising the mean validation accuracy of θ0 + α·τ (golden-section on ``ALPHA_SEARCH``)."""
    visual = pretrained.to_module()
    bar = tqdm(total=evaluations, desc="choose alpha", unit="eval", disable=not progress)

    def score(alpha: float) -> float:
        visual.load_state_dict(apply_task_vector(pretrained.state, task_vector, alpha))
        bar.update()
        return validation_accuracy(visual, tasks)

    try:
        return golden_section_search(score, *ALPHA_SEARCH, evaluations)
    finally:
        bar.close()


class _Prototypes:
    """Prototypes of every routed layer, filled task by task, and the pooled statistics the discriminant
    router needs (a d_in × d_in scatter per layer, whatever the number of tasks)."""

    def __init__(self, input_dims: dict[str, int], num_tasks: int, options: BuildOptions) -> None:
        self.options = options
        per_task = options.prototypes_per_task
        self.prototypes = {key: torch.empty(num_tasks, per_task, d_in) for key, d_in in input_dims.items()}
        self.scatter: dict[str, torch.Tensor] = {}
        self.counts = dict.fromkeys(input_dims, 0)
        self.means = {key: torch.zeros_like(prototypes) for key, prototypes in self.prototypes.items()}

    def add(self, t: int, image_means: dict[str, torch.Tensor]) -> None:
        """Task ``t``'s proxy images' mean tokens [n, d_in] at each routed layer."""
        for key, means in image_means.items():
            prototypes = task_prototypes(means, self.options.prototypes_per_task)
            self.prototypes[key][t] = prototypes
            if self.options.router == "discriminant":
                scatter, self.means[key][t] = within_task_scatter(means, prototypes)
                self.scatter[key] = scatter + self.scatter[key] if key in self.scatter else scatter
                self.counts[key] += means.shape[0]

    def finish(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Experts]:
        """The routed layers' experts from their stacked ``factors`` (up [T, d_out, r], down [T, r, d_in])."""
        if self.options.router == "cosine":
            return {key: Experts(up, down, self.prototypes[key]) for key, (up, down) in factors.items()}
        return {
            key: Experts(
                up,
                down,
                *discriminant_router(
                    self.scatter[key], self.counts[key], self.means[key], self.options.router_shrinkage
                ),
            )
            for key, (up, down) in factors.items()
        }


class _MergeStatistics:
    """The routed layers' statistics that the merge captures (the Gram of each layer's input in the
    fine-tuned model, on the task's proxy images: what the experts' pass needs), parked on disk until that
    pass takes them, so that it forwards the proxy images again only for layers the merge did not capture.
    Costs disk, not memory: d_in² float64 per routed layer and task (113 MB per task on ViT-B/32, 403 MB on
    ViT-L/14), against a forward of the task's proxy set."""

    def __init__(self, spill: SpillDirectory, routed: Sequence[str], num_tasks: int) -> None:
        self.spill = spill
        self.routed = set(routed)
        self.parked: list[dict[str, Parked[ActivationStats]]] = [{} for _ in range(num_tasks)]

    def keep(self, t: int, key: str, stats: ActivationStats) -> None:
        """``merge_streaming``'s ``on_statistics``: park task ``t``'s ``stats`` of a routed layer, unless they
        are the moment of the layer's shift, which an expert of the residual cannot use."""
        if key in self.routed and not stats.projected:
            self.parked[t][key] = self.spill.park(stats)

    def take(self, t: int) -> dict[str, Parked[ActivationStats]]:
        """Task ``t``'s parked statistics (routed key → parked stats, to load one layer at a time), given once."""
        parked, self.parked[t] = self.parked[t], {}
        return parked


@dataclass(frozen=True)
class _ExpertFactors:
    """One task's expert at one routed layer: ``up`` (``d_out × r``) and ``down`` (``r × d_in``)."""

    up: torch.Tensor
    down: torch.Tensor


def _stacked(parked: list[Parked[_ExpertFactors]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's T parked experts, each cut to its first ``rank`` directions → up [T, d_out, rank], down
    [T, rank, d_in]."""
    factors = [item.load() for item in parked]
    return torch.stack([f.up[:, :rank] for f in factors]), torch.stack([f.down[:rank] for f in factors])


def _runtime_prototypes(
    arch, backbone, experts: dict[str, Experts], heads, tasks: Sequence[TaskSource], options: BuildOptions
) -> dict[str, Experts]:
    model = RoutedEncoder(arch, backbone, experts, heads)
    prototypes = _Prototypes({key: layer.down.shape[-1] for key, layer in experts.items()}, len(tasks), options)
    for t, task in enumerate(tasks):

        def forced(images: torch.Tensor, t: int = t) -> None:
            model(images, torch.full((images.shape[0],), t, dtype=torch.long))

        stats = capture_statistics(
            model.visual, proxy_batches(task, options.batch_size), experts, with_gram=False, run=forced
        )
        prototypes.add(t, {key: stats[key].image_means for key in experts})
    return prototypes.finish({key: (layer.up, layer.down) for key, layer in experts.items()})


def build_artifact(
    pretrained: Encoder,
    tasks: Sequence[TaskSource],
    options: BuildOptions | None = None,
    progress: bool = True,
) -> Artifact:
    """Run the ESM++ build (see module docstring) and return the artifact (not yet written)."""
    options = options or BuildOptions()
    options.check()
    check_rank(options, pretrained.arch)
    if not tasks:
        raise ConfigError("no tasks to merge: give at least one task with a fine-tuned checkpoint.")
    repeated = repeated_names([task.name for task in tasks])
    if repeated:  # the artifact refuses them: say so now, not at its save after the whole build
        raise ConfigError(f"tasks named more than once: {', '.join(repeated)}. Give each task its own name.")
    for task in tasks:
        if task.head is None:
            raise ConfigError(f"task {task.name!r} has no head: give a head file or class names.")
    check_prototypes_per_task(options, {task.name: task.proxy_count for task in tasks if task.proxy_count is not None})
    tasks = [task if task.proxy_count is not None else _checked_as_they_load(task, options) for task in tasks]
    check_alpha_search(options, {task.name: task.validation is not None for task in tasks})
    timings: dict[str, float] = {}

    routed = routed_keys(pretrained.arch, options.routed_kinds)
    # Each task's experts are parked on disk until the last fine-tuned model is gone: kept in memory, they
    # would be the only state of this pass that grows with T (190 MB at T = 20 on ViT-B/32, 570 MB on L/14)
    # and would add to the peak, which is a fine-tuned model and its activation statistics.
    with SpillDirectory() as spill:
        merge_statistics = _MergeStatistics(spill, routed, len(tasks))
        start = time.perf_counter()
        method = get_method(options.method)(options.method_options, num_tasks=len(tasks))
        task_vector = merge_streaming(
            pretrained, tasks, method, progress, options.batch_size, on_statistics=merge_statistics.keep
        )
        timings["merge"] = time.perf_counter() - start

        start = time.perf_counter()
        history: list[tuple[float, float]] = []
        with stage("alpha"):
            if options.alpha is not None:
                alpha = options.alpha
            elif all(task.validation is not None for task in tasks):
                alpha, history = choose_alpha(pretrained, task_vector, tasks, options.alpha_evaluations, progress)
            else:
                alpha = 1.0
            backbone = apply_task_vector(pretrained.state, task_vector, alpha)
        del task_vector
        # Its tensors (a model's worth, 1-9 MiB each) freed holes in the heap that stayed resident under the
        # experts' pass's peak: 2446 against 2092 MiB on ViT-B/32 at T = 20 (allocator module docstring).
        release_free_memory()
        timings["alpha"] = time.perf_counter() - start

        start = time.perf_counter()
        prototypes = _Prototypes({key: as_matrix(backbone[key]).shape[1] for key in routed}, len(tasks), options)
        parked: dict[str, list[Parked[_ExpertFactors]]] = {key: [] for key in routed}
        layer_ranks = dict.fromkeys(routed, 1)  # with rank_energy: the most directions any task needs so far
        for t, task in enumerate(tqdm(tasks, desc="experts", unit="task", disable=not progress)):
            with stage("load"):
                finetuned = task.load()
                check_compatible(pretrained, finetuned)
            with stage("capture"):
                parked_stats = merge_statistics.take(t)
                missing = [key for key in routed if key not in parked_stats]
                captured: dict[str, ActivationStats] = {}
                if missing:
                    visual = finetuned.to_module(share=True)
                    captured = capture_statistics(visual, proxy_batches(task, options.batch_size), missing)
                    del visual
            image_means: dict[str, torch.Tensor] = {}
            for key in routed:
                with stage("capture"):  # one layer's Gram in memory at a time (d_in² float64 each)
                    stats = parked_stats.pop(key).load() if key in parked_stats else captured.pop(key)
                image_means[key] = stats.image_means
                with stage("experts"):
                    residual = as_matrix(finetuned.state[key]).float() - as_matrix(backbone[key]).float()
                    expert = residual_expert(residual, stats.gram, stats.num_tokens, options.rank)
                    parked[key].append(spill.park(_ExpertFactors(expert.up, expert.down)))
                    needed = (
                        rank_for_energy(expert.retained, options.rank_energy)
                        if options.rank_energy is not None
                        else expert.up.shape[1]
                    )
                    layer_ranks[key] = max(layer_ranks[key], needed)
                del stats, residual
            with stage("prototypes"):
                prototypes.add(t, image_means)
            del finetuned
            release_free_memory()
        with stage("experts"):
            factors = {key: _stacked(items, layer_ranks[key]) for key, items in parked.items()}
    timings["experts"] = time.perf_counter() - start

    heads = [task.head.float() for task in tasks]
    start = time.perf_counter()
    with stage("prototypes"):
        if options.prototype_source == "runtime":
            # Routed with the cosine router's unit prototypes of pass 2; only the forced task's experts act.
            pass_two = {key: Experts(up, down, prototypes.prototypes[key]) for key, (up, down) in factors.items()}
            experts = _runtime_prototypes(pretrained.arch, backbone, pass_two, heads, tasks, options)
        else:
            experts = prototypes.finish(factors)
    timings["prototypes"] = time.perf_counter() - start

    build_record = {
        "method": options.method,
        "method_options": method.options.model_dump(),
        "alpha": alpha,
        "alpha_history": history,
        "rank": options.rank,
        "rank_energy": options.rank_energy,
        "routed_kinds": list(options.routed_kinds),
        "prototype_source": options.prototype_source,
        "prototypes_per_task": options.prototypes_per_task,
        "router": options.router,
        "router_shrinkage": options.router_shrinkage,
    }
    return Artifact(
        arch=pretrained.arch,
        tasks=[TaskInfo(task.name, list(task.classes)) for task in tasks],
        backbone=backbone,
        experts=experts,
        heads=heads,
        build=build_record,
        timings=timings,
    )


def method_options(options: BuildOptions) -> pydantic.BaseModel:
    """The typed options of the backbone method, validated from ``options.method_options``."""
    return get_method(options.method).parse_options(options.method_options)
