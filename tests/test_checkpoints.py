from __future__ import annotations

import dataclasses
import errno
import inspect
import json
import re
import sys
import types
from pathlib import Path

import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from esmpp import checkpoints
from esmpp.architecture import Architecture, build_visual
from esmpp.checkpoints import (
    Encoder,
    check_compatible,
    infer_architecture,
    load_encoder,
    probe_checkpoint,
    save_encoder,
)
from esmpp.config import BuildConfig
from esmpp.errors import ArchitectureError, CheckpointError

TINY_TEXT = {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}


def tiny_clip(arch: Architecture, quick_gelu: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return open_clip.model.CLIP(
        embed_dim=arch.embed_dim, vision_cfg=arch.vision, text_cfg=TINY_TEXT, quick_gelu=quick_gelu
    ).eval()


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------------------------- open_clip files


@pytest.mark.parametrize("prefix", ["", "visual.", "model.visual.", "image_encoder.model.visual.", "module.visual."])
def test_open_clip_state_dict_with_any_prefix_loads_the_visual_tower(tmp_path, tiny_arch, tiny_visual, prefix):
    path = tmp_path / "encoder.pt"
    torch.save({prefix + key: value for key, value in tiny_visual.state_dict().items()}, path)

    encoder = load_encoder(path, arch=tiny_arch)

    assert_same_state(encoder.state, tiny_visual.state_dict())
    assert encoder.arch == tiny_arch
    assert encoder.source == str(path)


def test_whole_clip_in_a_state_dict_wrapper_yields_only_the_visual_keys(tmp_path, tiny_arch):
    clip = tiny_clip(tiny_arch)
    path = tmp_path / "clip.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in clip.state_dict().items()}}, path)

    encoder = load_encoder(path, arch=tiny_arch)

    assert_same_state(encoder.state, clip.visual.state_dict())


def test_whole_clip_safetensors_in_half_precision_loads_as_float32(tmp_path, tiny_arch):
    clip = tiny_clip(tiny_arch)
    path = tmp_path / "clip.safetensors"
    save_file({key: value.half() for key, value in clip.state_dict().items()}, path)

    encoder = load_encoder(path, arch=tiny_arch)

    expected = {key: value.half().float() for key, value in clip.visual.state_dict().items()}
    assert_same_state(encoder.state, expected)


def test_safetensors_reads_only_the_visual_keys(tmp_path, tiny_arch, monkeypatch):
    path = tmp_path / "clip.safetensors"
    save_file(tiny_clip(tiny_arch).state_dict(), path)
    read: list[str] = []
    real_safe_open = checkpoints.safe_open

    class RecordingSafeOpen:
        def __init__(self, *args, **kwargs):
            self.handle = real_safe_open(*args, **kwargs)

        def __enter__(self):
            handle = self.handle.__enter__()
            recording = types.SimpleNamespace(
                keys=handle.keys,
                metadata=handle.metadata,
                get_tensor=lambda key: read.append(key) or handle.get_tensor(key),
            )
            return recording

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(checkpoints, "safe_open", RecordingSafeOpen)

    load_encoder(path, arch=tiny_arch)

    assert read and all(key.startswith("visual.") for key in read)


def test_legacy_torch_format_loads(tmp_path, tiny_arch, tiny_visual):
    path = tmp_path / "old.pt"
    torch.save(tiny_visual.state_dict(), path, _use_new_zipfile_serialization=False)
    assert_same_state(load_encoder(path, arch=tiny_arch).state, tiny_visual.state_dict())


def test_inferred_architecture_rebuilds_the_tower_up_to_the_head_count(tmp_path, tiny_arch, tiny_visual):
    path = tmp_path / "encoder.bin"
    torch.save(tiny_visual.state_dict(), path)

    encoder = load_encoder(path)

    # Shapes cannot tell heads: width 32 < 64 falls back to one head of width 32.
    assert encoder.arch.vision["head_width"] == 32
    for key in ("width", "layers", "patch_size", "image_size"):
        assert encoder.arch.vision[key] == tiny_arch.vision[key]
    assert encoder.arch.embed_dim == tiny_arch.embed_dim
    assert_same_state(encoder.to_module().state_dict(), tiny_visual.state_dict())


def test_named_architecture_is_checked_against_the_shapes(tmp_path, tiny_visual):
    path = tmp_path / "encoder.pt"
    torch.save(tiny_visual.state_dict(), path)

    with pytest.raises(CheckpointError, match=r"encoder\.pt.*has shape.*ViT-B-32.*expects"):
        load_encoder(path, arch="ViT-B-32")
    with pytest.raises(ArchitectureError, match="Unknown architecture"):
        load_encoder(path, arch="ViT-Nope")


def test_saved_encoder_reloads_with_its_architecture_and_same_outputs(tmp_path, tiny_arch, tiny_visual, tiny_images):
    path = save_encoder(Encoder(tiny_arch, tiny_visual.state_dict(), "memory"), tmp_path / "saved.safetensors")

    encoder = load_encoder(path)

    assert encoder.arch == tiny_arch
    assert_same_state(encoder.state, tiny_visual.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(encoder.to_module()(tiny_images), tiny_visual(tiny_images))
    assert [p.name for p in tmp_path.iterdir()] == ["saved.safetensors"]


def test_a_failed_save_leaves_no_partial_file_and_raises_its_error(tmp_path, tiny_arch, tiny_visual, monkeypatch):
    failure = OSError(errno.ENOSPC, "No space left on device")

    def fill_the_disk(tensors, path, metadata):
        Path(path).write_bytes(b"partial")
        raise failure

    monkeypatch.setattr(checkpoints, "save_file", fill_the_disk)
    with pytest.raises(OSError) as raised:
        save_encoder(Encoder(tiny_arch, tiny_visual.state_dict(), "memory"), tmp_path / "saved.safetensors")
    assert raised.value is failure  # callers say what to do about it
    assert list(tmp_path.iterdir()) == []


def test_shared_module_uses_the_encoder_tensors_and_a_copy_does_not(tiny_arch, tiny_visual, tiny_images):
    encoder = Encoder(tiny_arch, {k: v.detach().clone() for k, v in tiny_visual.state_dict().items()}, "memory")
    shared, copied = encoder.to_module(share=True), encoder.to_module()
    key = "conv1.weight"
    assert shared.state_dict()[key].data_ptr() == encoder.state[key].data_ptr()
    assert copied.state_dict()[key].data_ptr() != encoder.state[key].data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(shared(tiny_images), copied(tiny_images))


def test_open_clip_hub_directory_takes_the_architecture_from_its_config(tmp_path, tiny_arch):
    clip = tiny_clip(tiny_arch, quick_gelu=True)
    save_file(clip.state_dict(), tmp_path / "open_clip_model.safetensors")
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": tiny_arch.vision,
            "text_cfg": TINY_TEXT,
            "quick_gelu": True,
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))

    encoder = load_encoder(tmp_path)

    assert encoder.arch.quick_gelu and encoder.arch.vision == tiny_arch.vision
    assert encoder.arch.mean == (0.5, 0.5, 0.5)
    assert_same_state(encoder.state, clip.visual.state_dict())


