"""Streaming merge driver: one fine-tuned checkpoint in memory at a time.

For each task the driver loads the fine-tuned encoder, captures its activation statistics on the task's
proxy images when the method needs them, hands every parameter's task vector to the method's
``summarize`` and drops the checkpoint. The method's ``combine``/``finalize`` then give the merged task
vector; ``apply_task_vector`` scales it by α onto the pretrained weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from esmpp.architecture import linear_keys
from esmpp.capture import capture_statistics
from esmpp.checkpoints import Encoder, check_compatible
from esmpp.merging import LayerStats, MergeMethod
from esmpp.profiling import stage


@dataclass
class TaskSource:
    """One task of a merge: how to load its fine-tuned encoder (lazily), its proxy images
    (normalised [n, 3, H, W]), its head [C, embed_dim] and class names, and optional labelled
    validation data for choosing α."""

    name: str
    load: Callable[[], Encoder]
    proxy: torch.Tensor
    head: torch.Tensor | None = None
    classes: list[str] = field(default_factory=list)
    validation: tuple[torch.Tensor, torch.Tensor] | None = None


def batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(images.split(batch_size))


def task_statistics(
    encoder: Encoder, proxy: torch.Tensor, keys: Sequence[str], batch_size: int = 64
) -> dict[str, LayerStats]:
    """Gram statistics of ``encoder``'s linear layers ``keys`` on ``proxy`` images."""
    stats = capture_statistics(encoder.to_module(share=True), batches(proxy, batch_size), keys)
    return {key: LayerStats(gram=s.gram, mean=s.mean, num_tokens=s.num_tokens) for key, s in stats.items()}


def merge_streaming(
    pretrained: Encoder,
    tasks: Sequence[TaskSource],
    method: MergeMethod,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The merged task vector of ``method`` over ``tasks`` (parameter name → tensor), before α."""
    summaries: dict[str, Any] = {}
    stat_keys = linear_keys(pretrained.arch)
    for task in tqdm(tasks, desc=f"merge {method.name}", unit="task", disable=not progress):
        with stage("load"):
            finetuned = task.load()
            check_compatible(pretrained, finetuned)
        with stage("capture"):
            stats = task_statistics(finetuned, task.proxy, stat_keys) if method.needs_grams else {}
        with stage("decompose"):
            for key, weight in pretrained.state.items():
                delta = finetuned.state[key].float() - weight.float()
                summaries[key] = method.summarize(key, delta, stats.get(key), summaries.get(key))
        del finetuned, stats
    with stage("merge"):
        merged = {key: method.combine(key, summary) for key, summary in summaries.items()}
        return method.finalize(merged)


def apply_task_vector(
    pretrained: dict[str, torch.Tensor], task_vector: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """θ0 + α · τ, parameter by parameter (dtype of θ0 kept)."""
    return {key: (weight.float() + alpha * task_vector[key]).to(weight.dtype) for key, weight in pretrained.items()}


def golden_section_search(
    score: Callable[[float], float], low: float = 0.0, high: float = 2.0, evaluations: int = 10
) -> tuple[float, list[tuple[float, float]]]:
    """Maximise a unimodal ``score(α)`` on [low, high] with ``evaluations`` calls (golden-section, as
    the ESM authors choose α). Returns the best α seen and the (α, score) history."""
    ratio = (math.sqrt(5) - 1) / 2
    history: list[tuple[float, float]] = []

    def measured(alpha: float) -> float:
        value = score(alpha)
        history.append((alpha, value))
        return value

    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = measured(c), measured(d)
    for _ in range(max(0, evaluations - 2)):
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = measured(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = measured(d)
    best_alpha, _ = max(history, key=lambda item: (item[1], -abs(item[0] - 1.0)))
    return best_alpha, history
