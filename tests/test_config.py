"""A YAML build config with user files (checkpoints, image folders, head files) → task sources → artifact."""

import dataclasses
import shutil
from typing import NoReturn

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from esmpp import heads
from esmpp.architecture import build_visual
from esmpp.build import build_artifact
from esmpp.checkpoints import Encoder, save_encoder
from esmpp.config import load_config
from esmpp.errors import CheckpointError, ConfigError, ImageError
from esmpp.heads import zero_shot_heads
from esmpp.sources import config_sources, zoo_sources
from tests.conftest import TINY_ARCH


def _write_images(folder, colour, count):
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (20, 20), tuple((c + 7 * i) % 256 for c in colour)).save(folder / f"{i:03d}.png")


@pytest.fixture
def config_file(tmp_path):
    torch.manual_seed(0)
    state = build_visual(TINY_ARCH).state_dict()
    save_encoder(Encoder(TINY_ARCH, state, "pretrained"), tmp_path / "pretrained.safetensors")
    tasks = []
    for t, colour in enumerate([(200, 10, 10), (10, 10, 200)]):
        tuned = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
        save_encoder(Encoder(TINY_ARCH, tuned, f"task{t}"), tmp_path / f"task{t}.safetensors")
        save_file({"head": torch.randn(2, 16)}, tmp_path / f"head{t}.safetensors", {"classes": "yes\nno"})
        _write_images(tmp_path / f"proxy{t}", colour, 5)
        for label in ("yes", "no"):
            _write_images(tmp_path / f"val{t}" / label, colour, 2)
        tasks.append(
            {
                "name": f"task{t}",
                "checkpoint": f"task{t}.safetensors",
                "head": f"head{t}.safetensors",
                "proxy": f"proxy{t}",
                "validation": f"val{t}",
            }
        )
    config = {"pretrained": "pretrained.safetensors", "tasks": tasks, "options": {"rank": 2}}
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_config_to_artifact(config_file):
    config = load_config(config_file)
    pretrained, tasks = config_sources(config)
    assert [t.name for t in tasks] == ["task0", "task1"]
    assert tasks[0].classes == ["yes", "no"] and tasks[0].proxy().shape == (5, 3, 16, 16)
    assert tasks[1].validation[0].shape == (4, 3, 16, 16) and tasks[1].validation[1].tolist() == [0, 0, 1, 1]
    artifact = build_artifact(pretrained, tasks, config.options.to_build_options(), progress=False)
    assert artifact.build["rank"] == 2 and len(artifact.build["alpha_history"]) == 10


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(tasks=[]), "tasks"),
        (lambda c: c["tasks"][0].pop("head"), "give `head:`"),
        (lambda c: c["options"].update(routed_kinds=["mlp"]), "routed_kinds"),
        (lambda c: c.update(colour="blue"), "colour"),
        (lambda c: c["tasks"][1].update(name=c["tasks"][0]["name"]), r"task names \['task0'\] are used more than once"),
        (lambda c: c["options"].update(alpha=float("nan")), r"options\.alpha: Input should be a finite number"),
        (lambda c: c["options"].update(alpha=float("inf")), r"options\.alpha: Input should be a finite number"),
        (lambda c: c["options"].update(rank_energy=float("nan")), r"options\.rank_energy: .* finite number"),
        (lambda c: c["options"].update(router_shrinkage=float("-inf")), r"options\.router_shrinkage: .* finite"),
        (lambda c: c["options"].update(rank=0), r"options\.rank: Input should be greater than or equal to 1"),
        (lambda c: c["options"].update(prototypes_per_task=0), r"options\.prototypes_per_task: .* equal to 1"),
        (lambda c: c["options"].update(routed_kinds=[]), r"options\.routed_kinds: List should have at least 1"),
        (lambda c: c.update(proxy_images=0), r"proxy_images: Input should be greater than or equal to 1"),
        (lambda c: c.update(proxy_images=-2), r"proxy_images: Input should be greater than or equal to 1"),
    ],
)
def test_invalid_configs_are_named(config_file, edit, message):
    config = yaml.safe_load(config_file.read_text())
    edit(config)
    config_file.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=message):
        load_config(config_file)


def test_empty_proxy_folder_is_named(config_file):
    for png in (config_file.parent / "proxy1").iterdir():
        png.unlink()
    config = load_config(config_file)
    config.proxy_images = 8
    with pytest.raises(ConfigError, match="proxy1: the proxy folder has no images") as raised:
        config_sources(config)
    assert "(up to `proxy_images`, 8, are used)" in str(raised.value)  # the config's count, not the default


