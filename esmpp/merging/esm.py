"""ESM, Essential Subspace Merging (SPEC §2), every choice an option.

Per layer of an ESD kind (qkv, fc, proj by default), with rank budget ``k = ⌊rank_fraction·d_out/T⌋``:

1. ESD of each task: ``P^t`` (``d_out × d_out``), eigenvalues ``λ^t``, coordinates ``C^t = P^tᵀ ΔW_t``;
   only the top-k part is kept (the streaming summary), plus ``‖ΔW_t‖_F``.
2. inter-task polarized scaling ``γ_t = (‖ΔW_t‖_F / mean_s ‖ΔW_s‖_F)^p`` multiplies ``C_k^t``;
3. eigenvalue weighting ``e = (λ_k / mean λ_k)^0.15`` renormalised to mean 1 multiplies the kept
   columns of ``P_k^t`` and rows of ``C_k^t``;
4. concatenation ``P = [P_k^1 … P_k^T]`` (``d_out × Tk``), ``C = [C_k^1; …; C_k^T]`` (``Tk × d_in``);
5. inter-dimension scaling of the columns of C, ``β_j = (‖c_j‖ / mean_i ‖c_i‖)^p``;
6. isotropic orthogonalisation ``ΔM = 2 · iso(P) · iso(C)``, iso(A) = mean(σ_A)·polar(A);
7. (``finalize``) inter-layer scaling over all layers of a kind, ``δ_l = (‖ΔM_l‖ / mean ‖ΔM_m‖)^p``.

"Polarized" scalings (p = 2) amplify high-norm components and damp low-norm ones. Other 2-D weights
(out_proj, positional_embedding, proj) follow TSV-M, other parameters get the mean task vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pydantic
import torch
from torch import Tensor

from esmpp.architecture import linear_kind
from esmpp.decompose import essential_top, essential_top_from_shift, isotropic_product, polar_factor
from esmpp.errors import ConfigError
from esmpp.merging.base import LayerStats, MergeMethod, MethodOptions, append_summary
from esmpp.merging.registry import register_method
from esmpp.merging.tsv import TaskSingularVectorsMerging
from esmpp.spill import unpark

LinearKind = Literal["qkv", "out", "fc", "proj"]


class EsmOptions(MethodOptions):
    esd_kinds: tuple[LinearKind, ...] = pydantic.Field(
        ("qkv", "fc", "proj"), description="Linear kinds merged with ESD; other 2-D weights use TSV-M."
    )
    rank_fraction: float = pydantic.Field(
        1.0,
        gt=0,
        le=1,
        description="Share of d_out the tasks split: k = ⌊rank_fraction·d_out/T⌋ per task. Below 1 the build is "
        "faster (step 6 orthogonalises d_out × rank_fraction·d_out matrices; 0.5: on ViT-B/32 at T = 8, ESM "
        "about 1.8× and ESM++ about 1.5× faster).",
    )
    centered: bool = pydantic.Field(False, description="PCA of the centred activation shift (paper wording).")
    polarized_task_scaling: bool = pydantic.Field(True, description="Step 2: γ_t from ‖ΔW_t‖_F.")
    eigenvalue_exponent: float = pydantic.Field(0.15, ge=0, description="Step 3 exponent; 0 disables.")
    dimension_scaling: bool = pydantic.Field(True, description="Step 5: β_j on the columns of C.")
    orthogonalization: Literal["isotropic", "keep_row_norms", "none"] = pydantic.Field(
        "isotropic",
        description="Step 6: 'isotropic' iso(P)·iso(C); 'keep_row_norms' polar(P)·diag(‖C_i‖)·polar(Ĉ) "
        "as TSV-M keeps singular values; 'none' P·C.",
    )
    scale_factor: float = pydantic.Field(2.0, gt=0, description="Step 6 factor on ΔM.")
    layer_scaling: bool = pydantic.Field(True, description="Step 7: δ_l over the layers of each kind.")
    polarization_exponent: float = pydantic.Field(2.0, ge=0, description="p in γ, β and δ.")


@dataclass(frozen=True)
class EssentialSummary:
    """What ESM keeps of one task at one ESD layer: ``basis`` P_k (``d_out × k``), ``eigenvalues`` λ_k
    (``k``), ``coordinates`` C_k (``k × d_in``) and ``delta_norm`` ‖ΔW_t‖_F; never ΔW_t itself."""

    basis: Tensor
    eigenvalues: Tensor
    coordinates: Tensor
    delta_norm: float


def essential_summary(delta: Tensor, stats: LayerStats, rank: int, centered: bool) -> EssentialSummary:
    """Step 1 for one task: top-``rank`` ESD of ``delta`` (``d_out × d_in``), stored in at least float32;
    from the Gram of the layer's input, or from the moment of its activation shift (``stats.projected``)."""
    top = essential_top_from_shift if stats.projected else essential_top
    esd = top(delta, stats.gram, stats.num_tokens, rank, centered, stats.mean)
    dtype = torch.promote_types(delta.dtype, torch.float32)
    return EssentialSummary(
        basis=esd.basis.to(dtype),
        eigenvalues=esd.eigenvalues.to(dtype),
        coordinates=esd.coordinates.to(dtype),
        delta_norm=float(torch.linalg.norm(delta.to(torch.float64))),
    )


