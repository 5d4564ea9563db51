import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from esmpp.architecture import build_visual, linear_keys
from esmpp.runtime.layers import apply_experts, explicit_attention, image_patches
from esmpp.runtime.model import RoutedEncoder
from tests.conftest import TINY_ARCH, random_artifact


def test_explicit_attention_keeps_keys_and_outputs():
    torch.manual_seed(0)
    visual = build_visual(TINY_ARCH)
    images = torch.randn(3, 3, 16, 16)
    keys, expected = list(visual.state_dict()), visual(images)
    explicit_attention(visual)
    assert list(visual.state_dict()) == keys
    torch.testing.assert_close(visual(images), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kinds", [("qkv", "fc"), ("qkv", "out", "fc", "proj")])
def test_forced_routed_layers_equal_the_dense_formula(kinds):
    """Each routed layer computes W x + b + A_t B_t x for the forced task t (checked by hooks)."""
    artifact = random_artifact(num_tasks=3, kinds=kinds)
    model = RoutedEncoder(artifact.arch, artifact.backbone, artifact.experts, artifact.heads)
    images = torch.randn(4, 3, 16, 16)
    task_ids = torch.tensor([2, 0, 1, 2])
    checked = []
    for key in linear_keys(artifact.arch, kinds):
        block = model.visual.transformer.resblocks[int(key.split(".")[2])]
        kind = {"attn.in_proj_weight": "qkv", "attn.out_proj.weight": "out"}.get(".".join(key.split(".")[3:]))
        module = {"qkv": block.attn, "out": block.attn.out_proj}.get(kind) or (
            block.mlp.c_fc if "c_fc" in key else block.mlp.c_proj
        )
        weight, bias = artifact.backbone[key], artifact.backbone[key.replace("weight", "bias")]
        layer = artifact.experts[key]

        def check(mod, args, output, weight=weight, bias=bias, layer=layer, kind=kind):
            x = args[0]
            dense = torch.stack(
                [F.linear(x[b], weight + layer.up[t] @ layer.down[t], bias) for b, t in enumerate(task_ids.tolist())]
            )
            if kind == "qkv":  # the attention's output is after the softmax: recompute its in-projection
                got = F.linear(x, mod.in_proj_weight, mod.in_proj_bias) + mod.qkv_experts(x, mod.control)
            else:
                got = output
            torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
            checked.append(kind)

        module.register_forward_hook(check)
    with torch.no_grad():
        model(images, task_ids)
    assert len(checked) == len(linear_keys(artifact.arch, kinds))


def test_apply_experts_weights_mix_experts():
    x = torch.randn(2, 5, 6)
    up, down = torch.randn(3, 4, 2), torch.randn(3, 2, 6)
    ids, weights = torch.tensor([[0, 2], [1, 0]]), torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    got = apply_experts(x, up, down, ids, weights)
    expected = torch.stack(
        [
            0.25 * x[0] @ (up[0] @ down[0]).T + 0.75 * x[0] @ (up[2] @ down[2]).T,
            x[1] @ (up[1] @ down[1]).T,
        ]
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**31 - 1))
@settings(deadline=None, max_examples=30)
def test_apply_experts_equals_the_per_image_sum_of_dense_experts(batch, num_tasks, k, rank, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 5, generator=generator, dtype=torch.float64)
    up = torch.randn(num_tasks, 4, rank, generator=generator, dtype=torch.float64)
    down = torch.randn(num_tasks, rank, 5, generator=generator, dtype=torch.float64)
    ids = torch.randint(num_tasks, (batch, k), generator=generator)
    weights = torch.rand(batch, k, generator=generator, dtype=torch.float64)
    expected = torch.stack(
        [sum(weights[b, j] * x[b] @ (up[ids[b, j]] @ down[ids[b, j]]).T for j in range(k)) for b in range(batch)]
    )
    torch.testing.assert_close(apply_experts(x, up, down, ids, weights), expected)


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
