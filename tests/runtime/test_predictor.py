from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from esmpp.artifact import save_artifact
from esmpp.errors import ConfigError, EsmppError, ImageError
from esmpp.runtime.predictor import Predictor
from tests.conftest import random_artifact


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
    small, large = predictor.predict(images, batch_size=3), predictor.predict(images, batch_size=64)
    # Tasks and labels are the same; scores agree to rounding (BLAS blocks a batch of 3 and of 7 differently).
    assert [(p.task, p.label) for p in small] == [(p.task, p.label) for p in large]
    np.testing.assert_allclose([p.score for p in small], [p.score for p in large], rtol=1e-6)


def test_single_image_and_errors(predictor):
    assert len(predictor.predict(_images(1)[0])) == 1
    with pytest.raises(ConfigError, match="unknown task 'cars'"):
        predictor.predict(_images(1), task="cars")
    with pytest.raises(EsmppError, match="no images"):
        predictor.predict([])


def test_an_unusable_image_is_named_by_its_place_among_all_the_images(predictor):
    images = [*_images(3), np.full((16, 16), 2.0)]  # float pixels out of [0, 1]
    with pytest.raises(ImageError, match=r"^image 3: float pixels"):
        predictor.predict(images, batch_size=2)


def test_a_boolean_is_not_a_task_index(predictor):
    with pytest.raises(ConfigError, match=r"unknown task True; .* \(a name, or an index from 0 to 2\)"):
        predictor.predict(_images(1), task=True)


def test_a_numpy_integer_is_a_task_index(predictor):
    """np.int64(1), as from np.argmax or an array of task ids, was refused as an unknown task."""
    (prediction,) = predictor.predict(_images(1), task=np.int64(1))
    assert prediction.task == "task1" and not prediction.routed


@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, True, "8", None])
def test_a_batch_size_that_is_not_a_whole_number_of_at_least_one_is_refused(predictor, batch_size):
    """-1 returned [] for 5 images, 0 raised range()'s ValueError, 2.5 a TypeError."""
    with pytest.raises(ConfigError, match=rf"^batch_size {batch_size!r} is not a whole number ≥ 1 \(images per"):
        predictor.predict(_images(5), batch_size=batch_size)
    assert len(predictor.predict(_images(5), batch_size=np.int64(2))) == 5


def test_images_may_come_from_any_iterable(predictor):
    """A generator was taken for one image: "image 0: unsupported image input"."""
    images = _images(3)
    expected = predictor.predict(images)
    assert predictor.predict(image for image in images) == expected
    # Against the same batching: another batch size changes the GEMMs' blocking, and scores in the 8th digit.
    assert predictor.predict(iter(images), batch_size=2) == predictor.predict(images, batch_size=2)
    assert predictor.predict(np.stack(images)[0]) == expected[:1]  # an array is one image, not rows of pixels


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "Soft"}, r"routing mode 'Soft' is not one of \['hard', 'soft'\]"),
        ({"mode": "top1"}, r"routing mode 'top1' is not one of \['hard', 'soft'\]"),
        ({"mode": "soft", "top_k": 0}, r"top_k 0 is not a whole number ≥ 1"),
        ({"mode": "soft", "top_k": -1}, r"top_k -1 is not a whole number ≥ 1"),
        ({"mode": "soft", "top_k": True}, r"top_k True is not a whole number ≥ 1"),
        ({"mode": "soft", "temperature": 0.0}, r"temperature 0.0 is not a positive finite number"),
        ({"mode": "soft", "temperature": -1.0}, r"temperature -1.0 is not a positive finite number"),
        ({"mode": "soft", "temperature": float("nan")}, r"temperature nan is not a positive finite number"),
        ({"route_once": "no"}, r"route_once 'no' is not True or False"),
    ],
    ids=["Soft", "top1", "top_k 0", "top_k -1", "top_k True", "temperature 0", "temperature -1", "nan", "route_once"],
)
def test_invalid_routing_options_are_refused_at_construction(artifact, options, message):
    with pytest.raises(ConfigError, match=message):
        Predictor(artifact, **options)


def test_soft_routing_mixes_at_most_every_task(artifact):
    with pytest.raises(ConfigError, match=r"top_k 4 is more than the artifact's 3 tasks; soft routing mixes 1 to 3"):
        Predictor(artifact, mode="soft", top_k=4)
    every_task = Predictor(artifact, mode="soft", top_k=3).predict(_images(2))
    assert all(0 < p.score <= 1 for p in every_task)


def test_soft_routing_by_default_on_a_one_task_artifact_mixes_its_one_expert():
    """The default top_k (2) was refused as "more than the artifact's 1 tasks", though nobody gave it."""
    artifact = random_artifact(num_tasks=1)
    soft = Predictor(artifact, mode="soft").predict(_images(2))
    assert [p.task for p in soft] == ["task0", "task0"]
    assert [p.label for p in soft] == [p.label for p in Predictor(artifact).predict(_images(2))]
    with pytest.raises(ConfigError, match=r"top_k 2 is more than the artifact's 1 tasks; soft routing mixes 1 to 1"):
        Predictor(artifact, mode="soft", top_k=2)


def test_concurrent_predictions_equal_sequential_ones(predictor):
    requests = [_images(3, seed) for seed in range(16)]
    sequential = [predictor.predict(images) for images in requests]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(predictor.predict, requests))
    assert concurrent == sequential


def _rss_mib() -> float:
    """Resident memory of this process now (Linux /proc), in MiB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_many_threads_serve_many_requests_like_one_thread_in_flat_memory(predictor):
    threads, per_thread, rounds = 8, 25, 4
    tasks = [None, "task0", 2]  # routed, forced by name, forced by index
    requests = [(_images(1 + seed % 3, seed), tasks[seed % 3]) for seed in range(threads * per_thread)]

    def serve(request):
        images, task = request
        return predictor.predict(images, task=task, return_routes=task is None)

    sequential = [serve(request) for request in requests]
    memory = []
    for _ in range(rounds):
        with ThreadPoolExecutor(max_workers=threads) as pool:
            assert list(pool.map(serve, requests)) == sequential
        memory.append(_rss_mib())
    served = rounds * len(requests)
    print(f"\n{served} concurrent requests on {threads} threads; RSS per round (MiB): {[round(m) for m in memory]}")
    assert memory[-1] - memory[0] < 16  # after the first round's warm-up: no growth per request