# ------------------------------------------------------------------------------------ architecture


@settings(max_examples=12, deadline=None)
@given(
    width_heads=st.sampled_from([(32, 1), (48, 1), (64, 1), (128, 2)]),
    layers=st.integers(1, 3),
    patch=st.sampled_from([4, 8]),
    grid=st.integers(1, 3),
    mlp_width=st.sampled_from([64, 100, 130]),
    embed_dim=st.sampled_from([8, 24]),
    layer_scale=st.booleans(),
)
def test_infer_architecture_recovers_the_shapes(width_heads, layers, patch, grid, mlp_width, embed_dim, layer_scale):
    width, heads = width_heads
    vision = {
        "width": width,
        "layers": layers,
        "patch_size": patch,
        "image_size": grid * patch,
        "mlp_ratio": mlp_width / width,
        "head_width": width // heads,
    }
    if layer_scale:
        vision["ls_init_value"] = 0.1
    with torch.device("meta"):
        state = build_visual(Architecture(embed_dim=embed_dim, vision=vision)).state_dict()

    inferred = infer_architecture(state)

    with torch.device("meta"):
        rebuilt = build_visual(inferred).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in state.items()}
    assert inferred.vision["head_width"] == width // heads


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("conv1.weight", (0, 0, 0, 0)),
        ("positional_embedding", (0, 32)),
        ("transformer.resblocks.0.mlp.c_fc.weight", (0, 32)),
    ],
)
def test_an_empty_dimension_is_a_checkpoint_error(tiny_visual, key, shape):
    """Found by the nightly fuzz: an empty conv1.weight divided by zero (width 0), an empty positional
    embedding gave math.isqrt(-1)."""
    state = dict(tiny_visual.state_dict()) | {key: torch.zeros(shape)}
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)} is of shape {re.escape(str(shape))}.*no empty"):
        infer_architecture(state, source="edited")


