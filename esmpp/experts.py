"""ESM++ experts, prototypes and routers — pure functions on tensors.

An expert is the rank-r essential-subspace truncation of a task's residual ``R_t = W_t − W_merged`` at one
routed layer, kept factored as ``A_t B_t`` so the runtime applies it in low rank. A prototype is where the
task's tokens sit in the routed layer's input space.

A router scores an image's routing feature ``f`` (the unit-norm mean token of the layer input) against each
prototype as ``f · w + b``. The paper's cosine router uses the unit prototypes as ``w`` and no bias. The
discriminant router is linear discriminant analysis on the same features: with Σ the tasks' pooled
within-task covariance of ``f`` (shrunk towards a multiple of the identity, since a few dozen proxy images
per task cannot estimate a d × d covariance), ``w = Σ⁻¹ μ`` and ``b = −½ μᵀ Σ⁻¹ μ`` for each prototype's
mean feature μ — the log-likelihood of a Gaussian with shared covariance, up to a constant. It weighs the
feature directions that separate tasks over those in which every task's images vary, which cosine
similarity cannot do.
"""

from __future__ import annotations

from typing import NamedTuple

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from esmpp.decompose import essential_few


class ResidualExpert(NamedTuple):
    up: torch.Tensor  # A = P_r [d_out, r], float32
    down: torch.Tensor  # B = P_rᵀ R [r, d_in], float32
    retained: torch.Tensor  # [r] float64: share of the residual's activation shift kept by the first 1..r directions


def residual_expert(residual: torch.Tensor, gram: torch.Tensor, num_tokens: int, rank: int) -> ResidualExpert:
    """Rank-``rank`` ESD expert of ``residual`` [d_out, d_in] under the task's activations (Gram ``gram``
    [d_in, d_in] of ``num_tokens`` proxy tokens). ``rank`` is clipped to d_out."""
    esd = essential_few(residual, gram, num_tokens, min(rank, residual.shape[0]))
    # A residual that moves no activation keeps all of its (zero) shift with any rank.
    total = esd.total_variance
    retained = esd.eigenvalues.cumsum(0) / total if total > 0 else torch.ones_like(esd.eigenvalues)
    return ResidualExpert(esd.basis.float().contiguous(), esd.coordinates.float().contiguous(), retained)


def rank_for_energy(retained: torch.Tensor, share: float) -> int:
    """The fewest leading directions whose cumulative share ``retained`` ([r], non-decreasing, see
    :class:`ResidualExpert`) reaches ``share`` (0 < share ≤ 1); all r when none does. A relative slack of 1e-9
    lets share = 1 be reached by rounding."""
    reached = (retained >= share - 1e-9).nonzero()
    return int(reached[0]) + 1 if reached.numel() else retained.shape[0]


def routing_features(image_means: torch.Tensor) -> torch.Tensor:
    """What the runtime routes on: unit-norm mean tokens, ``image_means`` [n, d] → [n, d] float32."""
    return F.normalize(image_means.float(), dim=-1)


def within_task_scatter(image_means: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's share of the discriminant router's statistics at one layer.

    ``image_means`` [n, d] (its proxy images' mean tokens), ``prototypes`` [m, d] (unit norm) → (scatter
    [d, d] float64: Σ (f − μ)(f − μ)ᵀ over the routing features f, each around the mean μ of the features
    nearest the same prototype; component means [m, d] float32). A prototype that no feature is nearest
    keeps itself as its mean (it adds nothing to the scatter)."""
    features = routing_features(image_means).double()
    nearest = (features @ prototypes.double().T).argmax(dim=1)
    means = prototypes.double().clone()
    for j in nearest.unique():
        means[j] = features[nearest == j].mean(dim=0)
    residual = features - means[nearest]
    return residual.T @ residual, means.float()


def discriminant_router(
    scatter: torch.Tensor, num_features: int, component_means: torch.Tensor, shrinkage: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear discriminant weights of one routed layer from the tasks' pooled statistics.

    ``scatter`` [d, d]: the sum of every task's :func:`within_task_scatter`; ``num_features``: how many
    routing features it sums over; ``component_means`` [T, m, d]; ``shrinkage`` in [0, 1]: Σ = (1 − s)·S +
    s·(tr S / d)·I with S the pooled covariance. → (weights [T, m, d] = Σ⁻¹μ, bias [T, m] = −½ μᵀΣ⁻¹μ),
    float32. Without any within-task spread (S = 0, e.g. one image per prototype) Σ = I: the nearest mean."""
    T, m, d = component_means.shape
    covariance = scatter.double() / max(num_features - T * m, 1)
    level = float(covariance.trace()) / d
    if level <= 0:
        covariance, level = torch.zeros_like(covariance), 1.0
        shrinkage = 1.0
    covariance = (1 - shrinkage) * covariance + shrinkage * level * torch.eye(d, dtype=torch.float64)
    means = component_means.double().reshape(T * m, d)
    weights = torch.linalg.solve(covariance, means.T).T  # Σ is symmetric: (Σ⁻¹ μ)ᵀ = μᵀ Σ⁻¹
    bias = -0.5 * (weights * means).sum(dim=1)
    return weights.reshape(T, m, d).float(), bias.reshape(T, m).float()


def task_prototypes(image_means: torch.Tensor, count: int = 1, seed: int = 0) -> torch.Tensor:
    """Prototypes of one task at one layer from its proxy images' mean tokens ``image_means`` [n, d]
    → unit-norm [count, d], ``count`` ≤ n (a build refuses more, see :func:`esmpp.build.check_prototypes_per_task`).
    One prototype is the normalised mean of all tokens (images have equal token counts, so the mean of image
    means); several are spherical k-means centroids (faiss); ``count`` = n keeps every proxy image as a
    prototype (nearest-neighbour routing)."""
    images = image_means.shape[0]
    if count > images:
        raise ValueError(f"{count} prototypes from {images} proxy images: at most one prototype per image.")
    if count == 1:
        return F.normalize(image_means.double().mean(dim=0, keepdim=True), dim=-1).float()
    if count == images:
        return F.normalize(image_means.float(), dim=-1)
    points = np.ascontiguousarray(image_means.float().numpy())
    faiss.normalize_L2(points)
    # Proxy sets are small (32 images by default): faiss warns below 39 points per centroid, which is expected here.
    kmeans = faiss.Kmeans(
        points.shape[1], count, niter=25, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1
    )
    kmeans.train(points)
    return F.normalize(torch.from_numpy(kmeans.centroids.copy()), dim=-1)
