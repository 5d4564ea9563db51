import torch
from hypothesis import given
from hypothesis import strategies as st

from esmpp.merging import merge_task_vectors
from esmpp.merging.iso_cts import split_ranks


def test_rank_split_gives_every_direction_away():
    assert split_ranks(768, 8, 0.8) == (768 - 8 * 19, 19)
    assert split_ranks(16, 3, 0.8) == (16 - 3 * 1, 1)
    assert split_ranks(4, 8, 0.8) == (4, 0)
    assert split_ranks(14, 4, 0.0) == (2, 3)  # rounding 3.5 up would leave a common rank of -2


@given(st.integers(1, 4096), st.integers(1, 64), st.floats(0, 1))
def test_rank_split_never_asks_for_more_directions_than_exist(size, num_tasks, common_fraction):
    common, per_task = split_ranks(size, num_tasks, common_fraction)
    assert common >= 0 and per_task >= 0 and common + num_tasks * per_task == size


def test_single_task_equals_iso_c():
    # With one task, common + task-specific triplets are the whole SVD of the task matrix.
    delta = torch.randn(9, 6, dtype=torch.float64)
    torch.testing.assert_close(
        merge_task_vectors("iso_cts", {"w": [delta]})["w"], merge_task_vectors("iso_c", {"w": [delta]})["w"]
    )


def test_all_common_subspace_equals_iso_c():
    deltas = [torch.randn(8, 5, dtype=torch.float64) for _ in range(3)]
    merged = merge_task_vectors("iso_cts", {"w": deltas}, options={"common_fraction": 1.0})["w"]
    torch.testing.assert_close(merged, merge_task_vectors("iso_c", {"w": deltas})["w"])


def test_weak_task_gets_its_own_directions_at_the_common_level():
    # m = 10, common_fraction 0.6 → 6 common directions + 2 per task. The strong task spans 8 directions
    # (6 common, 2 task-specific), the tiny orthogonal task its own 2. All 10 triplets are orthonormal
    # already, and isotropy sets every singular value to their mean: the weak task is lifted to it.
    basis, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    strong_values = torch.linspace(10, 3, 8, dtype=torch.float64)
    strong = basis[:, :8] @ torch.diag(strong_values) @ basis[:, :8].T
    weak = 0.01 * basis[:, 8:] @ basis[:, 8:].T
    merged = merge_task_vectors("iso_cts", {"w": [strong, weak]}, options={"common_fraction": 0.6})["w"]
    mean_value = (strong_values.sum() + 0.02) / 10
    torch.testing.assert_close(merged, mean_value * torch.eye(10, dtype=torch.float64))