@pytest.mark.parametrize(("name", "head_width"), [("ViT-B-32", 64), ("ViT-H-14", 80)])
def test_infer_architecture_names_open_clip_configs(name, head_width):
    with torch.device("meta"):
        state = build_visual(Architecture.from_name(name)).state_dict()

    inferred = infer_architecture(state)

    assert inferred.name == name
    assert inferred.vision["head_width"] == head_width
    assert infer_architecture(state, head_width=32).vision["head_width"] == 32
    assert infer_architecture(state, head_width=32).name == "custom"
    assert infer_architecture(state, quick_gelu=True).name == f"{name}-quickgelu"


def test_check_compatible_accepts_equal_and_names_both_files_otherwise(tiny_arch, tiny_visual):
    pretrained = Encoder(tiny_arch, tiny_visual.state_dict(), "zeroshot.pt")
    check_compatible(pretrained, Encoder(tiny_arch, dict(pretrained.state), "mnist.pt"))

    deeper = Architecture(embed_dim=16, vision={**tiny_arch.vision, "layers": 3})
    other = Encoder(deeper, build_visual(deeper).state_dict(), "cars.pt")
    with pytest.raises(CheckpointError, match=r"cars\.pt.*zeroshot\.pt.*architectures differ.*resblocks\.2"):
        check_compatible(pretrained, other)


# ------------------------------------------------------------------------------------ Hugging Face


@pytest.fixture(scope="module")
def transformers_clip():
    return pytest.importorskip("transformers")


def hf_vision_config(transformers_clip, **overrides):
    settings_ = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 16,
        "patch_size": 8,
        "projection_dim": 12,
        **overrides,
    }
    return transformers_clip.CLIPVisionConfig(**settings_)


@pytest.mark.parametrize(
    "overrides", [{}, {"hidden_act": "gelu", "layer_norm_eps": 1e-6}], ids=["quick_gelu", "gelu_eps"]
)
def test_hf_vision_model_with_projection_gives_the_same_embeddings(tmp_path, transformers_clip, tiny_images, overrides):
    torch.manual_seed(0)
    model = transformers_clip.CLIPVisionModelWithProjection(hf_vision_config(transformers_clip, **overrides))
    model.eval().save_pretrained(tmp_path)

    encoder = load_encoder(tmp_path)

    assert encoder.arch.embed_dim == 12 and encoder.arch.vision["head_width"] == 16
    with torch.no_grad():
        expected = model(pixel_values=tiny_images).image_embeds
        torch.testing.assert_close(encoder.to_module()(tiny_images), expected, rtol=0, atol=1e-5)


def test_hf_clip_model_directory_and_bare_vision_model(tmp_path, transformers_clip, tiny_images):
    torch.manual_seed(0)
    vision = hf_vision_config(transformers_clip)
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers_clip.CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=12)
    clip = transformers_clip.CLIPModel(config).eval()
    clip.save_pretrained(tmp_path / "clip", safe_serialization=False)
    bare = transformers_clip.CLIPVisionModel(vision).eval()
    bare.save_pretrained(tmp_path / "bare")

    encoder = load_encoder(tmp_path / "clip")
    bare_encoder = load_encoder(tmp_path / "bare")

    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=tiny_images)
        expected = getattr(expected, "pooler_output", expected)  # transformers 5 returns an output object
        torch.testing.assert_close(encoder.to_module()(tiny_images), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            bare_encoder.to_module()(tiny_images),
            bare(pixel_values=tiny_images).pooler_output,
            atol=1e-5,
            rtol=0,
        )


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_probing_an_hf_folder_maps_its_keys_as_loading_does(tmp_path, transformers_clip, weights):
    model = transformers_clip.CLIPVisionModelWithProjection(hf_vision_config(transformers_clip))
    model.save_pretrained(tmp_path)
    if weights == "pytorch_model.bin":  # transformers 5 writes only safetensors
        (tmp_path / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / weights)
    arch = load_encoder(tmp_path).arch
    probe_checkpoint(tmp_path, arch)
    deeper = dataclasses.replace(arch, vision={**arch.vision, "layers": 3})
    with pytest.raises(CheckpointError) as loading:
        load_encoder(tmp_path, deeper)
    with pytest.raises(CheckpointError) as probing:
        probe_checkpoint(tmp_path, deeper)
    assert str(probing.value) == str(loading.value) and "missing" in str(probing.value)


