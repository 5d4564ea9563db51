import torch

from esmpp.merging import merge_task_vectors


def test_single_task_gives_its_task_vector_back():
    delta = torch.randn(4, 3)
    torch.testing.assert_close(merge_task_vectors("averaging", {"w": [delta]})["w"], delta)


def test_mean_of_task_vectors():
    deltas = [torch.randn(5) for _ in range(4)]
    merged = merge_task_vectors("averaging", {"b": deltas})["b"]
    torch.testing.assert_close(merged, torch.stack(deltas).mean(0))


def test_identical_tasks_give_the_shared_task_vector():
    delta = torch.randn(3, 2, 2)
    torch.testing.assert_close(merge_task_vectors("averaging", {"w": [delta] * 3})["w"], delta)
