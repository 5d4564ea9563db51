from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from esmpp.artifact import save_artifact
from esmpp.errors import ConfigError, EsmppError
from esmpp.runtime.predictor import Predictor


@pytest.fixture
def predictor(tmp_path, artifact):
    return Predictor.load(save_artifact(artifact, tmp_path / "art"))


def _images(count, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, (count, 16, 16, 3), dtype=np.uint8))


def test_routed_and_given_task_predictions(predictor):
    images = _images(5)
    routed = predictor.predict(images, return_routes=True)
    assert len(routed) == 5 and all(p.routed for p in routed)
    for p in routed:
        assert p.task in predictor.task_names
        assert p.label in predictor.artifact.tasks[predictor.task_names.index(p.task)].classes
        assert 0 < p.score <= 1
        assert len(p.routes) == len(predictor.artifact.experts)
    given = predictor.predict(images, task="task1")
    assert all(p.task == "task1" and not p.routed and p.routes is None for p in given)


def test_batching_does_not_change_results(predictor):
    images = _images(7)
    assert predictor.predict(images, batch_size=3) == predictor.predict(images, batch_size=64)


def test_single_image_and_errors(predictor):
    assert len(predictor.predict(_images(1)[0])) == 1
    with pytest.raises(ConfigError, match="unknown task 'cars'"):
        predictor.predict(_images(1), task="cars")
    with pytest.raises(EsmppError, match="no images"):
        predictor.predict([])


def test_concurrent_predictions_equal_sequential_ones(predictor):
    requests = [_images(3, seed) for seed in range(16)]
    sequential = [predictor.predict(images) for images in requests]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(predictor.predict, requests))
    assert concurrent == sequential