def test_sharded_hf_safetensors_directory(tmp_path, transformers_clip, tiny_images):
    torch.manual_seed(0)
    model = transformers_clip.CLIPVisionModelWithProjection(hf_vision_config(transformers_clip)).eval()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()

    encoder = load_encoder(tmp_path)

    with torch.no_grad():
        expected = model(pixel_values=tiny_images).image_embeds
        torch.testing.assert_close(encoder.to_module()(tiny_images), expected, rtol=0, atol=1e-5)


def test_single_hf_safetensors_file_loads_with_hf_defaults(tmp_path, transformers_clip):
    torch.manual_seed(0)
    model = transformers_clip.CLIPVisionModelWithProjection(hf_vision_config(transformers_clip))
    path = tmp_path / "hf.safetensors"
    save_file({"clip." + k: v.contiguous() for k, v in model.state_dict().items()}, path)

    encoder = load_encoder(path)

    assert encoder.arch.quick_gelu  # transformers' CLIP default
    torch.testing.assert_close(encoder.state["proj"], model.visual_projection.weight.T)
    q, k, v = (
        getattr(model.vision_model.encoder.layers[1].self_attn, p).weight for p in ("q_proj", "k_proj", "v_proj")
    )
    torch.testing.assert_close(encoder.state["transformer.resblocks.1.attn.in_proj_weight"], torch.cat([q, k, v]))


# --------------------------------------------------------------------------------- pickled models


@pytest.fixture
def pickled_image_encoder(tmp_path, tiny_arch, tiny_images):
    """A task_vectors-style ``src.modeling.ImageEncoder`` whose visual tower has an old open_clip class
    name; neither name resolves once the file is written."""
    clip = tiny_clip(tiny_arch, quick_gelu=True)
    del clip.transformer  # ImageEncoder(keep_lang=False) drops the text tower
    legacy_visual = type("VisualTransformer", (type(clip.visual),), {"__module__": "open_clip.model"})
    clip.visual.__class__ = legacy_visual

    def init(self, model):
        nn.Module.__init__(self)
        self.model = model
        self.val_preprocess = open_clip.image_transform(16, is_train=False)
        self.cache_dir = "/data/cache"

    image_encoder = type("ImageEncoder", (nn.Module,), {"__module__": "src.modeling", "__init__": init})
    package, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")
    modeling.ImageEncoder, package.modeling = image_encoder, modeling
    path = tmp_path / "finetuned.pt"
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "src", package)
        patch.setitem(sys.modules, "src.modeling", modeling)
        patch.setattr(open_clip.model, "VisualTransformer", legacy_visual, raising=False)
        torch.save(image_encoder(clip), path)
    with torch.no_grad():
        expected = clip.visual(tiny_images)
    return path, clip.visual.state_dict(), expected


def test_pickled_model_needs_allow_pickle(pickled_image_encoder, tiny_arch):
    path, _, _ = pickled_image_encoder
    with pytest.raises(
        CheckpointError,
        match=r"finetuned\.pt.*arbitrary code.*`allow_pickle: true` in the build config.*allow_pickle=True",
    ):
        load_encoder(path)
    with pytest.raises(CheckpointError, match=r"finetuned\.pt.*arbitrary code.*`allow_pickle: true`"):
        probe_checkpoint(path, tiny_arch)
    probe_checkpoint(path, tiny_arch, allow_pickle=True)  # unpickled, and checked, only when it loads


