"""Iso-C, isotropic merging in the common subspace (Marczak et al., 2025).

The summed task matrix keeps its singular vectors but all its singular values are replaced by their
mean, which flattens the spectrum so that tasks with weak directions are not drowned by dominant ones.
Parameters that are not 2-D get the mean task vector.
"""

from __future__ import annotations

from torch import Tensor

from esmpp.decompose import isotropic_factor
from esmpp.merging.base import LayerStats, MergeMethod, TaskSum, add_to_sum
from esmpp.merging.registry import register_method


@register_method
class IsoC(MergeMethod):
    name = "iso_c"

    def summarize(self, key: str, delta: Tensor, stats: LayerStats | None, previous: TaskSum | None) -> TaskSum:
        return add_to_sum(previous, delta)

    def combine(self, key: str, summary: TaskSum) -> Tensor:
        if summary.total.ndim != 2:
            return summary.mean
        return isotropic_factor(summary.total)
