import dataclasses

import pytest
import torch

from esmpp.architecture import linear_key
from esmpp.errors import ConfigError
from esmpp.merging import LayerStats, merge_task_vectors
from esmpp.merging.esm import (
    EsmOptions,
    EssentialSubspaceMerging,
    EssentialSummary,
    eigenvalue_weights,
    esm_merge,
    inter_layer_scaling,
    polarized_weights,
)
from esmpp.merging.tsv import TaskSingularVectorsMerging

FC = linear_key(0, "fc")  # d_out × d_in = 64 × 16 in the tiny ViT
PLAIN = {
    "polarized_task_scaling": False,
    "eigenvalue_exponent": 0.0,
    "dimension_scaling": False,
    "orthogonalization": "none",
    "scale_factor": 1.0,
    "layer_scaling": False,
}


@pytest.fixture
def layer(make_stats):
    """Factory: random task matrices (float64) of one layer and LayerStats per task."""

    def make(num_tasks: int, seed: int = 0, d_out: int = 64, d_in: int = 16):
        generator = torch.Generator().manual_seed(seed)
        deltas = [torch.randn(d_out, d_in, generator=generator, dtype=torch.float64) for _ in range(num_tasks)]
        return deltas, [make_stats(d_in, generator) for _ in range(num_tasks)]

    return make


def _esm(deltas, stats, key=FC, **options):
    return merge_task_vectors("esm", {key: deltas}, {key: stats}, options)[key]


def test_summaries_keep_only_the_truncated_decomposition(layer):
    deltas, stats = layer(num_tasks=8)
    method = EssentialSubspaceMerging(None, num_tasks=8)
    summary = None
    for delta, layer_stats in zip(deltas, stats, strict=True):
        summary = method.summarize(FC, delta, layer_stats, summary)
    assert len(summary) == 8
    for task in summary:
        # k = ⌊64 / 8⌋ = 8: P_k is 64 × 8 and C_k is 8 × 16, together smaller than one 64 × 16 ΔW.
        assert task.basis.shape == (64, 8)
        assert task.eigenvalues.shape == (8,)
        assert task.coordinates.shape == (8, 16)
        assert task.basis.numel() + task.coordinates.numel() < 64 * 16


def test_single_task_without_scalings_reconstructs_the_task_vector(layer):
    # k = d_out and no scaling step: ΔM = P C = ΔW exactly.
    deltas, stats = layer(num_tasks=1)
    torch.testing.assert_close(_esm(deltas, stats, **PLAIN), deltas[0])


def test_polarized_task_scaling_favours_the_larger_task(layer):
    # Two tasks within their rank budget (rank 16 ≤ k = 32): without other steps ΔM = Σ γ_t ΔW_t with
    # γ_t = (‖ΔW_t‖ / mean ‖ΔW‖)².
    deltas, stats = layer(num_tasks=2)
    deltas = [deltas[0] / deltas[0].norm(), 2 * deltas[1] / deltas[1].norm()]
    merged = _esm(deltas, stats, **{**PLAIN, "polarized_task_scaling": True})
    expected = (1 / 1.5) ** 2 * deltas[0] + (2 / 1.5) ** 2 * deltas[1]
    torch.testing.assert_close(merged, expected)


def test_default_merge_is_isotropic_in_both_factors(layer):
    # T = 2, k = 32: P is 64 × 64 and C is 64 × 16 (rank 16); iso(P)·iso(C) has 16 equal singular values.
    deltas, stats = layer(num_tasks=2)
    merged = _esm(deltas, stats, layer_scaling=False)
    singular_values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(singular_values, singular_values.mean().expand(16))


