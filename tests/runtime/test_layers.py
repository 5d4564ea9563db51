import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from esmpp.architecture import block_index, build_visual, linear_keys, linear_kind
from esmpp.runtime.layers import (
    add_experts,
    add_shared_expert,
    explicit_attention,
    image_patches,
    routed_slot,
    shared_task,
)
from esmpp.runtime.model import RoutedEncoder
from esmpp.runtime.routing import RoutingControl
from tests.conftest import TINY_ARCH, random_artifact


def test_explicit_attention_keeps_keys_and_outputs():
    torch.manual_seed(0)
    visual = build_visual(TINY_ARCH)
    images = torch.randn(3, 3, 16, 16)
    keys, expected = list(visual.state_dict()), visual(images)
    explicit_attention(visual)
    assert list(visual.state_dict()) == keys
    torch.testing.assert_close(visual(images), expected, atol=1e-5, rtol=1e-5)


def _reference_routes(x, prototypes, control, forced):
    """Each image's (tasks, weights) from the definition: cosine of the mean token to the nearest
    prototype of each task; the top task (hard), or the top k with a softmax over similarity / temperature."""
    if forced is not None:
        return [([t], [1.0]) for t in forced.tolist()]
    routes = []
    for tokens in x:
        mean = tokens.mean(dim=0)
        similarity = torch.stack([max(F.cosine_similarity(mean, p, dim=0) for p in task) for task in prototypes])
        if control.mode == "hard":
            routes.append(([int(similarity.argmax())], [1.0]))
        else:
            top = similarity.topk(control.top_k)
            routes.append((top.indices.tolist(), torch.softmax(top.values / control.temperature, dim=0).tolist()))
    return routes


@pytest.mark.parametrize("mode", ["forced", "forced_one_task", "hard", "soft"])
@pytest.mark.parametrize("kinds", [("qkv", "fc"), ("qkv", "out", "fc", "proj")])
def test_routed_layers_equal_the_dense_formula(kinds, mode):
    """Each routed layer computes W x + b + Σ_j w_j A_{t_j} B_{t_j} x per image, for the forced task (one
    task for the whole batch takes the shared-expert path), the nearest task (hard) or the soft top-2 mix,
    in float64 (checked by hooks on every expert bank)."""
    artifact = random_artifact(num_tasks=3, kinds=kinds)
    control = RoutingControl(mode="soft" if mode == "soft" else "hard", top_k=2, temperature=0.1)
    model = RoutedEncoder(artifact.arch, artifact.backbone, artifact.experts, artifact.heads, control).double()
    images = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    forced = {"forced": torch.tensor([2, 0, 1, 2]), "forced_one_task": torch.tensor([1, 1, 1, 1])}.get(mode)
    backbone = {key: value.double() for key, value in artifact.backbone.items()}
    checked = []
    for key in linear_keys(artifact.arch, kinds):
        module, slot = routed_slot(model.visual, block_index(key), linear_kind(key))
        weight, bias = backbone[key], backbone[key.replace("weight", "bias")]
        layer = artifact.experts[key]
        up, down, prototypes = layer.up.double(), layer.down.double(), layer.prototypes.double()

        def check(bank, args, output, key=key, weight=weight, bias=bias, up=up, down=down, prototypes=prototypes):
            x = args[0]
            routes = _reference_routes(x, prototypes, control, forced)
            expected = torch.stack(
                [
                    F.linear(x[b], weight + sum(w * up[t] @ down[t] for t, w in zip(tasks, weights)), bias)
                    for b, (tasks, weights) in enumerate(routes)
                ]
            )
            torch.testing.assert_close(output, expected)
            checked.append(key)

        getattr(module, slot).register_forward_hook(check)
    with torch.no_grad():
        model(images, forced)
    assert checked == linear_keys(artifact.arch, kinds)


def _rows(up):
    """The artifact's ``up`` [T, d_out, r] in the runtime's layout [T, r, d_out]."""
    return up.transpose(1, 2).contiguous()


