"""Build a zoo: pretrain one encoder by distilling an ImageNet CNN on photo crops, then fine-tune one expert per task.

Deterministic (fixed seeds, deterministic torch algorithms: same preset, same machine → identical
checkpoint bytes), cached (a directory with a manifest is reused unless ``force``), and atomic (built in a
temporary directory next to the destination, then renamed into place).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from esmpp.architecture import Architecture, build_visual
from esmpp.atomic import atomic_directory, claimed_destination
from esmpp.checkpoints import Encoder, save_encoder
from esmpp.evaluation import accuracy
from esmpp.folders import is_zoo
from esmpp.images import preprocess_uint8
from esmpp.zoo import distill
from esmpp.zoo.datasets import SPLITS, TaskData, load_task, task_seed
from esmpp.zoo.presets import ZooPreset, get_preset
from esmpp.zoo.store import (
    DATA,
    FINETUNED,
    FORMAT_VERSION,
    HEAD,
    MANIFEST,
    PRETRAINED,
    Zoo,
)
from esmpp.zoo.training import Batch, class_mean_head, shifted, train


def default_root(preset: str) -> Path:
    """``$ESMPP_CACHE/zoo/<preset>``, or ``~/.cache/esmpp/zoo/<preset>`` without ``ESMPP_CACHE``."""
    cache = os.environ.get("ESMPP_CACHE")
    base = Path(cache) if cache else Path.home() / ".cache" / "esmpp"
    return base / "zoo" / preset


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch, force deterministic kernels and one intra-op thread for the block; restore the
    caller's state after. One thread because the zoo's models are small: the bytes then do not depend
    on the machine's core count, and on a busy CPU multi-threaded small kernels spend most of their
    time spinning at barriers (measured: tiny took > 5x longer with 2 threads than with 1 under load)."""
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous_deterministic)
            torch.set_num_threads(previous_threads)


def save_checkpoint(state: dict[str, torch.Tensor], arch: Architecture, path: Path) -> None:
    """Write a visual state dict as esmpp's encoder format (architecture in the safetensors metadata)."""
    save_encoder(Encoder(arch, {key: value.detach() for key, value in state.items()}, str(path)), path)


def _distillation_batches(recipe: ZooPreset, arch: Architecture) -> tuple[torch.Tensor, Iterator[Batch]]:
    """The trainable projection [embed_dim, 1280] (random init) and an endless stream of seeded batches of
    (student-size photo crops, standardised teacher features)."""
    pretrain = recipe.pretrain
    student_images, teacher_images = distill.photo_crops(
        pretrain.crops, (arch.image_size, pretrain.teacher_size), np.random.default_rng(recipe.seed)
    )
    pixels, targets = preprocess_uint8(student_images, arch), distill.teacher_features(teacher_images)
    generator = torch.Generator().manual_seed(recipe.seed)

    def stream() -> Iterator[Batch]:
        while True:
            index = torch.randint(0, len(pixels), (pretrain.batch_size,), generator=generator)
            yield pixels[index], targets[index]

    projection = torch.randn(arch.embed_dim, distill.TEACHER_FEATURES) / arch.embed_dim**0.5
    return projection.requires_grad_(True), stream()


def _task_batches(recipe: ZooPreset, task: TaskData, arch: Architecture) -> Iterator[Batch]:
    """Endless seeded minibatches (with random shifts) from a task's train split."""
    images, labels = task.splits["train"]
    pixels, targets = preprocess_uint8(images, arch), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(task_seed(recipe.seed, task.name))
    while True:
        index = torch.randint(0, len(pixels), (recipe.finetune.batch_size,), generator=generator)
        yield shifted(pixels[index], recipe.max_shift, generator), targets[index]


def _accuracies(encoder: torch.nn.Module, task: TaskData, head: torch.Tensor, arch: Architecture) -> dict[str, float]:
    return {split: accuracy(encoder, *task.splits[split], head, arch) for split in ("val", "test")}