@pytest.mark.parametrize(
    ("orthogonalization", "reference"), [("isotropic", "iso_c"), ("keep_row_norms", "task_arithmetic")]
)
def test_isotropic_tokens_reduce_step_6_to_its_svd_counterpart(layer, orthogonalization, reference):
    # With G = I the ESD is the SVD of ΔW, so for one task and no scaling step 'isotropic' is Iso-C and
    # 'keep_row_norms' (singular values kept) gives ΔW back.
    deltas, _ = layer(num_tasks=1)
    stats = [LayerStats(gram=torch.eye(16, dtype=torch.float64), mean=torch.zeros(16), num_tokens=16)]
    merged = _esm(deltas, stats, **{**PLAIN, "orthogonalization": orthogonalization})
    torch.testing.assert_close(merged, merge_task_vectors(reference, {FC: deltas})[FC])


def test_directions_left_empty_are_left_out_of_step_6_as_the_definition_allows(layer):
    """T = 2 on a 64 × 16 layer: k = 32 exceeds rank 16, so half of each task's directions have eigenvalue
    0 and weight 0, zero columns of P. Step 6 without them equals mean(σ)·U Vᵀ of the full P and C."""
    deltas, stats = layer(num_tasks=2)
    options = {"polarized_task_scaling": False, "dimension_scaling": False, "scale_factor": 1.0}
    method = EssentialSubspaceMerging(options, num_tasks=2)
    summaries = [method.summarize(FC, delta, task_stats, None)[0] for delta, task_stats in zip(deltas, stats)]
    weights = [eigenvalue_weights(summary.eigenvalues, 0.15) for summary in summaries]
    basis = torch.cat([summary.basis * w for summary, w in zip(summaries, weights)], dim=1)
    coords = torch.cat([w[:, None] * summary.coordinates for summary, w in zip(summaries, weights)])
    assert (basis.norm(dim=0) == 0).sum() == 32

    def isotropic(matrix: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return s.mean() * (u @ vh)

    merged = esm_merge(summaries, EsmOptions(**options))
    torch.testing.assert_close(merged, isotropic(basis) @ isotropic(coords))


def _another_basis_of_the_directions_without_shift(summary: EssentialSummary, seed: int) -> EssentialSummary:
    """``summary`` with its eigenvalue-0 directions rotated among themselves: as valid an ESD as the first."""
    null = summary.eigenvalues == 0
    count = int(null.sum())
    rotation, _ = torch.linalg.qr(torch.randn(count, count, generator=torch.Generator().manual_seed(seed)))
    basis, coords = summary.basis.clone(), summary.coordinates.clone()
    basis[:, null] = basis[:, null] @ rotation.to(basis.dtype)
    coords[null] = rotation.T.to(coords.dtype) @ coords[null]
    return dataclasses.replace(summary, basis=basis, coordinates=coords)


@pytest.mark.parametrize(("case", "null_directions"), [("rank-3 fine-tune", 13), ("frozen layer", 16)])
def test_the_merge_does_not_depend_on_the_arbitrary_basis_of_directions_without_shift(layer, case, null_directions):
    """Task 0's ΔW is rank 3 (a LoRA fine-tune), or 0 (the layer was frozen): of its k = 16 directions, 13 or
    all 16 move no activation and have an arbitrary basis. Any choice of that basis gives the same merge."""
    deltas, stats = layer(num_tasks=4)
    generator = torch.Generator().manual_seed(5)
    low_rank = torch.randn(64, 3, generator=generator, dtype=torch.float64) @ torch.randn(3, 16, dtype=torch.float64)
    deltas[0] = low_rank if case == "rank-3 fine-tune" else torch.zeros_like(deltas[0])
    method = EssentialSubspaceMerging(None, num_tasks=4)
    summaries = [method.summarize(FC, delta, task_stats, None)[0] for delta, task_stats in zip(deltas, stats)]
    assert int((summaries[0].eigenvalues == 0).sum()) == null_directions
    merged = esm_merge(summaries, EsmOptions())
    for seed in range(3):
        rotated = [_another_basis_of_the_directions_without_shift(summaries[0], seed), *summaries[1:]]
        torch.testing.assert_close(esm_merge(rotated, EsmOptions()), merged)


def test_every_variant_runs_and_differs_from_the_default(layer):
    deltas, stats = layer(num_tasks=3)
    default = _esm(deltas, stats)
    variants = [
        {"orthogonalization": "keep_row_norms"},
        {"orthogonalization": "none"},
        {"centered": True},
        {"eigenvalue_exponent": 0.0},
        {"dimension_scaling": False},
        {"polarized_task_scaling": False},
        {"rank_fraction": 0.5},
        {"scale_factor": 1.0},
    ]
    for options in variants:
        merged = _esm(deltas, stats, **options)
        assert torch.isfinite(merged).all(), options
        assert not torch.allclose(merged, default), options


def test_missing_statistics_name_the_layer_and_the_way_out(layer):
    deltas, _ = layer(num_tasks=1)
    method = EssentialSubspaceMerging(None, num_tasks=1)
    with pytest.raises(ConfigError, match=r"mlp\.c_fc\.weight.*esd_kinds"):
        method.summarize(FC, deltas[0], None, None)


def test_other_parameters_follow_tsv():
    generator = torch.Generator().manual_seed(3)
    layers = {
        linear_key(1, "out"): [torch.randn(16, 16, generator=generator) for _ in range(3)],
        "positional_embedding": [torch.randn(5, 16, generator=generator) for _ in range(3)],
        "conv1.weight": [torch.randn(16, 3, 4, 4, generator=generator) for _ in range(3)],
    }
    esm = EssentialSubspaceMerging({"layer_scaling": False}, num_tasks=3)
    tsv = TaskSingularVectorsMerging(None, num_tasks=3)
    for key, deltas in layers.items():
        esm_summary = tsv_summary = None
        for delta in deltas:
            esm_summary = esm.summarize(key, delta, None, esm_summary)
            tsv_summary = tsv.summarize(key, delta, None, tsv_summary)
        assert torch.equal(esm.combine(key, esm_summary), tsv.combine(key, tsv_summary)), key


def test_out_projection_can_join_the_esd_kinds(layer):
    out = linear_key(0, "out")
    deltas, stats = layer(num_tasks=1, d_out=16)
    merged = _esm(deltas, stats, key=out, esd_kinds=("qkv", "out", "fc", "proj"), **PLAIN)
    torch.testing.assert_close(merged, deltas[0])


def test_inter_layer_scaling_is_per_kind_and_leaves_other_parameters():
    merged = {
        linear_key(0, "fc"): torch.ones(4, 2),  # norm √8
        linear_key(1, "fc"): 3 * torch.ones(4, 2),  # norm 3√8, mean 2√8
        linear_key(0, "qkv"): torch.ones(6, 2),
        "proj": torch.ones(2, 2),
    }
    scaled = inter_layer_scaling(merged, exponent=2.0)
    torch.testing.assert_close(scaled[linear_key(0, "fc")], merged[linear_key(0, "fc")] / 4)
    torch.testing.assert_close(scaled[linear_key(1, "fc")], merged[linear_key(1, "fc")] * 9 / 4)
    torch.testing.assert_close(scaled[linear_key(0, "qkv")], merged[linear_key(0, "qkv")])
    assert scaled["proj"] is merged["proj"]


def test_polarized_and_eigenvalue_weights():
    torch.testing.assert_close(polarized_weights(torch.tensor([1.0, 3.0]), 2.0), torch.tensor([0.25, 2.25]))
    torch.testing.assert_close(polarized_weights(torch.zeros(3), 2.0), torch.ones(3))
    weights = eigenvalue_weights(torch.tensor([8.0, 4.0, 1.0, 0.0]), 0.15)
    assert weights.mean() == pytest.approx(1.0)
    assert torch.all(weights[:-1] > weights[1:])
    torch.testing.assert_close(eigenvalue_weights(torch.tensor([8.0, 4.0]), 0.0), torch.ones(2))