def test_add_experts_weights_mix_experts():
    x, dense = torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    up, down = torch.randn(3, 4, 2), torch.randn(3, 2, 6)
    ids, weights = torch.tensor([[0, 2], [1, 0]]), torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    got = add_experts(dense.clone(), x, _rows(up), down, ids, weights)
    expected = dense + torch.stack(
        [
            0.25 * x[0] @ (up[0] @ down[0]).T + 0.75 * x[0] @ (up[2] @ down[2]).T,
            x[1] @ (up[1] @ down[1]).T,
        ]
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@given(
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 3),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
@settings(deadline=None, max_examples=30)
def test_add_experts_equals_the_per_image_dense_formula(batch, num_tasks, k, rank, unit_weights, seed):
    """W x + b + Σ_j w_j A_{t_j} B_{t_j} x per image, in float64; ``weights=None`` is one expert at weight 1."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 5, generator=generator, dtype=torch.float64)
    weight, bias = torch.randn(4, 5, generator=generator, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    up = torch.randn(num_tasks, 4, rank, generator=generator, dtype=torch.float64)
    down = torch.randn(num_tasks, rank, 5, generator=generator, dtype=torch.float64)
    ids = torch.randint(num_tasks, (batch, 1 if unit_weights else k), generator=generator)
    weights = None if unit_weights else torch.rand(batch, k, generator=generator, dtype=torch.float64)
    mix = torch.ones(batch, 1, dtype=torch.float64) if unit_weights else weights
    expected = torch.stack(
        [
            F.linear(x[b], weight + sum(mix[b, j] * up[ids[b, j]] @ down[ids[b, j]] for j in range(ids.shape[1])), bias)
            for b in range(batch)
        ]
    )
    torch.testing.assert_close(add_experts(F.linear(x, weight, bias), x, _rows(up), down, ids, weights), expected)


def test_shared_expert_path_equals_the_gathered_one():
    generator = torch.Generator().manual_seed(0)
    x, dense = torch.randn(3, 5, 6, generator=generator, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    up_rows = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    down = torch.randn(2, 3, 6, generator=generator, dtype=torch.float64)
    gathered = add_experts(dense.clone(), x, up_rows, down, torch.ones(3, 1, dtype=torch.long), None)
    torch.testing.assert_close(add_shared_expert(dense.clone(), x, up_rows[1], down[1]), gathered)


def test_shared_task_only_in_eager_cpu_runs_of_one_expert_at_weight_one(monkeypatch):
    same, mixed = torch.tensor([[2], [2], [2]]), torch.tensor([[2], [0], [2]])
    assert shared_task(same, None) == 2 and shared_task(torch.tensor([[1]]), None) == 1
    assert shared_task(mixed, None) is None
    assert shared_task(torch.tensor([[2, 0], [2, 0]]), torch.tensor([[0.5, 0.5], [0.5, 0.5]])) is None  # soft
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # ONNX export, torch.compile
    assert shared_task(same, None) is None


def test_image_patches_are_what_the_patch_convolution_multiplies():
    images = torch.randn(2, 3, 16, 16)
    weight = torch.randn(5, 3, 8, 8)
    convolved = F.conv2d(images, weight, stride=8)  # [2, 5, 2, 2]
    tokens = image_patches(images, 8) @ weight.flatten(1).T  # [2, 4, 5]
    torch.testing.assert_close(tokens.transpose(1, 2).reshape(convolved.shape), convolved, atol=1e-5, rtol=1e-5)


def test_routed_patch_embedding_adds_the_forced_tasks_expert_to_each_patch():
    artifact = random_artifact(num_tasks=3, kinds=("patch", "qkv"))
    model = RoutedEncoder(artifact.arch, artifact.backbone, artifact.experts, artifact.heads)
    images, task_ids = torch.randn(3, 3, 16, 16), torch.tensor([2, 0, 1])
    layer = artifact.experts["conv1.weight"]
    patch = artifact.arch.vision["patch_size"]
    weight = artifact.backbone["conv1.weight"]
    expected = torch.stack(
        [
            F.conv2d(images[b : b + 1], weight + (layer.up[t] @ layer.down[t]).reshape(weight.shape), stride=patch)[0]
            for b, t in enumerate(task_ids.tolist())
        ]
    )
    outputs = []
    model.visual.conv1.register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        model(images, task_ids)
    torch.testing.assert_close(outputs[0], expected, atol=1e-5, rtol=1e-5)
    assert model.routed_keys[0] == "conv1.weight"
