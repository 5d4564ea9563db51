"""The ESM++ build on synthetic fine-tunes of a tiny model (the zoo-based end-to-end test is in tests/zoo)."""

import pytest
import torch

from esmpp.architecture import build_visual
from esmpp.build import BuildOptions, build_artifact
from esmpp.checkpoints import Encoder
from esmpp.errors import ConfigError
from esmpp.merge import TaskSource, golden_section_search
from tests.conftest import TINY_ARCH


def _finetune(pretrained: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A fine-tune-like perturbation: low rank plus small noise on matrices, small noise elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, weight in pretrained.items():
        if weight.ndim == 2 and min(weight.shape) > 4:
            low_rank = torch.randn(weight.shape[0], 4, generator=generator) @ torch.randn(
                4, weight.shape[1], generator=generator
            )
            delta = scale * low_rank / 4 + 0.1 * scale * torch.randn(weight.shape, generator=generator)
        else:
            delta = 0.1 * scale * torch.randn(weight.shape, generator=generator)
        state[key] = weight + delta
    return state


def _task_images(task: int, count: int, seed: int) -> torch.Tensor:
    """Images of a task: the task's own template plus a little noise."""
    template = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1000 + task))
    return template + 0.1 * torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _tasks(num_tasks: int, pretrained: Encoder) -> list[TaskSource]:
    tasks = []
    for t in range(num_tasks):
        state = _finetune(pretrained.state, seed=100 + t)
        tasks.append(
            TaskSource(
                name=f"task{t}",
                load=lambda state=state, t=t: Encoder(TINY_ARCH, state, f"finetuned-{t}"),
                proxy=_task_images(t, count=6, seed=0),
                head=torch.randn(3, TINY_ARCH.embed_dim, generator=torch.Generator().manual_seed(50 + t)),
                classes=["a", "b", "c"],
            )
        )
    return tasks


@pytest.fixture
def pretrained() -> Encoder:
    torch.manual_seed(0)
    return Encoder(TINY_ARCH, build_visual(TINY_ARCH).state_dict(), "pretrained")


@pytest.mark.parametrize("kinds", [("qkv", "out", "fc", "proj"), ("patch", "qkv", "out", "fc", "proj")])
def test_one_task_with_full_rank_experts_reproduces_the_fine_tuned_model(pretrained, kinds):
    tasks = _tasks(1, pretrained)
    options = BuildOptions(alpha=1.0, rank=10_000, routed_kinds=kinds)
    artifact = build_artifact(pretrained, tasks, options, progress=False)
    finetuned = tasks[0].load().to_module()
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        routed = artifact.to_model()(images).embedding
        expected = finetuned(images)
    assert (routed - expected).abs().max() <= 1e-4


def test_build_is_deterministic_and_records_its_choices(pretrained):
    options = BuildOptions(alpha=0.8, rank=4)
    first = build_artifact(pretrained, _tasks(3, pretrained), options, progress=False)
    second = build_artifact(pretrained, _tasks(3, pretrained), options, progress=False)
    for key, layer in first.experts.items():
        assert torch.equal(layer.up, second.experts[key].up) and torch.equal(layer.down, second.experts[key].down)
        assert layer.up.shape == (3, first.backbone[key].shape[0], 4)
        assert layer.prototypes.shape == (3, 1, first.backbone[key].shape[1])
    assert first.build["alpha"] == 0.8 and first.build["method"] == "esm" and first.build["rank"] == 4
    assert set(first.timings) == {"merge", "alpha", "experts", "prototypes"} and "seconds" not in first.build
    assert first.build["router"] == "cosine" and all(layer.prototype_bias is None for layer in first.experts.values())


def test_runtime_prototypes_and_several_prototypes_per_task(pretrained):
    options = BuildOptions(alpha=1.0, rank=2, prototype_source="runtime", prototypes_per_task=2)
    artifact = build_artifact(pretrained, _tasks(2, pretrained), options, progress=False)
    for layer in artifact.experts.values():
        assert layer.prototypes.shape[:2] == (2, 2)
        torch.testing.assert_close(layer.prototypes.norm(dim=-1), torch.ones(2, 2))


