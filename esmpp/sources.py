"""Where tasks come from: a YAML build config (user files) or the offline zoo. Both become ``TaskSource``s."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from esmpp.architecture import Architecture
from esmpp.build import BuildOptions, check_alpha_search, check_prototypes_per_task, check_rank
from esmpp.checkpoints import Encoder, load_encoder, probe_checkpoint
from esmpp.config import BuildConfig
from esmpp.errors import ConfigError
from esmpp.heads import check_zero_shot_source, zero_shot_heads
from esmpp.images import check_image_file, preprocess_images, preprocess_uint8
from esmpp.merge import TaskSource
from esmpp.zoo import check_zoo_tasks

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted (so builds are deterministic)."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder of images.")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def proxy_files(folder: Path, count: int, image_size: int) -> list[Path]:
    """The first ``count`` images of ``folder`` (sorted by name): at least one, else a ConfigError, and each
    one usable by a model of ``image_size``, else the ImageError naming it (now, not when the build reaches the
    task)."""
    files = image_files(folder)[:count]
    if not files:
        raise ConfigError(
            f"{folder}: the proxy folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))}). "
            f"Put a few unlabeled training images of the task there (up to `proxy_images`, {count}, are used)."
        )
    for file in files:
        check_image_file(file, image_size)
    return files


def labelled_files(folder: Path, classes: list[str], image_size: int) -> tuple[list[Path], list[int]]:
    """The images of a folder with one subfolder per class (named as in ``classes``) and their labels (class
    indices): at least one image, else a ConfigError, and each one usable by a model of ``image_size``, else the
    ImageError naming it (checked for every task before the slow work, as proxy images are)."""
    images, labels = [], []
    for label, name in enumerate(classes):
        files = image_files(folder / name) if (folder / name).is_dir() else []
        images.extend(files)
        labels.extend([label] * len(files))
    if not images:
        raise ConfigError(f"{folder}: no validation images; expected subfolders named after the classes {classes[:5]}.")
    for image in images:
        check_image_file(image, image_size)
    return images, labels


def load_labelled_folder(files: list[Path], labels: list[int], arch: Architecture) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``files`` of :func:`labelled_files` → images [N,3,H,W] as ``arch`` takes them, labels [N]."""
    return preprocess_images(files, arch), torch.tensor(labels)


def load_head(path: Path, classes: list[str] | None, embed_dim: int) -> tuple[torch.Tensor, list[str]]:
    """A head file: safetensors with tensor ``head`` [C, embed_dim] (class names may be stored in its
    metadata as ``classes``, one per line)."""
    from safetensors import safe_open

    try:
        head = load_file(path)["head"]
        with safe_open(path, framework="pt") as handle:
            stored = (handle.metadata() or {}).get("classes")
    except (FileNotFoundError, SafetensorError, OSError, KeyError) as exc:
        raise ConfigError(
            f"{path}: cannot read a head ({exc}). "
            f"Expected a safetensors file with a tensor 'head' [classes, {embed_dim}]."
        ) from exc
    names = classes or (stored.split("\n") if stored else None)
    if names is None:
        names = [str(i) for i in range(head.shape[0])]
    if head.ndim != 2 or head.shape[1] != embed_dim or head.shape[0] != len(names):
        raise ConfigError(
            f"{path}: head has shape {tuple(head.shape)}, expected ({len(names)}, {embed_dim}) (classes × embed_dim)."
        )
    head = head.float()  # as the build uses it: a float64 value beyond float32's range is infinite here
    if not torch.isfinite(head).all():  # the artifact refuses it: say so before the build, naming this file
        raise ConfigError(f"{path}: the head has NaN or infinite values. Export the task's classifier head again.")
    return head, names