def test_pickled_image_encoder_loads_with_its_heads_and_activation(pickled_image_encoder, tiny_arch, tiny_images):
    path, expected_state, expected_output = pickled_image_encoder
    assert "src.modeling" not in sys.modules

    encoder = load_encoder(path, allow_pickle=True)

    assert_same_state(encoder.state, expected_state)
    assert encoder.arch.quick_gelu and encoder.arch.vision["head_width"] == tiny_arch.vision["head_width"]
    with torch.no_grad():
        torch.testing.assert_close(encoder.to_module()(tiny_images), expected_output)


# ---------------------------------------------------------------------------------------- bad input


def test_missing_and_extra_keys_are_named(tmp_path, tiny_arch, tiny_visual):
    state = tiny_visual.state_dict()
    missing = {k: v for k, v in state.items() if k != "ln_post.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    torch.save({**state, "head.weight": torch.zeros(3, 16)}, tmp_path / "extra.pt")

    with pytest.raises(CheckpointError, match=r"missing\.pt.*missing.*ln_post\.bias.*`architecture: "):
        load_encoder(tmp_path / "missing.pt", arch=tiny_arch)
    with pytest.raises(CheckpointError, match=r"extra\.pt.*not part of.*head\.weight"):
        load_encoder(tmp_path / "extra.pt")


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path, tiny_arch, tiny_visual):
    torch.save(tiny_visual.state_dict(), tmp_path / "tiny.pt")
    wider_mlp = Architecture(embed_dim=16, vision={**tiny_arch.vision, "mlp_ratio": 2.0}, name="wider")

    with pytest.raises(
        CheckpointError, match=r"tiny\.pt.*c_fc\.weight has shape \(128, 32\).*'wider' expects \(64, 32\)"
    ):
        load_encoder(tmp_path / "tiny.pt", arch=wider_mlp)


def test_non_finite_values_name_the_key(tmp_path, tiny_visual):
    state = tiny_visual.state_dict()
    state["transformer.resblocks.1.mlp.c_fc.bias"][3] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")

    with pytest.raises(CheckpointError, match=r"nan\.safetensors.*resblocks\.1\.mlp\.c_fc\.bias.*NaN"):
        load_encoder(tmp_path / "nan.safetensors")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (bytes(range(7, 250)) * 4, "not a checkpoint"),
        (b"epoch,accuracy\n1,0.93\n", "not a checkpoint"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{broken json....", "not a valid safetensors"),
        (b"PK\x03\x04 a zip that is cut short", "not a readable torch checkpoint"),
    ],
    ids=["random_bytes", "text", "bad_safetensors", "bad_zip"],
)
def test_files_that_are_not_checkpoints(tmp_path, content, message):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"model\.pt.*{message}.*\.safetensors"):
        load_encoder(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([torch.zeros(2)], "holds a list"),
        ({"epoch": 3, "lr": 0.1}, "dict without tensors"),
        ({"text.weight": torch.zeros(2)}, "no CLIP visual encoder.*text\\.weight"),
        ({"a.visual.conv1.weight": torch.zeros(1), "b.visual.conv1.weight": torch.zeros(1)}, "several"),
    ],
    ids=["list", "no_tensors", "no_visual", "two_towers"],
)
def test_torch_files_holding_something_else(tmp_path, content, message):
    torch.save(content, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=rf"other\.pt.*{message}"):
        load_encoder(tmp_path / "other.pt")


def test_missing_path_and_directory_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere\.pt does not exist"):
        load_encoder(tmp_path / "nowhere.pt")
    with pytest.raises(CheckpointError, match=r"without model weights.*model\.safetensors"):
        load_encoder(tmp_path)


@pytest.mark.parametrize("make", ["missing", "not a checkpoint", "folder without weights"])
def test_probing_a_checkpoint_raises_what_loading_it_would(tmp_path, make):
    path = tmp_path / "model"
    if make == "not a checkpoint":
        path.write_bytes(b"<html>a download error page</html>")
    elif make == "folder without weights":
        path.mkdir()
    with pytest.raises(CheckpointError) as loading:
        load_encoder(path)
    with pytest.raises(CheckpointError) as probing:
        probe_checkpoint(path)
    assert str(probing.value) == str(loading.value)


def test_probing_accepts_every_format_loading_does(tmp_path, tiny_visual):
    save_file(tiny_visual.state_dict(), tmp_path / "a.safetensors")
    torch.save(tiny_visual.state_dict(), tmp_path / "a.pt")
    (tmp_path / "hub").mkdir()
    save_file(tiny_visual.state_dict(), tmp_path / "hub" / "open_clip_model.safetensors")
    for path in ("a.safetensors", "a.pt", "hub"):
        probe_checkpoint(tmp_path / path)


