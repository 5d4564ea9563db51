"""Architectures are data: an open_clip vision config plus the preprocessing it expects.

The canonical form of every encoder in esmpp is an open_clip *visual tower* state dict (keys such as
``transformer.resblocks.0.attn.in_proj_weight``, no ``visual.`` prefix) together with an
:class:`Architecture`. ``build_visual`` turns an architecture into an ``nn.Module`` with open_clip's own
factory, so nothing here hard-codes ViT-B/32.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from esmpp.errors import ArchitectureError

# The four linear kinds of a transformer block, by their open_clip parameter names.
LINEAR_KINDS: dict[str, str] = {
    "qkv": "attn.in_proj_weight",
    "out": "attn.out_proj.weight",
    "fc": "mlp.c_fc.weight",
    "proj": "mlp.c_proj.weight",
}
_BLOCK_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
# The patch embedding (open_clip's ``conv1``: kernel = stride = patch size, no bias) is a linear map of each
# flattened patch [3·p·p] → [width], so ESM++ can give it experts like the blocks' linear layers. Fine-tuning
# moves it more than any other single weight on the zoo (see README), and no block's expert can make up
# for it: its change reaches every later layer through the residual stream.
PATCH_KEY = "conv1.weight"
ROUTED_KINDS = ("patch", *LINEAR_KINDS)


@dataclass(frozen=True)
class Architecture:
    """An open_clip vision tower: ``vision`` holds ``CLIPVisionCfg`` fields (image_size, layers, width,
    patch_size, head_width, mlp_ratio, ...), ``embed_dim`` the output embedding size."""

    embed_dim: int
    vision: dict[str, Any]
    name: str = "custom"
    mean: tuple[float, float, float] = tuple(OPENAI_DATASET_MEAN)  # type: ignore[assignment]
    std: tuple[float, float, float] = tuple(OPENAI_DATASET_STD)  # type: ignore[assignment]
    quick_gelu: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        size = self.vision.get("image_size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def width(self) -> int:
        return int(self.vision["width"])

    @property
    def layers(self) -> int:
        return int(self.vision["layers"])

    @classmethod
    def from_name(cls, name: str) -> Architecture:
        """An open_clip model name such as ``ViT-B-32`` (any config open_clip knows)."""
        import open_clip

        config = open_clip.get_model_config(name)
        if config is None:
            known = ", ".join(n for n in open_clip.list_models() if n.startswith("ViT"))[:400]
            raise ArchitectureError(
                f"Unknown architecture {name!r}. Use an open_clip model name (e.g. {known}, ...); in Python, "
                "an esmpp.architecture.Architecture describes a custom one."
            )
        return cls(
            embed_dim=int(config["embed_dim"]),
            vision=dict(config["vision_cfg"]),
            name=name,
            quick_gelu=bool(config.get("quick_gelu", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        """The architecture a manifest or checkpoint metadata describes; anything else (a number, a list, a dict
        missing keys or with invalid values) raises ``ArchitectureError``, as these come from files."""
        if not isinstance(data, dict):
            raise ArchitectureError(
                f"Invalid architecture description {data!r}: expected a mapping with keys 'embed_dim' and 'vision'."
            )
        try:
            mean = tuple(float(v) for v in data.get("mean", OPENAI_DATASET_MEAN))
            std = tuple(float(v) for v in data.get("std", OPENAI_DATASET_STD))
            # Normalisation is per RGB channel: three finite means, three finite positive deviations.
            if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
                raise ValueError(f"mean {mean} and std {std} must be 3 finite values each, std positive")
            return cls(
                embed_dim=int(data["embed_dim"]),
                vision=dict(data["vision"]),
                name=str(data.get("name", "custom")),
                mean=mean,  # type: ignore[arg-type]
                std=std,  # type: ignore[arg-type]
                quick_gelu=bool(data.get("quick_gelu", False)),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ArchitectureError(
                f"Invalid architecture description {data!r}: {exc}. Expected keys 'embed_dim' and 'vision'."
            ) from exc


def build_visual(arch: Architecture) -> torch.nn.Module:
    """A randomly initialised open_clip vision tower of ``arch`` (eval mode, float32)."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    try:
        cfg = CLIPVisionCfg(**arch.vision)
        visual = _build_vision_tower(arch.embed_dim, cfg, quick_gelu=arch.quick_gelu)
    # Configs come from files (manifests, hub configs): open_clip fails on nonsense values in many ways
    # (ZeroDivisionError for width 0, AssertionError, RuntimeError for negative sizes, ...).
    except Exception as exc:
        raise ArchitectureError(f"Invalid open_clip vision config {arch.vision!r}: {exc}") from exc
    return visual.eval()


def weight_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """The state-dict keys of ``arch``'s vision tower and their shapes, from a tower built on the meta device
    (nothing allocated: a few ms for ViT-L/14)."""
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in build_visual(arch).state_dict().items()}


def linear_kind(key: str) -> str | None:
    """The linear kind (``qkv``/``out``/``fc``/``proj``) of a visual state-dict key, or None."""
    match = _BLOCK_KEY.match(key)
    if match is None:
        return None
    for kind, suffix in LINEAR_KINDS.items():
        if match.group(2) == suffix:
            return kind
    return None


def block_index(key: str) -> int | None:
    """The transformer block a visual state-dict key belongs to, or None outside the blocks."""
    match = _BLOCK_KEY.match(key)
    return int(match.group(1)) if match else None


def linear_key(block: int, kind: str) -> str:
    """The weight key of linear ``kind`` in ``block``, e.g. ``transformer.resblocks.3.mlp.c_fc.weight``."""
    return f"transformer.resblocks.{block}.{LINEAR_KINDS[kind]}"


def linear_keys(arch: Architecture, kinds: tuple[str, ...] = tuple(LINEAR_KINDS)) -> list[str]:
    """All weight keys of the given linear kinds, block by block."""
    return [linear_key(block, kind) for block in range(arch.layers) for kind in kinds]


def routed_kind(key: str) -> str | None:
    """The kind ESM++ can route a weight key as: ``patch`` for the patch embedding, else its linear kind."""
    return "patch" if key == PATCH_KEY else linear_kind(key)


def routed_keys(arch: Architecture, kinds: tuple[str, ...]) -> list[str]:
    """The weight keys of the routed ``kinds`` (from ``ROUTED_KINDS``) in execution order."""
    blocks = tuple(kind for kind in LINEAR_KINDS if kind in kinds)
    return ([PATCH_KEY] if "patch" in kinds else []) + linear_keys(arch, blocks)


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A routed weight as the matrix it applies: [d_out, d_in]; the patch embedding [width, 3, p, p] →
    [width, 3·p·p] (channels, then rows, then columns of a patch)."""
    return weight.reshape(weight.shape[0], -1)
