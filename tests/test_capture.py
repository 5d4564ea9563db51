import pytest
import torch

from esmpp.architecture import build_visual, linear_keys
from esmpp.capture import capture_blockwise, capture_statistics
from esmpp.runtime.layers import image_patches
from tests.conftest import TINY_ARCH


def _inputs_by_key(visual, images):
    """Reference: record every linear layer's input tokens with hooks on the explicit modules."""
    recorded = {}
    handles = []
    for block, layer in enumerate(visual.transformer.resblocks):
        for key, module in [
            (f"transformer.resblocks.{block}.attn.in_proj_weight", layer.attn),
            (f"transformer.resblocks.{block}.attn.out_proj.weight", layer.attn.out_proj),
            (f"transformer.resblocks.{block}.mlp.c_fc.weight", layer.mlp.c_fc),
            (f"transformer.resblocks.{block}.mlp.c_proj.weight", layer.mlp.c_proj),
        ]:
            handles.append(module.register_forward_pre_hook(lambda m, a, key=key: recorded.setdefault(key, a[0])))
    with torch.no_grad():
        visual(images)
    for handle in handles:
        handle.remove()
    return recorded


def test_streamed_statistics_equal_the_direct_ones():
    torch.manual_seed(0)
    visual = build_visual(TINY_ARCH)
    images = torch.randn(7, 3, 16, 16)
    stats = capture_statistics(visual, images.split(3), linear_keys(TINY_ARCH))
    per_batch = [_inputs_by_key(visual, batch) for batch in images.split(3)]
    reference = {key: torch.cat([inputs[key] for inputs in per_batch]) for key in per_batch[0]}
    assert set(stats) == set(linear_keys(TINY_ARCH))
    for key, s in stats.items():
        tokens = reference[key].double()
        flat = tokens.reshape(-1, tokens.shape[-1])
        torch.testing.assert_close(s.gram, flat.T @ flat)
        torch.testing.assert_close(s.mean, flat.mean(0))
        assert s.num_tokens == 7 * 5
        torch.testing.assert_close(s.image_means, tokens.mean(1).float())


def _whole_model_statistics():
    """A tiny ViT, 7 images in batches of 3, its linear keys and their statistics captured all at once."""
    torch.manual_seed(0)
    visual = build_visual(TINY_ARCH)
    batches = torch.randn(7, 3, 16, 16).split(3)
    keys = linear_keys(TINY_ARCH)
    return visual, batches, keys, capture_statistics(visual, batches, keys)


def test_blockwise_statistics_equal_the_whole_model_ones():
    visual, batches, keys, whole = _whole_model_statistics()
    blocks = list(capture_blockwise(visual, batches, keys))
    assert [sorted(block) for block in blocks] == [sorted(keys[:4]), sorted(keys[4:])]
    for block in blocks:
        for key, s in block.items():
            for field in ("gram", "mean", "image_means"):
                torch.testing.assert_close(getattr(s, field), getattr(whole[key], field), rtol=0, atol=0)
            assert s.num_tokens == whole[key].num_tokens


def test_projected_statistics_are_the_moment_of_the_projected_tokens():
    visual, batches, keys, whole = _whole_model_statistics()
    projected_key = keys[3]  # block 0's c_proj
    delta = torch.randn(visual.state_dict()[projected_key].shape, dtype=torch.float64)
    asked: list[str] = []

    def projection(key: str) -> torch.Tensor | None:
        asked.append(key)
        return delta if key == projected_key else None

    blocks = list(capture_blockwise(visual, batches, keys, projection))
    assert sorted(asked) == sorted(keys)
    for block in blocks:
        for key, s in block.items():
            assert s.projected == (key == projected_key)
            expected = delta @ whole[key].gram @ delta.T if s.projected else whole[key].gram
            torch.testing.assert_close(s.gram, expected)
            torch.testing.assert_close(s.mean, whole[key].mean)


def test_blockwise_capture_stops_after_the_last_block_asked_for():
    visual = build_visual(TINY_ARCH)
    ran = []
    visual.transformer.resblocks[1].register_forward_pre_hook(lambda module, args: ran.append(1))
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    [block] = capture_blockwise(visual, [torch.randn(2, 3, 16, 16)], [key])
    assert list(block) == [key] and ran == []


def test_patch_statistics_are_those_of_the_flattened_patches():
    visual = build_visual(TINY_ARCH)
    images = torch.randn(5, 3, 16, 16)
    stats = capture_statistics(visual, images.split(2), ["conv1.weight"])["conv1.weight"]
    patch = TINY_ARCH.vision["patch_size"]
    flat = image_patches(images, patch).double().reshape(-1, 3 * patch * patch)
    torch.testing.assert_close(stats.gram, flat.T @ flat)
    assert stats.num_tokens == 5 * (16 // patch) ** 2
    torch.testing.assert_close(stats.image_means, image_patches(images, patch).mean(1))


def test_empty_proxy_set_and_bad_keys_are_refused():
    visual = build_visual(TINY_ARCH)
    with pytest.raises(ValueError, match="proxy set is empty"):
        capture_statistics(visual, [], linear_keys(TINY_ARCH))
    with pytest.raises(ValueError, match="not the weight"):
        capture_statistics(visual, [torch.randn(1, 3, 16, 16)], ["proj"])
    with pytest.raises(ValueError, match="proxy set is empty"):
        list(capture_blockwise(visual, [], linear_keys(TINY_ARCH)))
    with pytest.raises(ValueError, match="not the weight"):
        list(capture_blockwise(visual, [torch.randn(1, 3, 16, 16)], ["proj"]))
