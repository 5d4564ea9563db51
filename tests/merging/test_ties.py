import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esmpp.merging import merge_task_vectors
from esmpp.merging.ties import trim_to_top_magnitude


def _ties(deltas, keep_fraction=1.0):
    return merge_task_vectors("ties", {"w": deltas}, options={"keep_fraction": keep_fraction})["w"]


def test_trim_keeps_the_largest_magnitudes():
    delta = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 1.0, -0.05, 0.4, 0.6])
    trimmed = trim_to_top_magnitude(delta, 0.2)
    assert torch.equal(trimmed, torch.tensor([0.0, -5.0, 0, 2.0, 0, 0, 0, 0, 0, 0]))


def test_single_task_without_trimming_gives_its_task_vector_back():
    delta = torch.randn(5, 4)
    torch.testing.assert_close(_ties([delta]), delta)


def test_identical_tasks_give_the_trimmed_task_vector():
    delta = torch.randn(10, 10)
    expected = trim_to_top_magnitude(delta, 0.2)
    torch.testing.assert_close(_ties([delta] * 3, keep_fraction=0.2), expected)
    assert (expected != 0).sum() == 20


def test_sign_election_and_disjoint_mean():
    deltas = [torch.tensor([3.0, 1.0, -1.0, 0.0]), torch.tensor([-1.0, -2.0, -1.0, 0.0])]
    deltas.append(torch.tensor([-1.0, 0.5, -4.0, 0.0]))
    # Entry 0: sum +1 → positive wins, mean of {3}; entry 1: sum −0.5 → {−2}; entry 2: all negative;
    # entry 3: nothing survives.
    torch.testing.assert_close(_ties(deltas), torch.tensor([3.0, -2.0, -2.0, 0.0]))


@given(st.integers(1, 5), st.integers(0, 2**31 - 1), st.floats(0.05, 1.0))
@settings(deadline=None, max_examples=30)
def test_streaming_sums_match_the_trim_elect_merge_definition(num_tasks, seed, keep_fraction):
    generator = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(7, 3, generator=generator, dtype=torch.float64) for _ in range(num_tasks)]
    trimmed = torch.stack([trim_to_top_magnitude(d, keep_fraction) for d in deltas])
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.sign(trimmed) == sign
    expected = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(_ties(deltas, keep_fraction), expected)
