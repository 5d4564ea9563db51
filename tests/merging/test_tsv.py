import torch

from esmpp.merging import merge_task_vectors
from esmpp.merging.tsv import task_rank


def _orthogonal_low_rank_tasks(num_tasks: int, rank: int, d_out: int = 12, d_in: int = 10):
    """Task matrices whose left and right singular subspaces are mutually orthogonal across tasks."""
    left, _ = torch.linalg.qr(torch.randn(d_out, num_tasks * rank, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(d_in, num_tasks * rank, dtype=torch.float64))
    blocks = [slice(t * rank, (t + 1) * rank) for t in range(num_tasks)]
    return [left[:, b] @ torch.diag(torch.rand(rank, dtype=torch.float64) + 0.5) @ right[:, b].T for b in blocks]


def test_rank_budget_splits_the_smaller_side():
    assert task_rank((768, 3072), 8) == 96
    assert task_rank((4, 3), 8) == 1


def test_single_task_full_rank_gives_its_task_vector_back():
    delta = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(merge_task_vectors("tsv", {"w": [delta]})["w"], delta)


def test_non_interfering_tasks_merge_to_their_sum():
    # Each task fits its rank budget and tasks do not overlap: nothing to orthogonalise, TSV-M is TA.
    deltas = _orthogonal_low_rank_tasks(num_tasks=3, rank=2)
    merged = merge_task_vectors("tsv", {"w": deltas}, options={"rank_per_task": 2})["w"]
    torch.testing.assert_close(merged, sum(deltas))


def test_overlapping_tasks_get_orthogonalised_directions():
    shared = torch.randn(8, 1, dtype=torch.float64) @ torch.randn(1, 6, dtype=torch.float64)
    deltas = [shared + 0.1 * torch.randn(8, 6, dtype=torch.float64) for _ in range(2)]
    merged = merge_task_vectors("tsv", {"w": deltas})["w"]
    # The merged singular values are exactly the kept per-task singular values (3 per task).
    kept = torch.cat([torch.linalg.svdvals(d)[:3] for d in deltas]).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(merged), kept)


def test_non_matrix_parameters_get_the_mean():
    deltas = [torch.randn(3, 2, 2, 2) for _ in range(3)]
    torch.testing.assert_close(merge_task_vectors("tsv", {"conv": deltas})["conv"], torch.stack(deltas).mean(0))