def _slow_preparation(*args, **kwargs) -> NoReturn:
    raise AssertionError("validation images were loaded before every task's files were checked")


@pytest.mark.parametrize(("value", "dtype"), [(float("nan"), torch.float32), (1e300, torch.float64)])
def test_a_head_with_nan_is_named_before_the_build(config_file, monkeypatch, value, dtype):
    monkeypatch.setattr("esmpp.sources.load_labelled_folder", _slow_preparation)  # the first task's
    head = torch.randn(2, 16, dtype=dtype)
    head[1, 3] = value  # 1e300: finite in float64, infinite in the float32 the build uses
    save_file({"head": head}, config_file.parent / "head1.safetensors", {"classes": "yes\nno"})
    with pytest.raises(ConfigError, match=r"head1\.safetensors: the head has NaN or infinite values"):
        config_sources(load_config(config_file))


def test_an_undecodable_proxy_image_of_the_last_task_is_named_before_the_build(config_file, monkeypatch):
    monkeypatch.setattr("esmpp.sources.load_labelled_folder", _slow_preparation)
    image = config_file.parent / "proxy1" / "004.png"
    image.write_bytes(image.read_bytes()[:60])  # a truncated download
    with pytest.raises(ImageError, match=r"proxy1/004\.png: cannot decode the image"):
        config_sources(load_config(config_file))


def test_a_too_elongated_proxy_image_is_named_before_the_build(config_file, monkeypatch):
    """Only decoding was checked up front: a thin strip failed when the build reached its task."""
    monkeypatch.setattr("esmpp.sources.load_labelled_folder", _slow_preparation)
    Image.new("RGB", (300_000, 1)).save(config_file.parent / "proxy1" / "004.png")  # 4,800,000×16 once resized
    with pytest.raises(ImageError, match=r"proxy1/004\.png: 300000×1 is too elongated"):
        config_sources(load_config(config_file))


def _with_options(config_file, **options):
    config = yaml.safe_load(config_file.read_text())
    config["options"].update(options)
    config_file.write_text(yaml.safe_dump(config))
    return load_config(config_file)


def test_a_rank_above_the_layers_width_is_refused_before_the_tasks_load(config_file, monkeypatch):
    monkeypatch.setattr("esmpp.sources.load_labelled_folder", _slow_preparation)
    with pytest.raises(ConfigError, match=r"rank 100000 is more than the 32 directions .* at most 32"):
        config_sources(_with_options(config_file, rank=100_000))


def test_more_prototypes_than_a_tasks_proxy_images_are_refused_before_the_tasks_load(config_file, monkeypatch):
    for name in ("003.png", "004.png"):
        (config_file.parent / "proxy1" / name).unlink()
    config = _with_options(config_file, prototypes_per_task=3)
    assert len(config_sources(config)[1][1].proxy()) == 3  # as many prototypes as images: each image is one
    monkeypatch.setattr("esmpp.sources.load_labelled_folder", _slow_preparation)
    with pytest.raises(
        ConfigError, match=r"prototypes_per_task 4 is more than the 3 proxy images of task 'task1'"
    ) as e:
        config_sources(_with_options(config_file, prototypes_per_task=4))
    # Where proxy_images is the limit, more images in the folder would not help: the advice names both fixes.
    assert "give the task more proxy images, or raise `proxy_images` (now 32) if its folder holds more" in str(e.value)


def test_validation_data_of_only_some_tasks_is_refused_before_the_tasks_load(config_file, monkeypatch):
    config = yaml.safe_load(config_file.read_text())
    del config["tasks"][1]["validation"]
    config_file.write_text(yaml.safe_dump(config))
    monkeypatch.setattr("esmpp.sources.load_labelled_folder", _slow_preparation)
    with pytest.raises(ConfigError, match=r"tasks \['task1'\] have no validation data but the other tasks do"):
        config_sources(load_config(config_file))
    monkeypatch.undo()
    tasks = config_sources(_with_options(config_file, alpha=0.5))[1]  # α given: the validation data is not needed
    assert tasks[0].validation is not None and tasks[1].validation is None


def test_a_validation_folder_without_images_of_the_last_task_is_named_before_the_slow_work(config_file, monkeypatch):
    """It used to be found in the slow pass, after the first tasks' validation images had loaded and after the
    CLI had made the folder for --out (before_slow_work)."""
    monkeypatch.setattr("esmpp.sources.load_labelled_folder", _slow_preparation)
    shutil.rmtree(config_file.parent / "val1" / "yes")
    shutil.rmtree(config_file.parent / "val1" / "no")
    before = []
    with pytest.raises(ConfigError, match=r"val1: no validation images; expected subfolders named after the"):
        config_sources(load_config(config_file), before_slow_work=lambda: before.append("called"))
    assert before == []


