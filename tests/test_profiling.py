import time

import torch

from esmpp.profiling import recording, resident_bytes, stage, staged


def test_stages_without_a_recording_do_nothing():
    with stage("load"):
        value = 1
    assert value == 1


def test_time_goes_to_the_innermost_stage():
    with recording() as profile:
        with stage("outer"):
            time.sleep(0.05)
            with stage("inner"):
                time.sleep(0.1)
        with stage("inner"):
            time.sleep(0.05)
    assert 0.14 <= profile.seconds["inner"] < 0.5
    assert 0.04 <= profile.seconds["outer"] < 0.1  # exclusive of the inner stage
    assert set(profile.seconds) == {"other", "outer", "inner"}


def test_peak_memory_is_per_stage():
    size = 256 * 2**20
    with recording() as profile:
        with stage("small"):
            torch.zeros(1)
        with stage("big"):
            block = torch.ones(size // 4)  # float32: size bytes, touched
            del block
        with stage("after"):
            torch.zeros(1)
    assert profile.peak_bytes["big"] >= profile.peak_bytes["small"] + 0.9 * size
    if profile.exact_peaks:  # the kernel reset the high-water mark after "big"
        assert profile.peak_bytes["after"] < profile.peak_bytes["big"] - 0.5 * size
    assert resident_bytes() > 0


def test_staged_items_are_produced_inside_their_stage():
    size = 128 * 2**20

    def produce():
        for item in range(2):
            block = torch.ones(size // 4)  # the producing work: a peak of size bytes
            del block
            yield item

    consumed = []
    with recording() as profile:
        with stage("before"):
            torch.zeros(1)
        for item in staged("produce", produce()):
            with stage("consume"):
                consumed.append(item)
    assert consumed == [0, 1] and set(profile.seconds) == {"other", "before", "produce", "consume"}
    assert profile.peak_bytes["produce"] >= profile.peak_bytes["before"] + 0.9 * size
