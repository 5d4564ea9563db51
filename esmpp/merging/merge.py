"""Run a merge method over task vectors held in memory (small models, tests).

The streaming driver calls the same ``summarize``/``combine``/``finalize`` of a method; this is that
loop for inputs that already fit in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic
from torch import Tensor

from esmpp.errors import ConfigError
from esmpp.merging.base import LayerStats
from esmpp.merging.registry import get_method


def merge_task_vectors(
    method_name: str,
    deltas: Mapping[str, list[Tensor]],
    stats: Mapping[str, list[LayerStats]] | None = None,
    options: pydantic.BaseModel | Mapping[str, Any] | None = None,
) -> dict[str, Tensor]:
    """The merged task vector (α not applied) of ``deltas``: key → the T tasks' task vectors of that
    parameter. ``stats``: key → the T tasks' LayerStats, for the linear layers of methods that need them."""
    num_tasks = {len(task_deltas) for task_deltas in deltas.values()}
    if len(num_tasks) != 1:
        raise ConfigError(f"Every parameter needs one task vector per task; got task counts {sorted(num_tasks)}.")
    method = get_method(method_name)(options, num_tasks=num_tasks.pop())
    if method.needs_grams and stats is None:
        raise ConfigError(f"Merge method {method_name!r} needs activation statistics: pass 'stats'.")
    merged = {}
    for key, task_deltas in deltas.items():
        layer_stats = stats.get(key) if stats is not None else None
        summary = None
        for task, delta in enumerate(task_deltas):
            summary = method.summarize(key, delta, layer_stats[task] if layer_stats else None, summary)
        merged[key] = method.combine(key, summary)
    return method.finalize(merged)
