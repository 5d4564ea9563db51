"""The benchmark table on a zoo: pretrained, fine-tuned, every static method and ESM++ side by side.

Every static method gets the same α protocol (golden-section on [0, 2] against the validation splits,
unless the method fixes α, as weight averaging does). ESM++ is reported three ways, with its routing accuracy:

- ``task_given``: the true task's experts (routing forced) and head — the ceiling of the experts;
- ``routed``: experts chosen by the router, the true task's head — the paper's protocol (its ESM++ figures
  route inside the encoder and evaluate each dataset with its own head);
- ``task_agnostic``: experts and head both chosen by the router — prediction without knowing the task.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from esmpp.artifact import Artifact
from esmpp.build import BuildOptions, build_artifact, choose_alpha, method_options
from esmpp.checkpoints import load_encoder
from esmpp.errors import ConfigError
from esmpp.evaluation import evaluate, head_logits
from esmpp.images import preprocess_uint8
from esmpp.merge import apply_task_vector, merge_streaming
from esmpp.merging import get_method, options_share
from esmpp.sources import zoo_sources


@torch.inference_mode()
def evaluate_routed(artifact: Artifact, zoo, split: str = "test", batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Per task of ``artifact``: ``task_given``, ``routed`` and ``task_agnostic`` accuracy (%) (see the module
    docstring) and ``routing`` (% of images whose routed task is their true task).

    Each task is measured on the zoo's split of the same name, with the artifact's head and task index for it:
    an artifact built on some of the zoo's tasks, in any order, is measured on the right data. A task the zoo
    does not have, or whose classes differ from the zoo's, is a one-line error (its labels would mean other
    classes)."""
    model = artifact.to_model()
    metrics = ("task_given", "routed", "task_agnostic", "routing")
    results: dict[str, dict[str, float]] = {metric: {} for metric in metrics}
    for t, task in enumerate(artifact.tasks):
        zoo_classes = zoo.class_names(task.name)
        if task.classes != zoo_classes:
            raise ConfigError(
                f"the artifact's task {task.name!r} has the classes {task.classes}, the zoo's {zoo_classes}: the "
                "zoo's labels do not fit its head. Evaluate the artifact on the zoo it was built from."
            )
        images, labels = zoo.split(task.name, split)
        labels = torch.as_tensor(labels)
        hits: dict[str, list[torch.Tensor]] = {metric: [] for metric in metrics}
        for start in range(0, len(images), batch_size):
            batch_labels = labels[start : start + batch_size]
            pixels = preprocess_uint8(images[start : start + batch_size], artifact.arch)
            forced = model(pixels, torch.full((pixels.shape[0],), t, dtype=torch.long))
            free = model(pixels)
            own_head = head_logits(free.embedding, artifact.heads[t])
            hits["task_given"].append(forced.logits.argmax(-1) == batch_labels)
            hits["routed"].append(own_head.argmax(-1) == batch_labels)
            hits["task_agnostic"].append((free.task == t) & (free.logits.argmax(-1) == batch_labels))
            hits["routing"].append(free.task == t)
        for metric in metrics:
            results[metric][task.name] = 100.0 * float(torch.cat(hits[metric]).float().mean())
    return results


def esmpp_label(options: BuildOptions) -> str:
    """A table label that names the ESM++ options which differ between variants."""
    kinds = "+".join(options.routed_kinds)
    rank = f"r={options.rank}" if options.rank_energy is None else f"r≤{options.rank} at {options.rank_energy:g} energy"
    backbone = f" on {method_label(options.method, options.method_options)}" if options.method_options else ""
    return f"ESM++ {rank} {kinds} {options.prototype_source}×{options.prototypes_per_task} {options.router}" + backbone


def method_label(name: str, options: Mapping[str, Any]) -> str:
    """A table label for static method ``name`` run with ``options`` (those differing from its defaults)."""
    return name + (f" ({', '.join(f'{key}={value}' for key, value in options.items())})" if options else "")


def compare_on_zoo(
    zoo,
    methods: Sequence[str],
    esmpp_options: Sequence[BuildOptions] = (BuildOptions(),),
    progress: bool = True,
    run_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the comparison; returns ``{"rows": [...], "finetuned": {...}, "esmpp": {label: {...}},
    "artifacts": {label: Artifact}}`` where each row is ``{"method", "accuracy": {task: %}, "seconds",
    "alpha"}``; each ESM++ variant gives a task-given, a routed and a task-agnostic row.

    ``run_options``: method options set for the whole run; each static method gets those it has
    (``options_share``), named in its label. ESM++ variants take their backbone's from ``BuildOptions``."""
    pretrained, sources = zoo_sources(zoo)
    rows: list[dict[str, Any]] = [
        {
            "method": "pretrained",
            "accuracy": evaluate(pretrained.to_module(), zoo),
            "seconds": 0.0,
            "alpha": 0.0,
        }
    ]
    finetuned = {
        task: evaluate(load_encoder(zoo.finetuned_path(task), arch=zoo.arch).to_module(), zoo, [task])[task]
        for task in tqdm(zoo.tasks, desc="evaluate experts", disable=not progress)
    }
    rows.append({"method": "fine-tuned", "accuracy": finetuned, "seconds": 0.0, "alpha": None})
    for name in methods:
        start = time.perf_counter()
        method_class = get_method(name)
        options = options_share(method_class, run_options or {})
        method = method_class(options, num_tasks=len(sources))
        task_vector = merge_streaming(pretrained, sources, method, progress)
        if method_class.fixed_alpha is not None:
            alpha = method_class.fixed_alpha
        else:
            alpha, _ = choose_alpha(pretrained, task_vector, sources, progress=progress)
        seconds = time.perf_counter() - start
        visual = pretrained.to_module()
        visual.load_state_dict(apply_task_vector(pretrained.state, task_vector, alpha))
        accuracy = evaluate(visual, zoo)
        rows.append({"method": method_label(name, options), "accuracy": accuracy, "seconds": seconds, "alpha": alpha})

    summaries: dict[str, Any] = {}
    artifacts = {}
    for options in esmpp_options:
        label = esmpp_label(options)
        start = time.perf_counter()
        artifact = build_artifact(pretrained, sources, options, progress)
        seconds = time.perf_counter() - start
        routed = evaluate_routed(artifact, zoo)
        alpha = artifact.build["alpha"]
        for metric, suffix in (("task_given", "task given"), ("routed", "routed"), ("task_agnostic", "task-agnostic")):
            rows.append({"method": f"{label} {suffix}", "accuracy": routed[metric], "seconds": seconds, "alpha": alpha})
        summaries[label] = {
            "routing_accuracy": routed["routing"],
            "routing_average": float(np.mean(list(routed["routing"].values()))),
            "build": artifact.build,
            "options": method_options(options).model_dump(),
        }
        artifacts[label] = artifact
    return {"rows": rows, "finetuned": finetuned, "esmpp": summaries, "artifacts": artifacts}
