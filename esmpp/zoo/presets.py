"""Zoo recipes as data: the architecture, tasks, split sizes, training schedules and seeds of a preset.

``tiny`` is the test fixture (seconds); ``mini`` is the accuracy benchmark every merging method is
judged by (minutes on a laptop CPU). A preset is a pydantic model, so a variant is
``get_preset("mini").model_copy(update=...)`` and the whole recipe goes into the zoo manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from esmpp.architecture import Architecture
from esmpp.errors import ConfigError


class SplitSizes(BaseModel):
    """Images per split and task (real data sets may have fewer; see ``datasets.load_task``)."""

    model_config = ConfigDict(frozen=True)
    train: int = Field(gt=0)
    val: int = Field(gt=0)
    test: int = Field(gt=0)
    proxy: int = Field(default=32, gt=0)


class TrainRecipe(BaseModel):
    """AdamW with linear warm-up and cosine decay to zero."""

    model_config = ConfigDict(frozen=True)
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)


class PretrainRecipe(TrainRecipe):
    """Pretraining by distillation (``esmpp.zoo.distill``): ``crops`` photo crops, embedded once by the
    ImageNet teacher at ``teacher_size`` pixels; the student learns to predict the teacher's features."""

    crops: int = Field(gt=0)
    teacher_size: int = Field(default=64, gt=0)


class ZooPreset(BaseModel):
    """Everything that determines a zoo's bytes."""

    model_config = ConfigDict(frozen=True)
    name: str
    architecture: dict[str, Any]
    tasks: tuple[str, ...]
    sizes: SplitSizes
    pretrain: PretrainRecipe
    finetune: TrainRecipe
    # Heads are normalised class means of pretrained features times this scale (CLIP's logit scale role).
    head_scale: float = Field(gt=0)
    # Fine-tuning shifts each batch by up to this many pixels (edge-replicated), for small tasks.
    max_shift: int = Field(default=2, ge=0)
    seed: int = 0

    @property
    def arch(self) -> Architecture:
        return Architecture.from_dict(self.architecture)


def _vit(name: str, image_size: int, width: int, layers: int, patch_size: int, head_width: int) -> dict[str, Any]:
    vision = {
        "image_size": image_size,
        "layers": layers,
        "width": width,
        "patch_size": patch_size,
        "head_width": head_width,
        "mlp_ratio": 4.0,
    }
    return Architecture(embed_dim=width, vision=vision, name=name).to_dict()


PRESETS: dict[str, ZooPreset] = {
    "tiny": ZooPreset(
        name="tiny",
        architecture=_vit("zoo-tiny", image_size=16, width=32, layers=2, patch_size=4, head_width=16),
        tasks=("digits", "faces", "stripes", "colours"),
        sizes=SplitSizes(train=256, val=64, test=64, proxy=32),
        pretrain=PretrainRecipe(steps=200, batch_size=64, lr=2e-3, weight_decay=0.05, crops=1024, teacher_size=32),
        finetune=TrainRecipe(steps=200, batch_size=32, lr=2e-3, weight_decay=0.1),
        head_scale=16.0,
        max_shift=1,
    ),
    "mini": ZooPreset(
        name="mini",
        architecture=_vit("zoo-mini", image_size=32, width=128, layers=6, patch_size=8, head_width=32),
        tasks=("mnist", "digits", "faces", "textures", "textile", "shapes", "stripes", "colours"),
        sizes=SplitSizes(train=3000, val=500, test=500, proxy=32),
        pretrain=PretrainRecipe(steps=1200, batch_size=128, lr=1e-3, weight_decay=0.05, crops=12000, teacher_size=64),
        finetune=TrainRecipe(steps=500, batch_size=64, lr=1e-3, weight_decay=0.1),
        head_scale=16.0,
    ),
}


def check_zoo_tasks(names: Sequence[str], zoo: str, available: Sequence[str], where: str, fix: str) -> None:
    """Refuse the task ``names`` that the zoo ``zoo`` (its preset's name) lacks, ``available`` being its tasks:
    its preset's, known before the zoo is built, or a built zoo's. ``where``: the input that named them;
    ``fix``: what to do instead."""
    missing = [name for name in names if name not in available]
    if missing:
        raise ConfigError(
            f"{where}: the {zoo} zoo has no task {', '.join(map(repr, missing))}; its tasks are "
            f"{', '.join(available)}. {fix}"
        )


def get_preset(name: str) -> ZooPreset:
    """The preset called ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown zoo preset {name!r}. Choose one of: {', '.join(PRESETS)}.")
    return PRESETS[name]