def polarized_weights(norms: Tensor, exponent: float) -> Tensor:
    """(norm / mean norm)^exponent for each entry of ``norms``; ones when all norms are zero."""
    mean = norms.mean()
    if mean == 0:
        return torch.ones_like(norms)
    return (norms / mean) ** exponent


def eigenvalue_weights(eigenvalues: Tensor, exponent: float) -> Tensor:
    """Step 3: (λ / mean λ)^exponent renormalised to mean 1 (``k`` → ``k``).

    A task with no activation shift at this layer (every λ = 0: ΔW_t = 0 there, e.g. a block frozen during
    fine-tuning) has only an arbitrary basis, and (λ / mean λ) is 0/0: its directions get weight 0, the one
    choice that does not depend on that basis (with weight 1 they would still steer step 6's polar factor).
    """
    if not bool((eigenvalues > 0).any()):
        return torch.zeros_like(eigenvalues)
    weights = polarized_weights(eigenvalues, exponent)
    return weights / weights.mean()


def esm_merge(summaries: list[EssentialSummary], options: EsmOptions) -> Tensor:
    """Steps 2–6 on the tasks' summaries of one layer → ΔM (``d_out × d_in``).

    Returned in the summaries' dtype and device. The orthogonalisation of P (``d_out × Tk``) and C
    (``Tk × d_in``) dominates the cost of ESM; :func:`isotropic_product` does it through float64 Grams (or
    float64 SVDs when P is too ill-conditioned for that), and the rest needs no float64.
    """
    exponent = options.polarization_exponent
    like = summaries[0].basis
    norms = torch.tensor([s.delta_norm for s in summaries], dtype=like.dtype, device=like.device)
    task_scales = polarized_weights(norms, exponent) if options.polarized_task_scaling else torch.ones_like(norms)
    weights = [eigenvalue_weights(s.eigenvalues, options.eigenvalue_exponent) for s in summaries]
    # Concatenated first and scaled in place: one copy of P and C alive besides the summaries, not two.
    basis = torch.cat([s.basis for s in summaries], dim=1).mul_(torch.cat(weights))
    row_scales = torch.cat([scale * w for scale, w in zip(task_scales, weights, strict=True)])
    coords = torch.cat([s.coordinates for s in summaries], dim=0).mul_(row_scales[:, None])
    if options.dimension_scaling:
        coords = coords * polarized_weights(coords.norm(dim=0), exponent)
    if options.orthogonalization == "isotropic":
        merged = _isotropic_product_of_used_directions(basis, coords)
    elif options.orthogonalization == "keep_row_norms":
        row_norms = _row_norms_without_rounding_noise(coords)
        unit_rows = torch.where(row_norms[:, None] > 0, coords / row_norms[:, None], 0.0)
        merged = polar_factor(basis) @ (row_norms[:, None] * polar_factor(unit_rows))
    else:
        merged = basis @ coords
    return options.scale_factor * merged


