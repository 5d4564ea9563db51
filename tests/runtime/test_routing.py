import pytest
import torch
import torch.nn.functional as F

from esmpp.errors import ConfigError
from esmpp.runtime.model import RoutedEncoder
from esmpp.runtime.routing import RoutingControl, forced_route, hard_route, soft_route, task_scores
from tests.conftest import random_artifact


def test_hard_route_picks_the_nearest_prototype():
    prototypes = F.normalize(torch.eye(3, 4).reshape(3, 1, 4), dim=-1)
    features = F.normalize(torch.tensor([[0.1, 0.9, 0.0, 0.0], [0.0, 0.0, 1.0, 0.2]]), dim=-1)
    ids = hard_route(task_scores(features, prototypes, torch.zeros(3, 1)))
    assert ids.squeeze(1).tolist() == [1, 2]


def test_task_scores_take_the_best_prototype_of_each_task():
    prototypes = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.6, 0.8]]])
    assert task_scores(torch.tensor([[0.0, 1.0]]), prototypes, torch.zeros(2, 2)).tolist() == [[1.0, 0.800000011920929]]


def test_task_scores_add_each_prototypes_bias():
    prototypes = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    scores = task_scores(torch.tensor([[0.6, 0.8]]), prototypes, torch.tensor([[0.5], [0.0]]))
    torch.testing.assert_close(scores, torch.tensor([[1.1, 0.8]]))


def test_soft_route_weights_sum_to_one_and_follow_similarity():
    similarity = torch.tensor([[0.9, 0.1, 0.5]])
    ids, weights = soft_route(similarity, top_k=2, temperature=0.1)
    assert ids.tolist() == [[0, 2]]
    torch.testing.assert_close(weights.sum(-1), torch.ones(1))
    assert weights[0, 0] > weights[0, 1]


def test_route_once_reuses_the_first_decision():
    artifact = random_artifact(num_tasks=3)
    model = RoutedEncoder(
        artifact.arch, artifact.backbone, artifact.experts, artifact.heads, RoutingControl(route_once=True)
    )
    images = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        model(images)
    decisions = model.control.decisions
    assert len(decisions) == len(artifact.experts)
    assert all(torch.equal(d, decisions[0]) for d in decisions)


def test_forced_task_sets_the_image_task_and_head():
    artifact = random_artifact(num_tasks=3)
    model = RoutedEncoder(artifact.arch, artifact.backbone, artifact.experts, artifact.heads)
    with torch.no_grad():
        output = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert output.task.tolist() == [1, 2]
    # task 1 has 3 classes, task 2 has 4 (the widest head): padding classes are never chosen
    assert (output.logits[0, 3:] == -1.0e4).all() and (output.logits[1] > -1.0e4).all()


@pytest.mark.parametrize("task_ids", [[-1, 0], [0, 3], [-4, 1]], ids=["-1", "T", "-T-1"])
def test_a_forced_task_outside_the_tasks_is_refused(task_ids):
    """-1 answered for the last task, as Python's negative indexing does (the Predictor refused it)."""
    model = random_artifact(num_tasks=3).to_model()
    bad = next(t for t in task_ids if not 0 <= t < 3)
    with pytest.raises(ConfigError, match=rf"^task id {bad} is outside 0 to 2: the model has 3 tasks"), torch.no_grad():
        model(torch.rand(2, 3, 16, 16), torch.tensor(task_ids))


def test_forced_route_sends_an_id_outside_the_tasks_past_every_gather():
    """In a traced graph nothing can raise: -1 must not become the last task, as Gather would read it."""
    assert forced_route(torch.tensor([0, 2, -1, 3, -4]), num_tasks=3).squeeze(1).tolist() == [0, 2, 3, 3, 3]


def test_soft_routing_set_on_the_control_of_a_one_task_model_mixes_its_one_expert():
    model = random_artifact(num_tasks=1).to_model()
    model.control.mode = "soft"
    with torch.no_grad():
        assert model(torch.rand(2, 3, 16, 16)).task.tolist() == [0, 0]
    model.control.top_k = 2  # given, not the default: refused
    with pytest.raises(ConfigError, match="top_k 2 is more than the artifact's 1 tasks"), torch.no_grad():
        model(torch.rand(2, 3, 16, 16))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("mode", "Soft", "routing mode 'Soft' is not one of"),
        ("temperature", 0.0, "temperature 0.0 is not a positive finite number"),
        ("top_k", 0, "top_k 0 is not a whole number"),
    ],
)
def test_options_set_on_the_control_directly_are_checked_when_it_routes(option, value, message):
    """The Predictor checks its arguments; a control changed afterwards (model.control.temperature = 0) routed
    hard or gave NaN weights silently."""
    model = random_artifact(num_tasks=3).to_model()
    setattr(model.control, option, value)
    with pytest.raises(ConfigError, match=message), torch.no_grad():
        model(torch.rand(2, 3, 16, 16))