@pytest.mark.parametrize(("router", "source"), [("cosine", "finetuned"), ("discriminant", "runtime")])
def test_routing_follows_distinct_proxy_distributions(pretrained, router, source):
    """Tasks whose images differ strongly are routed to their own experts."""
    options = BuildOptions(alpha=0.5, rank=4, router=router, prototype_source=source)
    artifact = build_artifact(pretrained, _tasks(3, pretrained), options, progress=False)
    model = artifact.to_model()
    with torch.no_grad():
        for t in range(3):
            images = _task_images(t, count=5, seed=1)
            assert model(images).task.tolist() == [t] * 5


def test_discriminant_router_is_fitted_on_every_tasks_proxy_features(pretrained):
    options = BuildOptions(alpha=1.0, rank=2, router="discriminant", prototype_source="runtime", prototypes_per_task=2)
    artifact = build_artifact(pretrained, _tasks(3, pretrained), options, progress=False)
    assert artifact.build["router"] == "discriminant"
    for layer in artifact.experts.values():
        assert layer.prototypes.shape[:2] == layer.prototype_bias.shape == (3, 2)
        # LDA weights Σ⁻¹μ are not unit prototypes, and every bias −½ μᵀΣ⁻¹μ is negative
        assert not torch.allclose(layer.prototypes.norm(dim=-1), torch.ones(3, 2))
        assert (layer.prototype_bias < 0).all()


def test_patch_experts_restore_the_fine_tuned_patch_embedding_with_the_task_forced(pretrained):
    """At α = 0 the backbone is the pretrained model; a full-rank patch expert puts back the fine-tuned
    patch embedding exactly (up to the float32 ESD) when the task is forced."""
    tasks = _tasks(2, pretrained)
    options = BuildOptions(alpha=0.0, rank=10_000, routed_kinds=("patch",))
    model = build_artifact(pretrained, tasks, options, progress=False).to_model()
    images = torch.randn(3, 3, 16, 16)
    outputs = []
    model.visual.conv1.register_forward_hook(lambda module, args, output: outputs.append(output))
    for t, task in enumerate(tasks):
        expected = torch.nn.functional.conv2d(images, task.load().state["conv1.weight"], stride=8)
        with torch.no_grad():
            model(images, torch.full((3,), t))
        torch.testing.assert_close(outputs[-1], expected, atol=1e-4, rtol=1e-4)


def test_alpha_search_uses_validation_data(pretrained):
    tasks = _tasks(2, pretrained)
    for t, task in enumerate(tasks):
        task.validation = (_task_images(t, count=8, seed=2), torch.randint(0, 3, (8,)))
    artifact = build_artifact(pretrained, tasks, BuildOptions(rank=2, alpha_evaluations=4), progress=False)
    assert len(artifact.build["alpha_history"]) == 4
    assert 0.0 <= artifact.build["alpha"] <= 2.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda tasks: setattr(tasks[0], "proxy", torch.zeros(0, 3, 16, 16)), "no proxy images"),
        (lambda tasks: setattr(tasks[0], "head", None), "no head"),
        (lambda tasks: tasks.clear(), "no tasks"),
    ],
)
def test_bad_build_inputs_are_named(pretrained, change, message):
    tasks = _tasks(1, pretrained)
    change(tasks)
    with pytest.raises(ConfigError, match=message):
        build_artifact(pretrained, tasks, BuildOptions(alpha=1.0), progress=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (BuildOptions(routed_kinds=("mlp",)), "routed kinds"),
        (BuildOptions(router="knn"), "router must be"),
        (BuildOptions(router="discriminant", prototype_source="runtime", router_shrinkage=1.5), "router_shrinkage"),
        (BuildOptions(router="discriminant"), "prototype_source='runtime'"),
    ],
)
def test_bad_options_are_named(pretrained, options, message):
    with pytest.raises(ConfigError, match=message):
        build_artifact(pretrained, _tasks(1, pretrained), options, progress=False)


def test_golden_section_finds_the_peak():
    alpha, history = golden_section_search(lambda a: -((a - 0.7) ** 2), 0.0, 2.0, evaluations=20)
    assert abs(alpha - 0.7) < 1e-3 and len(history) == 20