def config_sources(
    config: BuildConfig,
    options: BuildOptions | None = None,
    before_slow_work: Callable[[], None] | None = None,
) -> tuple[Encoder, list[TaskSource]]:
    """The pretrained encoder and the task sources of a build config, for a build with ``options`` (default:
    the config's own). Every task's files are checked first, before anything slow (a zero-shot head,
    validation images): the checkpoint (its header, see :func:`probe_checkpoint`), the head file, the proxy
    images and the validation folder's listing; so are the rules of ``options`` that depend on them (the rank
    on the layers' widths, the prototypes per task on the proxy images, an α search on the validation data of
    every task). Then ``before_slow_work`` is called, if given: the place for the caller's own checks that
    must pass before the slow part but only once the config's files are good (the CLI's of --out). Checkpoints
    and proxy images load lazily."""
    options = options or config.options.to_build_options()
    check_alpha_search(options, {task.name: task.validation is not None for task in config.tasks})
    pretrained = load_encoder(config.pretrained, arch=config.architecture, allow_pickle=config.allow_pickle)
    arch = pretrained.arch
    check_rank(options, pretrained.arch)
    heads: dict[str, tuple[torch.Tensor, list[str]]] = {}  # of the tasks with a head file; zero-shot ones below
    proxies: dict[str, list[Path]] = {}
    validation_files: dict[str, tuple[list[Path], list[int]]] = {}
    for task in config.tasks:
        probe_checkpoint(
            task.checkpoint,
            arch,
            fix=f"Task checkpoints must be fine-tuned from the pretrained one ({config.pretrained}, {arch.name}): "
            f"check the checkpoint of task {task.name!r}",
            allow_pickle=config.allow_pickle,
        )
        if task.head is not None:
            heads[task.name] = load_head(task.head, task.classes, arch.embed_dim)
        proxies[task.name] = proxy_files(task.proxy, config.proxy_images, arch.image_size)
        if task.validation is not None:
            classes = heads[task.name][1] if task.head is not None else task.classes
            validation_files[task.name] = labelled_files(task.validation, classes, arch.image_size)
    zero_shot = [task for task in config.tasks if task.head is None]
    if zero_shot:  # their heads come after --out is checked
        check_zero_shot_source(config.pretrained, arch.name)
    check_prototypes_per_task(
        options,
        {name: len(files) for name, files in proxies.items()},
        # The folder may hold more than proxy_images lets the build use: either change helps.
        f"give the task more proxy images, or raise `proxy_images` (now {config.proxy_images}) if its folder holds "
        "more",
    )
    if before_slow_work is not None:
        before_slow_work()
    if zero_shot:  # one read of the pretrained CLIP for all of them
        made = zero_shot_heads(config.pretrained, arch.name, [task.classes for task in zero_shot])
        heads |= {task.name: (head, task.classes) for task, head in zip(zero_shot, made)}
    tasks = []
    for task in config.tasks:
        head, classes = heads[task.name]
        tasks.append(
            TaskSource(
                name=task.name,
                load=partial(load_encoder, task.checkpoint, arch, config.allow_pickle),
                proxy=partial(preprocess_images, proxies[task.name], arch),
                proxy_count=len(proxies[task.name]),
                head=head,
                classes=classes,
                validation=(
                    load_labelled_folder(*validation_files[task.name], arch) if task.name in validation_files else None
                ),
            )
        )
    return pretrained, tasks


def zoo_sources(zoo, tasks: list[str] | None = None) -> tuple[Encoder, list[TaskSource]]:
    """The pretrained encoder and task sources of an offline zoo (proxy: its proxy split, training images,
    loaded when asked for; validation: its validation split)."""
    check_zoo_tasks(tasks or [], zoo.preset_name, zoo.tasks, "tasks", "Choose among them, or pass None for all.")
    pretrained = load_encoder(zoo.pretrained_path, arch=zoo.arch)
    sources = []
    for name in tasks or zoo.tasks:
        val_images, val_labels = zoo.split(name, "val")
        sources.append(
            TaskSource(
                name=name,
                load=partial(load_encoder, zoo.finetuned_path(name), zoo.arch),
                proxy=partial(_zoo_proxy, zoo, name),
                proxy_count=len(zoo.split(name, "proxy")[1]),  # the zoo's data file is read (and cached) above
                head=zoo.head(name).float(),
                classes=list(zoo.class_names(name)),
                validation=(preprocess_uint8(val_images, zoo.arch), torch.as_tensor(val_labels).long()),
            )
        )
    return pretrained, sources


def _zoo_proxy(zoo, task: str) -> torch.Tensor:
    images, _ = zoo.split(task, "proxy")
    return preprocess_uint8(images, zoo.arch)
