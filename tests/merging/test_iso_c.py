import torch

from esmpp.decompose import polar_factor
from esmpp.merging import merge_task_vectors


def test_single_task_keeps_its_singular_vectors_with_a_flat_spectrum():
    delta = torch.randn(7, 5, dtype=torch.float64)
    merged = merge_task_vectors("iso_c", {"w": [delta]})["w"]
    singular_values = torch.linalg.svdvals(delta)
    torch.testing.assert_close(torch.linalg.svdvals(merged), singular_values.mean().expand(5))
    torch.testing.assert_close(merged, singular_values.mean() * polar_factor(delta))


def test_identical_tasks_scale_with_the_task_count():
    delta = torch.randn(4, 6, dtype=torch.float64)
    single = merge_task_vectors("iso_c", {"w": [delta]})["w"]
    torch.testing.assert_close(merge_task_vectors("iso_c", {"w": [delta] * 3})["w"], 3 * single)


def test_non_matrix_parameters_get_the_mean():
    deltas = [torch.randn(5) for _ in range(2)]
    torch.testing.assert_close(merge_task_vectors("iso_c", {"b": deltas})["b"], (deltas[0] + deltas[1]) / 2)
