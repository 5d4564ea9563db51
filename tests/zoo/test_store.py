from __future__ import annotations

import numpy as np
import pytest

from esmpp.errors import DatasetError
from esmpp.zoo import Zoo, get_preset


def test_splits_have_the_preset_sizes_dtypes_and_label_ranges(tiny_zoo: Zoo) -> None:
    sizes = get_preset("tiny").sizes
    size = tiny_zoo.arch.image_size
    for task in tiny_zoo.tasks:
        num_classes = len(tiny_zoo.class_names(task))
        for split in ("train", "val", "test", "proxy"):
            images, labels = tiny_zoo.split(task, split)
            assert images.dtype == np.uint8 and images.shape[1:] == (size, size, 3)
            assert labels.dtype == np.int64 and labels.shape == (len(images),)
            assert labels.min() >= 0 and labels.max() < num_classes
            assert len(images) <= getattr(sizes, split)
        assert len(tiny_zoo.split(task, "proxy")[0]) == sizes.proxy


def test_proxy_images_come_from_the_train_split(tiny_zoo: Zoo) -> None:
    for task in tiny_zoo.tasks:
        train, _ = tiny_zoo.split(task, "train")
        proxy, _ = tiny_zoo.split(task, "proxy")
        np.testing.assert_array_equal(proxy, train[: len(proxy)])


def test_heads_are_scaled_unit_class_means(tiny_zoo: Zoo) -> None:
    scale = get_preset("tiny").head_scale
    for task in tiny_zoo.tasks:
        head = tiny_zoo.head(task)
        assert head.shape == (len(tiny_zoo.class_names(task)), tiny_zoo.arch.embed_dim)
        np.testing.assert_allclose(head.norm(dim=1).numpy(), scale, rtol=1e-5)


def test_unknown_task_or_split_is_a_dataset_error(tiny_zoo: Zoo) -> None:
    with pytest.raises(DatasetError, match="not in the zoo"):
        tiny_zoo.head("imagenet")
    with pytest.raises(DatasetError, match="train, val, test, proxy"):
        tiny_zoo.split(tiny_zoo.tasks[0], "holdout")
