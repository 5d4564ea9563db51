import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esmpp.experts import (
    discriminant_router,
    rank_for_energy,
    residual_expert,
    routing_features,
    task_prototypes,
    within_task_scatter,
)
from esmpp.runtime.routing import task_scores


def test_prototypes_mean_kmeans_and_every_image():
    means = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    single = task_prototypes(means)
    torch.testing.assert_close(single[0], torch.nn.functional.normalize(means.mean(0), dim=0))
    clustered = task_prototypes(means, count=2)
    assert clustered.shape == (2, 8)
    torch.testing.assert_close(clustered.norm(dim=-1), torch.ones(2))
    every = task_prototypes(means, count=6)  # as many prototypes as images: each image is one
    torch.testing.assert_close(every, torch.nn.functional.normalize(means, dim=-1))
    with pytest.raises(ValueError, match="7 prototypes from 6 proxy images"):  # some image would be two
        task_prototypes(means, count=7)


def test_full_rank_expert_restores_the_residual():
    generator = torch.Generator().manual_seed(1)
    residual = torch.randn(5, 4, generator=generator)
    inputs = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    up, down, retained = residual_expert(residual, inputs.T @ inputs, 20, rank=5)
    torch.testing.assert_close(up @ down, residual, atol=1e-5, rtol=1e-5)
    assert retained[3] == pytest.approx(1.0)  # rank 4 = d_in already keeps the whole shift


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rank=st.integers(1, 6))
def test_retained_shares_are_the_kept_part_of_the_shift(seed, rank):
    """retained[i] is the share of Σ‖R x‖² over the proxy tokens that the expert's first i+1 directions
    reproduce, measured on the tokens themselves."""
    generator = torch.Generator().manual_seed(seed)
    residual = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    inputs = torch.randn(15, 4, generator=generator, dtype=torch.float64)
    up, down, retained = residual_expert(residual, inputs.T @ inputs, 15, rank=rank)
    shift = inputs @ residual.T
    for i in range(rank):
        kept = inputs @ (up[:, : i + 1].double() @ down[: i + 1].double()).T
        assert float(retained[i]) == pytest.approx(
            1 - float((shift - kept).square().sum() / shift.square().sum()), abs=1e-5
        )


def test_rank_for_energy_is_the_fewest_directions_reaching_the_share():
    retained = torch.tensor([0.5, 0.8, 0.95, 1.0], dtype=torch.float64)
    assert [rank_for_energy(retained, share) for share in (0.3, 0.5, 0.81, 0.95, 1.0)] == [1, 1, 3, 3, 4]
    assert rank_for_energy(retained[:2], 0.9) == 2  # not reached: every direction there is


def _two_task_features(seed: int, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean tokens of two tasks that share a large common direction (as real features do) and differ
    along a direction in which both vary little."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.tensor([5.0, 0.0, 0.0, 0.0])
    spread = torch.tensor([1.0, 0.1, 1.0, 1.0])
    tasks = [
        common + torch.tensor([0.0, shift, 0.0, 0.0]) + spread * torch.randn(n, 4, generator=generator)
        for shift in (0.3, -0.3)
    ]
    return tasks[0].double(), tasks[1].double()


def test_task_scatters_add_up_to_the_pooled_within_task_scatter():
    first, second = _two_task_features(0)
    parts = [within_task_scatter(means, task_prototypes(means)) for means in (first, second)]
    features = [routing_features(means).double() for means in (first, second)]
    pooled = sum((f - f.mean(0)).T @ (f - f.mean(0)) for f in features)
    torch.testing.assert_close(parts[0][0] + parts[1][0], pooled)
    torch.testing.assert_close(parts[0][1][0], features[0].mean(0).float())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), shrinkage=st.floats(0.0, 1.0))
def test_discriminant_scores_rank_tasks_by_mahalanobis_distance(seed, shrinkage):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(3, 2, 5, generator=generator, dtype=torch.float64)  # [T, m, d]
    factor = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    scatter = factor @ factor.T * 7
    weights, bias = discriminant_router(scatter, 19, means.float(), shrinkage)
    # the definition, in float64: Σ = (1 − s)·S/(n − T·m) + s·(tr/d)·I; score = −½ (f − μ)ᵀ Σ⁻¹ (f − μ) + const
    covariance = scatter / (19 - 6)
    covariance = (1 - shrinkage) * covariance + shrinkage * covariance.trace() / 5 * torch.eye(5, dtype=torch.float64)
    features = torch.randn(50, 5, generator=generator, dtype=torch.float64)
    differences = features[:, None, :] - means.reshape(1, 6, 5)
    distance = torch.einsum("bkd,de,bke->bk", differences, torch.linalg.inv(covariance), differences)
    scores = features @ weights.double().reshape(6, 5).T + bias.double().reshape(1, 6)
    reference = (
        -0.5 * distance + 0.5 * torch.einsum("bd,de,be->b", features, torch.linalg.inv(covariance), features)[:, None]
    )
    torch.testing.assert_close(scores, reference, atol=1e-3, rtol=1e-3)


def test_discriminant_router_separates_tasks_that_cosine_similarity_confuses():
    first, second = _two_task_features(1, n=32)
    test_first, test_second = _two_task_features(2, n=200)
    prototypes = torch.stack([task_prototypes(first), task_prototypes(second)])  # [2, 1, d]
    parts = [within_task_scatter(m, p) for m, p in zip((first, second), prototypes)]
    weights, bias = discriminant_router(parts[0][0] + parts[1][0], 64, torch.stack([parts[0][1], parts[1][1]]), 0.1)
    features = routing_features(torch.cat([test_first, test_second]))
    truth = torch.cat([torch.zeros(200), torch.ones(200)]).long()
    cosine = task_scores(features, prototypes, torch.zeros(2, 1)).argmax(1)
    discriminant = task_scores(features, weights, bias).argmax(1)
    assert (discriminant == truth).float().mean() > 0.95
    assert (cosine == truth).float().mean() < 0.8


def test_discriminant_router_without_within_task_spread_is_the_nearest_mean():
    means = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    weights, bias = discriminant_router(torch.zeros(2, 2, dtype=torch.float64), 2, means, 0.1)
    torch.testing.assert_close(weights, means)
    torch.testing.assert_close(bias, torch.full((2, 1), -0.5))
