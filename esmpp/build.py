"""The ESM++ builder: pretrained + T fine-tuned encoders → one routed artifact.

Stages (each timed, each streaming over tasks with one fine-tuned checkpoint in memory):
1. merge: the backbone's task vector with a static method (ESM by default);
2. alpha: α given, or chosen on the tasks' labelled validation data (golden-section on [0, 2]);
3. experts: per task, the rank-r ESD expert of the residual W_t − W_merged at each routed layer under the
   task's own activations, and the task's prototypes (mean routed-layer input on its proxy images);
4. prototypes (option ``prototype_source="runtime"``): prototypes re-measured in the routed model itself
   with the task forced — the feature space the router actually sees;
5. the artifact, written atomically.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from esmpp.architecture import LINEAR_KINDS, linear_keys
from esmpp.artifact import Artifact, TaskInfo
from esmpp.capture import capture_statistics
from esmpp.checkpoints import Encoder, check_compatible
from esmpp.errors import ConfigError
from esmpp.experts import residual_expert, task_prototypes
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


@dataclass
class BuildOptions:
    """Every choice of the ESM++ build, with the authors' defaults."""

    method: str = "esm"
    method_options: dict[str, Any] = field(default_factory=dict)
    alpha: float | None = None  # None: search on validation data (falls back to 1.0 without any)
    rank: int = 32
    routed_kinds: tuple[str, ...] = ("qkv", "fc")
    prototype_source: Literal["finetuned", "runtime"] = "finetuned"
    prototypes_per_task: int = 1
    batch_size: int = 64
    alpha_evaluations: int = 10

    def check(self) -> None:
        unknown = [kind for kind in self.routed_kinds if kind not in LINEAR_KINDS]
        if unknown or not self.routed_kinds:
            raise ConfigError(f"routed kinds {list(self.routed_kinds)}: choose from {list(LINEAR_KINDS)}.")
        if self.rank < 1:
            raise ConfigError(f"rank must be ≥ 1, got {self.rank}.")
        if self.prototypes_per_task < 1:
            raise ConfigError(f"prototypes_per_task must be ≥ 1, got {self.prototypes_per_task}.")
        if self.prototype_source not in ("finetuned", "runtime"):
            raise ConfigError(f"prototype_source must be 'finetuned' or 'runtime', got {self.prototype_source!r}.")


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
    """α maximising the mean validation accuracy of θ0 + α·τ (golden-section on [0, 2])."""
    visual = pretrained.to_module()
    bar = tqdm(total=evaluations, desc="choose alpha", unit="eval", disable=not progress)

    def score(alpha: float) -> float:
        visual.load_state_dict(apply_task_vector(pretrained.state, task_vector, alpha))
        bar.update()
        return validation_accuracy(visual, tasks)

    try:
        return golden_section_search(score, 0.0, 2.0, evaluations)
    finally:
        bar.close()


def _runtime_prototypes(
    arch, backbone, experts: dict[str, Experts], heads, tasks: Sequence[TaskSource], options: BuildOptions
) -> dict[str, Experts]:
    model = RoutedEncoder(arch, backbone, experts, heads)
    per_layer: dict[str, list[torch.Tensor]] = {key: [] for key in experts}
    for t, task in enumerate(tasks):

        def forced(images: torch.Tensor, t: int = t) -> None:
            model(images, torch.full((images.shape[0],), t, dtype=torch.long))

        stats = capture_statistics(
            model.visual, proxy_batches(task, options.batch_size), experts, with_gram=False, run=forced
        )
        for key in experts:
            per_layer[key].append(task_prototypes(stats[key].image_means, options.prototypes_per_task))
    return {key: Experts(layer.up, layer.down, torch.stack(per_layer[key])) for key, layer in experts.items()}


def build_artifact(
    pretrained: Encoder,
    tasks: Sequence[TaskSource],
    options: BuildOptions | None = None,
    progress: bool = True,
) -> Artifact:
    """Run the ESM++ build (see module docstring) and return the artifact (not yet written)."""
    options = options or BuildOptions()
    options.check()
    if not tasks:
        raise ConfigError("no tasks to merge: give at least one task with a fine-tuned checkpoint.")
    for task in tasks:
        if task.head is None:
            raise ConfigError(f"task {task.name!r} has no head: give a head file or class names.")
    timings: dict[str, float] = {}

    start = time.perf_counter()
    method = get_method(options.method)(options.method_options, num_tasks=len(tasks))
    task_vector = merge_streaming(pretrained, tasks, method, progress, options.batch_size)
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
    timings["alpha"] = time.perf_counter() - start

    start = time.perf_counter()
    routed = linear_keys(pretrained.arch, options.routed_kinds)
    # Filled in place, task by task: list-then-stack would hold every expert twice at the end.
    experts = {}
    for key in routed:
        d_out, d_in = backbone[key].shape
        rank = min(options.rank, d_out)
        experts[key] = Experts(
            up=torch.empty(len(tasks), d_out, rank),
            down=torch.empty(len(tasks), rank, d_in),
            prototypes=torch.empty(len(tasks), options.prototypes_per_task, d_in),
        )
    for t, task in enumerate(tqdm(tasks, desc="experts", unit="task", disable=not progress)):
        with stage("load"):
            finetuned = task.load()
            check_compatible(pretrained, finetuned)
        with stage("capture"):
            stats = capture_statistics(finetuned.to_module(share=True), proxy_batches(task, options.batch_size), routed)
        with stage("experts"):
            for key in routed:
                residual = finetuned.state[key].float() - backbone[key].float()
                up, down = residual_expert(residual, stats[key].gram, stats[key].num_tokens, options.rank)
                experts[key].up[t], experts[key].down[t] = up, down
        with stage("prototypes"):
            for key in routed:
                experts[key].prototypes[t] = task_prototypes(stats[key].image_means, options.prototypes_per_task)
        del finetuned, stats
    timings["experts"] = time.perf_counter() - start

    heads = [task.head.float() for task in tasks]
    if options.prototype_source == "runtime":
        start = time.perf_counter()
        with stage("prototypes"):
            experts = _runtime_prototypes(pretrained.arch, backbone, experts, heads, tasks, options)
        timings["prototypes"] = time.perf_counter() - start

    build_record = {
        "method": options.method,
        "method_options": method.options.model_dump(),
        "alpha": alpha,
        "alpha_history": history,
        "rank": options.rank,
        "routed_kinds": list(options.routed_kinds),
        "prototype_source": options.prototype_source,
        "prototypes_per_task": options.prototypes_per_task,
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