def _isotropic_product_of_used_directions(basis: Tensor, coords: Tensor) -> Tensor:
    """Step 6, iso(P)·iso(C) for P (``d_out × m``) and C (``m × d_in``), without P's zero columns.

    A task whose rank budget k exceeds what ΔW_t can fill (k > d_in, e.g. T = 2 on ViT-B's c_fc) has
    directions of eigenvalue 0, hence weight 0: zero columns of P and zero rows of C. They contribute
    nothing to the product (polar(C) is zero on zero rows when C has full column rank) except zero singular
    values to the means, but would make P rank-deficient, which sends step 6 to the slower SVD on the full
    d_out × m matrix. So they are left out, and the means rescaled to count them as the definition does.
    """
    used = basis.norm(dim=0) > 0
    kept = int(used.sum())
    if kept == used.numel():
        return isotropic_product(basis, coords)
    (d_out, directions), d_in = basis.shape, coords.shape[1]
    # iso(A) = mean(σ_A)·polar(A) with min(rows, cols) singular values: the zeros count in the definition.
    mean_correction = (min(d_out, kept) / min(d_out, directions)) * (min(kept, d_in) / min(directions, d_in))
    return mean_correction * isotropic_product(basis[:, used], coords[used])


def _row_norms_without_rounding_noise(matrix: Tensor) -> Tensor:
    """Row norms of ``matrix`` (``r × n``), zero for rows at rounding level (coordinates on directions
    outside the range of ΔW): normalising those would turn noise into unit rows."""
    norms = matrix.norm(dim=1)
    tolerance = norms.max() * max(matrix.shape) * torch.finfo(matrix.dtype).eps
    return torch.where(norms > tolerance, norms, torch.zeros_like(norms))


def inter_layer_scaling(merged: dict[str, Tensor], exponent: float) -> dict[str, Tensor]:
    """Step 7: scale each linear layer's ΔM by (‖ΔM_l‖ / mean ‖ΔM‖ over layers of its kind)^exponent."""
    by_kind: dict[str, list[str]] = {}
    for key in merged:
        kind = linear_kind(key)
        if kind is not None:
            by_kind.setdefault(kind, []).append(key)
    scaled = dict(merged)
    for keys in by_kind.values():
        norms = torch.stack([torch.linalg.norm(merged[k].to(torch.float64)) for k in keys])
        for key, scale in zip(keys, polarized_weights(norms, exponent), strict=True):
            scaled[key] = (merged[key] * scale).to(merged[key].dtype)
    return scaled


@register_method
class EssentialSubspaceMerging(MergeMethod):
    name = "esm"
    needs_grams = True
    shift_moments = True
    Options = EsmOptions

    def __init__(self, options: Any, num_tasks: int) -> None:
        super().__init__(options, num_tasks)
        # Keys outside the ESD kinds are merged exactly as TSV-M merges them.
        self._tsv = TaskSingularVectorsMerging(None, num_tasks)

    def statistics_kinds(self) -> tuple[str, ...]:
        return self.options.esd_kinds  # out_proj follows TSV-M by default: capturing its Gram would be wasted

    def _uses_esd(self, key: str) -> bool:
        return linear_kind(key) in self.options.esd_kinds

    def summarize(self, key: str, delta: Tensor, stats: LayerStats | None, previous: Any | None) -> Any:
        if not self._uses_esd(key):
            return self._tsv.summarize(key, delta, stats, previous)
        if stats is None:
            raise ConfigError(
                f"ESM decomposes {key!r} with ESD and needs its activation statistics (the Gram of the layer "
                "input over the proxy tokens of the fine-tuned model). Capture them for this layer, or leave "
                f"its kind out of the 'esd_kinds' option (now {list(self.options.esd_kinds)})."
            )
        rank = max(1, int(self.options.rank_fraction * delta.shape[0] / self.num_tasks))
        # Parked: T tasks' subspaces of every layer are what grows with T (≈ d_out·(d_out + d_in) per layer).
        return append_summary(previous, self.park(essential_summary(delta, stats, rank, self.options.centered)))

    def combine(self, key: str, summary: Any) -> Tensor:
        if not self._uses_esd(key):
            return self._tsv.combine(key, summary)
        return esm_merge([unpark(item) for item in summary], self.options)

    def finalize(self, merged: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.options.layer_scaling:
            return merged
        return inter_layer_scaling(merged, self.options.polarization_exponent)
