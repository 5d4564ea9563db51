"""The build config (YAML): one place for every default of `esmpp build`.

Relative paths are resolved against the config file's folder. Example::

    architecture: ViT-B-32            # optional: inferred from the checkpoint's shapes
    pretrained: checkpoints/pretrained.pt
    tasks:
      - name: cars
        checkpoint: checkpoints/cars.pt
        head: heads/cars.safetensors   # tensor "head" [classes, embed_dim]; logits = normalize(emb) @ head.T
        classes: [audi, bmw, ...]      # optional with a head file that carries them; without a head file,
                                       # a zero-shot head is built with the pretrained CLIP's text tower
        proxy: proxy/cars              # a folder of unlabeled images (the first `proxy_images` are used)
        validation: val/cars           # optional (every task or none): one subfolder per class, for choosing α
    proxy_images: 32                  # optional: how many images of each proxy folder are used (default 32)
    options:
      method: esm
      rank: 32
      routed_kinds: [qkv, fc]
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from esmpp.artifact import repeated_names
from esmpp.build import OptionsConfig
from esmpp.errors import ConfigError, validation_problems


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    checkpoint: Path
    head: Path | None = None
    classes: list[str] | None = None
    proxy: Path
    validation: Path | None = None

    @model_validator(mode="after")
    def _head_or_classes(self) -> TaskConfig:
        if self.head is None and not self.classes:
            raise ValueError("give `head:` (a head file) or `classes:` (for a zero-shot head from the text tower)")
        return self


class BuildConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    architecture: str | None = None
    pretrained: Path
    tasks: list[TaskConfig] = Field(min_length=1)
    allow_pickle: bool = False
    proxy_images: int = Field(32, ge=1)  # a count ≤ 0 would slice the proxy folder's list from its end
    options: OptionsConfig = Field(default_factory=OptionsConfig)

    @model_validator(mode="after")
    def _distinct_task_names(self) -> BuildConfig:
        repeated = repeated_names([task.name for task in self.tasks])
        if repeated:  # the artifact refuses them: say so before the build, not at its final save
            raise ValueError(f"task names {repeated} are used more than once; give each task its own name")
        return self


def load_config(path: Path) -> BuildConfig:
    """Parse and validate a YAML build config; relative paths become relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file. See `esmpp build --help` for an example.")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}).") from exc
    try:
        config = BuildConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {validation_problems(exc)}.") from exc
    base = path.parent
    config.pretrained = base / config.pretrained
    for task in config.tasks:
        task.checkpoint, task.proxy = base / task.checkpoint, base / task.proxy
        task.head = base / task.head if task.head else None
        task.validation = base / task.validation if task.validation else None
    return config
