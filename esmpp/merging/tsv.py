"""TSV-M, task singular vectors merging (Gargiulo et al., 2025).

Each task keeps its top ``k = ⌊min(d_out, d_in)/T⌋`` singular triplets; the concatenated left and right
singular vectors of all tasks are made orthonormal with their polar factors (this removes the overlap
between tasks, i.e. the interference) and the singular values are kept: ΔM = U⊥ diag(s) V⊥ᵀ.
Parameters that are not 2-D get the mean task vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import pydantic
import torch
from torch import Tensor

from esmpp.decompose import polar_factor, truncated_svd
from esmpp.merging.base import LayerStats, MergeMethod, MethodOptions, TaskSum, add_to_sum, append_summary
from esmpp.merging.registry import register_method


class TsvOptions(MethodOptions):
    rank_per_task: int | None = pydantic.Field(
        None, ge=1, description="Singular triplets kept per task; None: ⌊min(d_out, d_in)/T⌋ (at least 1)."
    )


@dataclass(frozen=True)
class SingularTriplets:
    """``u`` (``m × k``), ``s`` (``k``), ``vh`` (``k × n``): a rank-k factorisation u diag(s) vh."""

    u: Tensor
    s: Tensor
    vh: Tensor


def task_rank(shape: tuple[int, ...] | torch.Size, num_tasks: int) -> int:
    """TSV-M's per-task rank budget: the tasks share the min(d_out, d_in) available directions."""
    return max(1, min(shape) // num_tasks)


def task_singular_vectors(delta: Tensor, rank: int) -> SingularTriplets:
    """Top-``rank`` singular triplets of the task matrix ``delta`` (``d_out × d_in``), at least float32."""
    delta = delta.to(torch.promote_types(delta.dtype, torch.float32))
    return SingularTriplets(*truncated_svd(delta, rank))


def merge_singular_vectors(triplets: list[SingularTriplets], isotropic: bool = False) -> Tensor:
    """Concatenate the tasks' triplets and orthogonalise: U⊥ diag(s) V⊥ᵀ (``d_out × d_in``), with
    U⊥ = polar([u_1 … u_T]) and V⊥ᵀ = polar([vh_1; …; vh_T]). ``isotropic`` replaces every singular value
    by their mean (Iso-CTS)."""
    u = polar_factor(torch.cat([t.u for t in triplets], dim=1))
    vh = polar_factor(torch.cat([t.vh for t in triplets], dim=0))
    s = torch.cat([t.s for t in triplets])
    if isotropic:
        return s.mean() * (u @ vh)
    return (u * s) @ vh


@register_method
class TaskSingularVectorsMerging(MergeMethod):
    name = "tsv"
    Options = TsvOptions

    def summarize(
        self,
        key: str,
        delta: Tensor,
        stats: LayerStats | None,
        previous: list[SingularTriplets] | TaskSum | None,
    ) -> list[SingularTriplets] | TaskSum:
        if delta.ndim != 2:
            return add_to_sum(previous, delta)  # type: ignore[arg-type]
        rank = self.options.rank_per_task or task_rank(delta.shape, self.num_tasks)
        return append_summary(previous, task_singular_vectors(delta, rank))  # type: ignore[arg-type]

    def combine(self, key: str, summary: list[SingularTriplets] | TaskSum) -> Tensor:
        if isinstance(summary, TaskSum):
            return summary.mean
        return merge_singular_vectors(summary)
