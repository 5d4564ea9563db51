import pytest
import torch

from esmpp.errors import ConfigError
from esmpp.merging import available_methods, merge_task_vectors


@pytest.mark.parametrize("method", available_methods())
def test_every_method_merges_a_tiny_vit_deterministically(method, tiny_task_vectors):
    deltas, stats = tiny_task_vectors(3)
    merged = merge_task_vectors(method, deltas, stats)
    again = merge_task_vectors(method, deltas, stats)
    assert merged.keys() == deltas.keys()
    for key, task_deltas in deltas.items():
        assert merged[key].shape == task_deltas[0].shape, key
        assert merged[key].dtype == torch.float32, key
        assert torch.isfinite(merged[key]).all(), key
        assert merged[key].abs().sum() > 0, key
        assert torch.equal(merged[key], again[key]), key


def test_task_counts_must_agree(tiny_task_vectors):
    deltas, _ = tiny_task_vectors(2)
    deltas["proj"] = deltas["proj"][:1]
    with pytest.raises(ConfigError, match="task counts"):
        merge_task_vectors("averaging", deltas)


def test_methods_needing_statistics_refuse_to_run_without(tiny_task_vectors):
    deltas, _ = tiny_task_vectors(2)
    with pytest.raises(ConfigError, match="activation statistics"):
        merge_task_vectors("esm", deltas)