@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny.pt"])
def test_probing_with_an_architecture_checks_the_shapes_as_loading_does(tmp_path, tiny_arch, tiny_visual, name):
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save({"state_dict": tiny_visual.state_dict()}, path)
    else:
        save_file(tiny_visual.state_dict(), path)
    wider = dataclasses.replace(tiny_arch, vision={**tiny_arch.vision, "width": 48})
    probe_checkpoint(path, tiny_arch)
    with pytest.raises(CheckpointError) as loading:
        load_encoder(path, wider)
    with pytest.raises(CheckpointError) as probing:
        probe_checkpoint(path, wider)
    assert str(probing.value) == str(loading.value) and "has shape" in str(probing.value)


def test_probing_a_torch_file_reads_no_weights(tmp_path, tiny_arch, tiny_visual, monkeypatch):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_visual.state_dict(), path)
    devices = []
    original = checkpoints._canonical
    monkeypatch.setattr(
        checkpoints,
        "_canonical",
        lambda layout, tensors, source: (
            devices.extend(t.device.type for t in tensors.values()) or original(layout, tensors, source)
        ),
    )
    probe_checkpoint(path, tiny_arch)
    assert devices and set(devices) == {"meta"}


def test_corrupted_architecture_metadata_is_reported(tmp_path, tiny_visual):
    path = tmp_path / "meta.safetensors"
    save_file(tiny_visual.state_dict(), path, {"esmpp.encoder": "{not json"})
    with pytest.raises(CheckpointError, match=r"meta\.safetensors.*esmpp\.encoder.*`architecture: "):
        load_encoder(path)


@pytest.mark.parametrize("entry", ["{not json", '{"format": "99"}', '{"format": "1", "architecture": {}}'])
def test_a_named_architecture_is_the_fix_for_unusable_metadata(tmp_path, tiny_arch, tiny_visual, entry):
    """The metadata error tells to name the architecture: doing so loads the file."""
    path = tmp_path / "meta.safetensors"
    save_file(tiny_visual.state_dict(), path, {"esmpp.encoder": entry})
    with pytest.raises(CheckpointError, match=r"meta\.safetensors.*esmpp\.encoder"):
        load_encoder(path)

    encoder = load_encoder(path, arch=tiny_arch)

    assert encoder.arch == tiny_arch
    assert_same_state(encoder.state, tiny_visual.state_dict())


def test_the_advice_names_build_config_keys_and_keywords_that_exist(
    tmp_path, tiny_arch, tiny_visual, pickled_image_encoder
):
    """No command has --arch or --allow-pickle: the messages name the build config's keys and the Python
    keywords, and those must exist."""
    pickled, _, _ = pickled_image_encoder
    without_bias = {k: v for k, v in tiny_visual.state_dict().items() if k != "ln_post.bias"}
    torch.save(without_bias, tmp_path / "missing.pt")
    save_file(tiny_visual.state_dict(), tmp_path / "meta.safetensors", {"esmpp.encoder": "{not json"})
    attempts = {
        "pickle": lambda: load_encoder(pickled),
        "keys": lambda: load_encoder(tmp_path / "missing.pt", arch=tiny_arch),
        "metadata": lambda: load_encoder(tmp_path / "meta.safetensors"),
    }
    for name, load in attempts.items():
        with pytest.raises(CheckpointError) as error:
            load()
        message = str(error.value)
        config_keys = set(re.findall(r"`(\w+):", message))
        python_keywords = set(re.findall(r"(\w+)=\S+ in Python", message))
        assert config_keys and config_keys <= BuildConfig.model_fields.keys(), (name, message)
        assert python_keywords and python_keywords <= inspect.signature(load_encoder).parameters.keys(), name
        assert not re.search(r"--\w", message), (name, message)


def test_paths_are_accepted_as_strings(tmp_path, tiny_visual):
    torch.save(tiny_visual.state_dict(), tmp_path / "a.pt")
    assert load_encoder(str(tmp_path / "a.pt")).source == str(Path(tmp_path / "a.pt"))
