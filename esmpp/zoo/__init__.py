"""The offline model zoo: a small pretrained CLIP-style ViT and experts fine-tuned on distinct tasks."""

from esmpp.zoo.build import build_zoo, default_root
from esmpp.zoo.presets import PRESETS, ZooPreset, check_zoo_tasks, get_preset
from esmpp.zoo.store import Zoo

__all__ = ["PRESETS", "Zoo", "ZooPreset", "build_zoo", "check_zoo_tasks", "default_root", "get_preset"]
