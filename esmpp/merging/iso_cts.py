"""Iso-CTS, isotropic merging with common and task-specific subspaces (Marczak et al., 2025).

For a 2-D parameter with m = min(d_out, d_in) directions and T tasks:

1. common subspace: the top ``m_c`` singular triplets of the summed task matrix, with
   ``s = round((m − ⌊f·m⌋)/T)`` directions left to each task and ``m_c = m − T·s``
   (``f`` = ``common_fraction``, 0.8 by default);
2. task-specific subspaces: each task matrix with the common left subspace projected out,
   ``ΔW_t − U_c U_cᵀ ΔW_t``, contributes its top ``s`` singular triplets;
3. all triplets are concatenated, the left and the right vectors orthogonalised with their polar
   factors (as TSV-M does), and every singular value set to their mean (as Iso-C does).

Needs every task matrix at combine time (the common subspace depends on all tasks), so its summary
holds the T task matrices of each 2-D parameter. Parameters that are not 2-D get the mean task vector.
"""

from __future__ import annotations

import pydantic
import torch
from torch import Tensor

from esmpp.decompose import truncated_svd
from esmpp.merging.base import LayerStats, MergeMethod, MethodOptions, TaskSum, add_to_sum, append_summary
from esmpp.merging.registry import register_method
from esmpp.merging.tsv import SingularTriplets, merge_singular_vectors, task_singular_vectors


class IsoCtsOptions(MethodOptions):
    common_fraction: float = pydantic.Field(
        0.8, ge=0, le=1, description="Share of the min(d_out, d_in) directions given to the common subspace."
    )


def split_ranks(size: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common rank, per-task rank) for ``size`` = min(d_out, d_in) directions shared by ``num_tasks``.

    The per-task rank is rounded as the authors round it, but never past ``size // num_tasks``: rounding
    up (size 14, 4 tasks, f = 0: 4 each) would ask for more directions than exist and a negative common rank.
    """
    per_task = min(round((size - int(size * common_fraction)) / num_tasks), size // num_tasks)
    return size - per_task * num_tasks, per_task


def iso_cts(deltas: list[Tensor], common_fraction: float) -> Tensor:
    """Iso-CTS merge of the task matrices ``deltas`` (each ``d_out × d_in``) → ``d_out × d_in``."""
    common_rank, per_task = split_ranks(min(deltas[0].shape), len(deltas), common_fraction)
    common = SingularTriplets(*truncated_svd(sum(deltas), common_rank))
    triplets = [common]
    if per_task > 0:
        triplets += [task_singular_vectors(d - common.u @ (common.u.T @ d), per_task) for d in deltas]
    return merge_singular_vectors(triplets, isotropic=True)


@register_method
class IsoCts(MergeMethod):
    name = "iso_cts"
    Options = IsoCtsOptions

    def summarize(
        self, key: str, delta: Tensor, stats: LayerStats | None, previous: list[Tensor] | TaskSum | None
    ) -> list[Tensor] | TaskSum:
        if delta.ndim != 2:
            return add_to_sum(previous, delta)  # type: ignore[arg-type]
        return append_summary(previous, delta.to(torch.promote_types(delta.dtype, torch.float32)))  # type: ignore[arg-type]

    def combine(self, key: str, summary: list[Tensor] | TaskSum) -> Tensor:
        if isinstance(summary, TaskSum):
            return summary.mean
        return iso_cts(summary, self.options.common_fraction)
