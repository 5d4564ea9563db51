"""Weight averaging: the merged task vector is the mean of the task vectors."""

from __future__ import annotations

from torch import Tensor

from esmpp.merging.base import LayerStats, MergeMethod, TaskSum, add_to_sum
from esmpp.merging.registry import register_method


@register_method
class WeightAveraging(MergeMethod):
    name = "averaging"
    fixed_alpha = 1.0

    def summarize(self, key: str, delta: Tensor, stats: LayerStats | None, previous: TaskSum | None) -> TaskSum:
        return add_to_sum(previous, delta)

    def combine(self, key: str, summary: TaskSum) -> Tensor:
        return summary.mean
