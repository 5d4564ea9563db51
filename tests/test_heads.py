import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from esmpp.errors import ConfigError
from esmpp.heads import check_zero_shot_source, zero_shot_head

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    (folder / "esmpp-test-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model("esmpp-test-clip", pretrained=None).eval()
    path = folder / "clip.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, path


def test_zero_shot_head_is_clip_text_embeddings_times_logit_scale(tiny_clip):
    model, path = tiny_clip
    head = zero_shot_head(path, "esmpp-test-clip", ["cat", "dog", "car"], templates=("a photo of a {}.",))
    tokenizer = open_clip.get_tokenizer("esmpp-test-clip")
    with torch.no_grad():
        expected = model.encode_text(tokenizer(["a photo of a dog."]), normalize=True)[0] * model.logit_scale.exp()
    assert head.shape == (3, 16)
    torch.testing.assert_close(head[1], expected, atol=1e-5, rtol=1e-5)


def test_visual_only_checkpoint_has_no_text_tower(tiny_clip, tmp_path):
    model, _ = tiny_clip
    path = tmp_path / "visual.pt"
    torch.save({f"visual.{k}": v for k, v in model.visual.state_dict().items()}, path)
    with pytest.raises(ConfigError, match="has no text tower"):
        zero_shot_head(path, "esmpp-test-clip", ["cat"])


def test_custom_architectures_need_a_head_file(tiny_clip):
    with pytest.raises(ConfigError, match="open_clip model name"):
        zero_shot_head(tiny_clip[1], "custom", ["cat"])


def test_the_cheap_check_refuses_what_the_head_would_and_passes_a_whole_clip(tiny_clip, tmp_path):
    model, path = tiny_clip
    check_zero_shot_source(path, "esmpp-test-clip")  # a whole CLIP: nothing to refuse
    visual_only = tmp_path / "visual.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in model.visual.state_dict().items()}, visual_only)
    with pytest.raises(ConfigError, match="has no text tower"):
        check_zero_shot_source(visual_only, "esmpp-test-clip")
    with pytest.raises(ConfigError, match="open_clip model name"):
        check_zero_shot_source(path, "custom")
