"""ESM++ experts and prototypes — pure functions on tensors.

An expert is the rank-r essential-subspace truncation of a task's residual ``R_t = W_t − W_merged`` at one
routed layer, kept factored as ``A_t B_t`` so the runtime applies it in low rank. A prototype is where the
task's tokens sit in the routed layer's input space.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from esmpp.decompose import essential_top


def residual_expert(
    residual: torch.Tensor, gram: torch.Tensor, num_tokens: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` ESD expert of ``residual`` [d_out, d_in] under the task's activations (Gram ``gram``
    [d_in, d_in] of ``num_tokens`` proxy tokens) → (``up`` A = P_r [d_out, r], ``down`` B = P_rᵀ R [r, d_in]),
    float32. ``rank`` is clipped to d_out."""
    esd = essential_top(residual, gram, num_tokens, min(rank, residual.shape[0]))
    return esd.basis.float().contiguous(), esd.coordinates.float().contiguous()


def task_prototypes(image_means: torch.Tensor, count: int = 1, seed: int = 0) -> torch.Tensor:
    """Prototypes of one task at one layer from its proxy images' mean tokens ``image_means`` [n, d]
    → unit-norm [count, d]. One prototype is the normalised mean of all tokens (images have equal token
    counts, so the mean of image means); several are spherical k-means centroids (faiss); ``count`` ≥ n
    keeps every proxy image as a prototype (nearest-neighbour routing), repeated cyclically up to ``count``
    rows so that tasks with fewer proxy images stack with the others."""
    if count == 1:
        return F.normalize(image_means.double().mean(dim=0, keepdim=True), dim=-1).float()
    if image_means.shape[0] <= count:
        rows = torch.arange(count) % image_means.shape[0]
        return F.normalize(image_means.float()[rows], dim=-1)
    points = np.ascontiguousarray(image_means.float().numpy())
    faiss.normalize_L2(points)
    # Proxy sets are small (32 images): faiss warns below 39 points per centroid, which is expected here.
    kmeans = faiss.Kmeans(
        points.shape[1], count, niter=25, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1
    )
    kmeans.train(points)
    return F.normalize(torch.from_numpy(kmeans.centroids.copy()), dim=-1)
