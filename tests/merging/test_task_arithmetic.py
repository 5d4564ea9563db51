import torch

from esmpp.merging import merge_task_vectors


def test_single_task_gives_its_task_vector_back():
    delta = torch.randn(4, 3)
    torch.testing.assert_close(merge_task_vectors("task_arithmetic", {"w": [delta]})["w"], delta)


def test_sum_of_task_vectors():
    deltas = [torch.randn(6, 2) for _ in range(3)]
    merged = merge_task_vectors("task_arithmetic", {"w": deltas})["w"]
    torch.testing.assert_close(merged, torch.stack(deltas).sum(0))


def test_half_precision_inputs_accumulate_in_float32():
    deltas = [torch.full((3,), 1000.0, dtype=torch.float16)] * 80
    merged = merge_task_vectors("task_arithmetic", {"b": deltas})["b"]
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, torch.full((3,), 80_000.0))
