"""TIES-merging: trim each task vector to its largest entries, elect a sign per entry, average the
entries that agree with it (Yadav et al., 2023).

Streaming form: the elected sign is the sign of the sum of trimmed values, and the disjoint mean only
needs the sum and count of positive and of negative trimmed values, so four running tensors per
parameter replace the T trimmed task vectors. Trimming is per parameter (the original trims over the
whole flattened model; a streaming driver sees one parameter at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import pydantic
import torch
from torch import Tensor

from esmpp.merging.base import LayerStats, MergeMethod, MethodOptions
from esmpp.merging.registry import register_method


class TiesOptions(MethodOptions):
    keep_fraction: float = pydantic.Field(0.2, gt=0, le=1, description="Share of entries kept per task.")


@dataclass(frozen=True)
class SignedSums:
    """Sums and counts of the positive and the negative trimmed entries over the tasks seen so far."""

    positive_sum: Tensor
    positive_count: Tensor
    negative_sum: Tensor
    negative_count: Tensor


def trim_to_top_magnitude(delta: Tensor, keep_fraction: float) -> Tensor:
    """``delta`` with all but its round(keep_fraction·n) (at least 1) largest-magnitude entries set to
    zero; entries tied with the threshold are kept."""
    magnitudes = delta.abs().flatten()
    keep = max(1, round(keep_fraction * magnitudes.numel()))
    threshold = torch.kthvalue(magnitudes, magnitudes.numel() - keep + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def add_signed(previous: SignedSums | None, trimmed: Tensor) -> SignedSums:
    positive, negative = trimmed.clamp(min=0), trimmed.clamp(max=0)
    current = SignedSums(positive, (trimmed > 0).to(trimmed.dtype), negative, (trimmed < 0).to(trimmed.dtype))
    if previous is None:
        return current
    return SignedSums(
        previous.positive_sum + current.positive_sum,
        previous.positive_count + current.positive_count,
        previous.negative_sum + current.negative_sum,
        previous.negative_count + current.negative_count,
    )


def disjoint_mean(sums: SignedSums) -> Tensor:
    """Per entry, the mean of the trimmed values whose sign agrees with the elected sign (the sign of
    their sum; where that sum is zero, the sign most entries of the parameter elected)."""
    elected = torch.sign(sums.positive_sum + sums.negative_sum)
    majority = torch.sign(elected.sum())
    elected = torch.where(elected == 0, majority, elected)
    agreeing_sum = torch.where(elected > 0, sums.positive_sum, sums.negative_sum)
    agreeing_count = torch.where(elected > 0, sums.positive_count, sums.negative_count)
    return agreeing_sum / agreeing_count.clamp(min=1)


@register_method
class Ties(MergeMethod):
    name = "ties"
    Options = TiesOptions

    def summarize(self, key: str, delta: Tensor, stats: LayerStats | None, previous: SignedSums | None) -> SignedSums:
        delta = delta.to(torch.promote_types(delta.dtype, torch.float32))
        return add_signed(previous, trim_to_top_magnitude(delta, self.options.keep_fraction))

    def combine(self, key: str, summary: SignedSums) -> Tensor:
        return disjoint_mean(summary)
