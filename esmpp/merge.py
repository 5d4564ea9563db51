"""Streaming merge driver: one fine-tuned checkpoint in memory at a time.

For each task the driver loads the fine-tuned encoder, captures its activation statistics on the task's
proxy images when the method needs them (block by block), hands every parameter's task vector to the
method's ``summarize`` and drops the checkpoint. The method's ``combine``/``finalize`` then give the merged
task vector; ``apply_task_vector`` scales it by α onto the pretrained weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from esmpp.allocator import release_free_memory
from esmpp.architecture import linear_keys
from esmpp.capture import ActivationStats, capture_blockwise
from esmpp.checkpoints import Encoder, check_compatible
from esmpp.errors import ConfigError
from esmpp.merging import LayerStats, MergeMethod
from esmpp.profiling import stage, staged

TRIM_AFTER_BYTES = 2**20  # merged parameters from this size on give their freed summaries back


@dataclass
class TaskSource:
    """One task of a merge: how to load its fine-tuned encoder and its proxy images (normalised
    [n, 3, H, W]), both lazily so that a build holds one task's at a time, its head [C, embed_dim] and class
    names, optional labelled validation data for choosing α, and how many proxy images ``proxy`` gives
    (``proxy_count``, n, if known without loading them: a build then checks its options against it before its
    long work; the images are counted again when they load)."""

    name: str
    load: Callable[[], Encoder]
    proxy: Callable[[], torch.Tensor]
    head: torch.Tensor | None = None
    classes: list[str] = field(default_factory=list)
    validation: tuple[torch.Tensor, torch.Tensor] | None = None
    proxy_count: int | None = None


def batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(images.split(batch_size))


def proxy_batches(task: TaskSource, batch_size: int) -> list[torch.Tensor]:
    """``task``'s proxy images, loaded now, in batches of ``batch_size`` (each [≤ batch_size, 3, H, W])."""
    images = task.proxy()
    if images.shape[0] == 0:
        raise ConfigError(f"task {task.name!r} has no proxy images: give a folder with at least one image.")
    if task.proxy_count is not None and images.shape[0] != task.proxy_count:  # the build's checks relied on it
        raise ConfigError(
            f"task {task.name!r}: its proxy gave {images.shape[0]} images, its proxy_count says {task.proxy_count}."
        )
    return batches(images, batch_size)


def layer_stats(stats: Mapping[str, ActivationStats]) -> dict[str, LayerStats]:
    """What merge methods read of captured statistics (Gram, token mean and count), key by key."""
    return {
        key: LayerStats(gram=s.gram, mean=s.mean, num_tokens=s.num_tokens, projected=s.projected)
        for key, s in stats.items()
    }


def merge_streaming(
    pretrained: Encoder,
    tasks: Sequence[TaskSource],
    method: MergeMethod,
    progress: bool = True,
    batch_size: int = 64,
    on_statistics: Callable[[int, str, ActivationStats], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The merged task vector of ``method`` over ``tasks`` (parameter name → tensor), before α.

    One fine-tuned encoder and one task's proxy images in memory at a time; for the layers of
    ``method.statistics_kinds()`` the activation statistics are captured one transformer block at a time
    and that block's linear layers are summarised before the next block runs; summaries that methods park
    go to a temporary directory. With ``method.shift_moments``, layers that narrow (d_out < d_in, the MLP's
    c_proj) get the moment of their activation shift, ``d_out × d_out``, instead of the Gram of their input,
    ``d_in × d_in``. ``on_statistics(t, key, stats)`` sees each layer's statistics of task ``t`` (index in
    ``tasks``) as they are captured, for a caller that needs them again after the merge.
    """
    summaries: dict[str, Any] = {}

    def task_vector(finetuned: Encoder, key: str) -> torch.Tensor:
        return finetuned.state[key].float() - pretrained.state[key].float()

    def summarize(finetuned: Encoder, key: str, stats: LayerStats | None) -> None:
        summaries[key] = method.summarize(key, task_vector(finetuned, key), stats, summaries.get(key))

    def shift_projection(finetuned: Encoder, key: str) -> torch.Tensor | None:
        d_out, d_in = pretrained.state[key].shape
        return task_vector(finetuned, key).double() if d_out < d_in else None

    stat_keys = linear_keys(pretrained.arch, method.statistics_kinds())

    def summarize_task(t: int, task: TaskSource) -> None:
        # A function, so that the fine-tuned weights and everything sharing them (the module, the
        # projection, the capture generator) are gone when it returns, before the next task loads.
        with stage("load"):
            finetuned = task.load()
            check_compatible(pretrained, finetuned)
        if stat_keys:
            visual = finetuned.to_module(share=True)
            projection = partial(shift_projection, finetuned) if method.shift_moments else None
            blocks = capture_blockwise(visual, proxy_batches(task, batch_size), stat_keys, projection)
            for block_stats in staged("capture", blocks):
                if on_statistics is not None:
                    with stage("capture"):  # e.g. the ESM++ build parking them: part of what capturing costs
                        for key, stats in block_stats.items():
                            on_statistics(t, key, stats)
                with stage("decompose"):
                    for key, stats in layer_stats(block_stats).items():
                        summarize(finetuned, key, stats)
                del block_stats  # before the next block's statistics exist
        with stage("decompose"):
            for key in pretrained.state.keys() - set(stat_keys):  # any order: summaries are per key
                summarize(finetuned, key, None)

    with method.spilling():
        for t, task in enumerate(tqdm(tasks, desc=f"merge {method.name}", unit="task", disable=not progress)):
            summarize_task(t, task)
            release_free_memory()
        with stage("merge"):
            # In the pretrained model's key order (finalize's scalings average over keys in that order);
            # each summary is dropped once combined, and its memory, under the merged layer, given back
            # (after the weight matrices: a bias or a norm frees too little to pay for the trim's 1-4 ms).
            merged = {}
            for key in pretrained.state:
                merged[key] = method.combine(key, summaries.pop(key))
                if merged[key].nbytes >= TRIM_AFTER_BYTES:
                    release_free_memory()
    with stage("merge"):
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
