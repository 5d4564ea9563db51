import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from esmpp import heads
from esmpp.errors import ConfigError
from esmpp.heads import check_zero_shot_source, zero_shot_heads


def test_zero_shot_head_is_clip_text_embeddings_times_logit_scale(tiny_clip):
    model, path = tiny_clip
    (head,) = zero_shot_heads(path, "esmpp-test-clip", [["cat", "dog", "car"]], templates=("a photo of a {}.",))
    tokenizer = open_clip.get_tokenizer("esmpp-test-clip")
    with torch.no_grad():
        expected = model.encode_text(tokenizer(["a photo of a dog."]), normalize=True)[0] * model.logit_scale.exp()
    assert head.shape == (3, 16)
    torch.testing.assert_close(head[1], expected, atol=1e-5, rtol=1e-5)


def test_the_heads_of_several_tasks_read_the_checkpoint_once_and_equal_each_tasks_own(tiny_clip, monkeypatch):
    _, path = tiny_clip
    class_lists = [["cat", "dog"], ["car"], ["red", "green", "blue"]]
    alone = [zero_shot_heads(path, "esmpp-test-clip", [classes])[0] for classes in class_lists]
    loads = []
    monkeypatch.setattr(heads, "load_file", lambda *args: loads.append(args) or load_file(*args))
    together = zero_shot_heads(path, "esmpp-test-clip", class_lists)
    assert len(loads) == 1
    for head, expected in zip(together, alone, strict=True):
        torch.testing.assert_close(head, expected)


def test_visual_only_checkpoint_has_no_text_tower(tiny_clip, tmp_path):
    model, _ = tiny_clip
    path = tmp_path / "visual.pt"
    torch.save({f"visual.{k}": v for k, v in model.visual.state_dict().items()}, path)
    with pytest.raises(ConfigError, match="has no text tower"):
        zero_shot_heads(path, "esmpp-test-clip", [["cat"]])


def test_custom_architectures_need_a_head_file(tiny_clip):
    with pytest.raises(ConfigError, match="open_clip model name"):
        zero_shot_heads(tiny_clip[1], "custom", [["cat"]])


def test_the_cheap_check_refuses_what_the_head_would_and_passes_a_whole_clip(tiny_clip, tmp_path):
    model, path = tiny_clip
    check_zero_shot_source(path, "esmpp-test-clip")  # a whole CLIP: nothing to refuse
    visual_only = tmp_path / "visual.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in model.visual.state_dict().items()}, visual_only)
    with pytest.raises(ConfigError, match="has no text tower"):
        check_zero_shot_source(visual_only, "esmpp-test-clip")
    with pytest.raises(ConfigError, match="open_clip model name"):
        check_zero_shot_source(path, "custom")