def test_an_undecodable_validation_image_of_the_last_task_is_named_before_the_slow_work(config_file, monkeypatch):
    """Validation images were decoded only in the slow pass, after the CLI had made the folder for --out."""
    monkeypatch.setattr("esmpp.sources.load_labelled_folder", _slow_preparation)
    image = next((config_file.parent / "val1" / "no").iterdir())
    image.write_bytes(image.read_bytes()[:60])  # a truncated download
    before = []
    with pytest.raises(ImageError, match=rf"val1/no/{image.name}: cannot decode the image"):
        config_sources(load_config(config_file), before_slow_work=lambda: before.append("called"))
    assert before == []


def test_a_zero_shot_task_without_a_text_tower_is_named_before_the_slow_work(config_file, monkeypatch):
    """A task with class names and no head file needs the pretrained CLIP's text tower and an open_clip model
    name; here it has neither (a visual tower of the custom 'tiny'), found only after the CLI had made the
    folder for --out."""
    config = yaml.safe_load(config_file.read_text())
    del config["tasks"][1]["head"]
    config["tasks"][1]["classes"] = ["yes", "no"]
    config_file.write_text(yaml.safe_dump(config))
    monkeypatch.setattr("esmpp.sources.load_labelled_folder", _slow_preparation)
    before = []
    with pytest.raises(
        ConfigError, match=r"zero-shot heads need an open_clip model name \(e\.g\. ViT-B-32\), got 'tiny'"
    ):
        config_sources(load_config(config_file), before_slow_work=lambda: before.append("called"))
    assert before == []


def test_the_zero_shot_heads_of_a_config_read_the_pretrained_checkpoint_once(tiny_clip, tmp_path, monkeypatch):
    """Each task's zero-shot head used to read the whole pretrained CLIP again (hundreds of MB for a ViT-B)."""
    _, clip = tiny_clip
    class_lists = {"pets": ["cat", "dog"], "vehicles": ["car"], "colours": ["red", "green", "blue"]}
    for name in class_lists:
        _write_images(tmp_path / name, (200, 10, 10), 2)
    config = {
        "architecture": "esmpp-test-clip",
        "pretrained": str(clip),
        "tasks": [
            {"name": name, "checkpoint": str(clip), "classes": classes, "proxy": name}
            for name, classes in class_lists.items()
        ],
        "options": {"rank": 2},
    }
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(config))
    loads = []
    monkeypatch.setattr(heads, "load_file", lambda *args: loads.append(args) or load_file(*args))
    _, tasks = config_sources(load_config(tmp_path / "build.yaml"))
    assert len(loads) == 1
    for task, classes in zip(tasks, class_lists.values(), strict=True):
        assert task.classes == classes
        torch.testing.assert_close(task.head, zero_shot_heads(clip, "esmpp-test-clip", [classes])[0])


def test_a_missing_checkpoint_is_named_before_any_task_loads(config_file):
    (config_file.parent / "task1.safetensors").unlink()  # the last task: found only after the others, before
    with pytest.raises(CheckpointError, match=r"task1\.safetensors does not exist"):
        config_sources(load_config(config_file))


def test_a_checkpoint_of_another_architecture_is_named_before_any_task_loads(config_file):
    deeper = dataclasses.replace(TINY_ARCH, vision={**TINY_ARCH.vision, "layers": 3})
    save_encoder(Encoder(deeper, build_visual(deeper).state_dict(), "task1"), config_file.parent / "task1.safetensors")
    with pytest.raises(
        CheckpointError, match=r"task1\.safetensors: 12 keys are not part of architecture 'tiny'"
    ) as raised:
        config_sources(load_config(config_file))
    assert "must be fine-tuned from the pretrained one" in str(raised.value) and "task 'task1'" in str(raised.value)


def test_missing_config_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("tasks: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_zoo_sources_refuse_a_task_the_zoo_lacks_in_the_words_of_the_cli(tiny_zoo):
    with pytest.raises(ConfigError) as raised:
        zoo_sources(tiny_zoo, ["digits", "typo"])
    assert str(raised.value).startswith(
        "tasks: the tiny zoo has no task 'typo'; its tasks are digits, faces, stripes, colours."
    )
    _, (task,) = zoo_sources(tiny_zoo, ["faces"])
    assert task.name == "faces" and task.proxy_count == len(task.proxy()) == 32