def _build_into(recipe: ZooPreset, root: Path, progress: bool) -> dict[str, Any]:
    """Write every file of the zoo into ``root``; return the manifest (also written, last).
    Run it inside ``deterministic``: the only draws from torch's global generator are the model's
    initialisation and the pretraining head; batches come from seeded generators of their own."""
    start, start_cpu = time.perf_counter(), time.process_time()
    arch = recipe.arch
    sizes = recipe.sizes
    tasks = {
        name: load_task(
            name,
            arch.image_size,
            train=sizes.train,
            val=sizes.val,
            test=sizes.test,
            proxy=sizes.proxy,
            seed=recipe.seed,
        )
        for name in tqdm(recipe.tasks, desc="datasets", disable=not progress, leave=False)
    }
    encoder = build_visual(arch)
    projection, crops = _distillation_batches(recipe, arch)
    train(
        encoder,
        projection,
        lambda: next(crops),
        recipe.pretrain,
        description="pretrain (distillation)",
        progress=progress,
        loss=distill.distillation_loss,
    )
    pretrained = {key: value.clone() for key, value in encoder.state_dict().items()}
    save_checkpoint(pretrained, arch, root / PRETRAINED)
    pretrain_seconds = time.perf_counter() - start

    task_entries = {}
    for name, task in tasks.items():
        task_dir = root / "tasks" / name
        task_dir.mkdir(parents=True)
        np.savez_compressed(
            task_dir / DATA,
            **{
                f"{split}_{part}": array
                for split in SPLITS
                for part, array in zip(("images", "labels"), task.splits[split], strict=True)
            },
        )
        encoder.load_state_dict(pretrained)
        encoder.eval()
        head = class_mean_head(encoder, *task.splits["train"], len(task.class_names), arch, recipe.head_scale)
        save_file({"head": head.contiguous()}, task_dir / HEAD)
        pretrained_accuracy = _accuracies(encoder, task, head, arch)
        batches = _task_batches(recipe, task, arch)
        train(
            encoder,
            head,
            lambda b=batches: next(b),
            recipe.finetune,
            description=f"fine-tune {name}",
            progress=progress,
        )
        save_checkpoint(encoder.state_dict(), arch, task_dir / FINETUNED)
        task_entries[name] = {
            "source": task.source,
            "class_names": list(task.class_names),
            "sizes": {split: len(task.splits[split][1]) for split in SPLITS},
            "accuracy": {
                "pretrained": pretrained_accuracy,
                "finetuned": _accuracies(encoder, task, head, arch),
            },
        }

    manifest = {
        "format_version": FORMAT_VERSION,
        "preset": recipe.model_dump(mode="json"),
        "architecture": arch.to_dict(),
        "tasks": task_entries,
        # Wall time depends on what else runs; CPU time (one thread) is what an idle machine needs.
        "build_seconds": {
            "pretrain": pretrain_seconds,
            "total": time.perf_counter() - start,
            "cpu": time.process_time() - start_cpu,
        },
        "torch_version": torch.__version__,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def build_zoo(
    preset: str | ZooPreset = "mini", root: Path | None = None, force: bool = False, progress: bool = True
) -> Zoo:
    """Build the zoo of ``preset`` (a name or a ``ZooPreset``) into ``root`` (default ``default_root``),
    or open the complete build already there unless ``force``. While another esmpp process builds that zoo,
    this one says so on stderr, waits, and opens the other's zoo (or builds it, if the other one failed)."""
    recipe = get_preset(preset) if isinstance(preset, str) else preset
    # A zoo that cannot be written is moved by the setting that placed it: ESMPP_CACHE, or the root given.
    elsewhere = "set ESMPP_CACHE to another folder" if root is None else "choose another folder for the zoo"
    if root is None:
        root = default_root(recipe.name)
        # The cache's folder is made first so that two first runs on a new machine can claim the zoo below.
        with contextlib.suppress(OSError):  # an unwritable cache: atomic_directory says so, naming ESMPP_CACHE
            root.parent.mkdir(parents=True, exist_ok=True)
    root = Path(root)
    if (root / MANIFEST).is_file() and not force:
        return Zoo.load(root, elsewhere)
    # Another process building this zoo now is waited for, and its zoo used, rather than built twice.
    with claimed_destination(root, elsewhere, on_busy=_say_waiting):
        if (root / MANIFEST).is_file() and not force:
            return Zoo.load(root, elsewhere)
        # Replaces an older zoo (--force, or a format this esmpp no longer reads), never a folder of the user's
        # nor an artifact (it has a manifest.json too).
        with (
            atomic_directory(root, overwrite=True, elsewhere=elsewhere, marker=MANIFEST, owns=is_zoo) as staging,
            deterministic(recipe.seed),
        ):
            _build_into(recipe, staging, progress)
    return Zoo.load(root)


def _say_waiting(claim: Path) -> None:
    """Tell the user why ``build_zoo`` waits, on stderr even without progress bars: it may be minutes."""
    print(f"esmpp: another esmpp process is building this zoo now (it holds {claim}); waiting for it", file=sys.stderr)
