"""Task arithmetic: the merged task vector is the sum of the task vectors (α scales it outside)."""

from __future__ import annotations

from torch import Tensor

from esmpp.merging.averaging import WeightAveraging
from esmpp.merging.base import TaskSum
from esmpp.merging.registry import register_method


@register_method
class TaskArithmetic(WeightAveraging):
    """Same running sum as weight averaging; only the final division by T is left out."""

    name = "task_arithmetic"

    def combine(self, key: str, summary: TaskSum) -> Tensor:
        return summary.total
