import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from esmpp.architecture import build_visual, linear_keys
from esmpp.runtime.layers import add_experts, explicit_attention
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
                got = mod.qkv_experts(x, F.linear(x, mod.in_proj_weight, mod.in_proj_bias), mod.control)
            else:
                got = output
            torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
            checked.append(kind)

        module.register_forward_hook(check)
    with torch.no_grad():
        model(images, task_ids)
    assert len(checked) == len(linear_keys(artifact.arch, kinds))


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
