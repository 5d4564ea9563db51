"""Zero-shot task heads from class names, with the pretrained CLIP's own text tower.

A head is a matrix [classes, embed_dim] used as ``logits = normalize(embedding) @ head.T``; the zero-shot
head is CLIP's: each row the normalised mean of the normalised text embeddings of the class name in a few
prompt templates, times the model's logit scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from esmpp.errors import ConfigError

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
)
_TEXT_KEYS = ("token_embedding.weight", "text_projection", "ln_final.weight")
_PREFIXES = ("module.", "model.", "clip_model.")


def _full_state(path: Path, keys_only: bool = False) -> dict[str, Any]:
    """The whole CLIP state dict in ``path``, its keys without a prefix that all share; with ``keys_only``, a
    safetensors file's keys alone (values None: its header is read, not its tensors)."""
    try:
        if path.suffix == ".safetensors" and keys_only:
            with safe_open(path, framework="pt") as handle:
                state = dict.fromkeys(handle.keys())
        elif path.suffix == ".safetensors":
            state = load_file(path)
        else:  # a torch file is read whole either way
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, SafetensorError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the pretrained checkpoint for zero-shot heads ({exc}).") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: not a state dict; zero-shot heads need a whole open_clip CLIP checkpoint.")
    for prefix in _PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _check_model_name(model_name: str) -> None:
    import open_clip

    if open_clip.get_model_config(model_name) is None:
        raise ConfigError(
            f"zero-shot heads need an open_clip model name (e.g. ViT-B-32), got {model_name!r}. "
            "Set `architecture:` in the config, or give a head file instead."
        )


def _check_text_tower(checkpoint: Path, state: dict[str, Any]) -> None:
    missing = [key for key in _TEXT_KEYS if key not in state]
    if missing:
        raise ConfigError(
            f"{checkpoint}: has no text tower (missing {missing}), so class names cannot become a zero-shot head. "
            "Give the task a head file (`head:`) or a whole-CLIP pretrained checkpoint."
        )


def check_zero_shot_source(checkpoint: Path, model_name: str) -> None:
    """Raise now the ``ConfigError`` that :func:`zero_shot_heads` would raise for an unknown ``model_name`` or a
    ``checkpoint`` without a text tower, reading only a safetensors file's keys (a build checks this before
    its slow work; building the heads means running the text tower)."""
    _check_model_name(model_name)
    _check_text_tower(checkpoint, _full_state(Path(checkpoint), keys_only=True))


def zero_shot_heads(
    checkpoint: Path,
    model_name: str,
    class_lists: Sequence[list[str]],
    templates: tuple[str, ...] = DEFAULT_TEMPLATES,
) -> list[torch.Tensor]:
    """The zero-shot head [len(classes), embed_dim] of each ``classes`` of ``class_lists``, with the open_clip
    model ``model_name`` whose whole CLIP state dict (vision and text towers) is in ``checkpoint``: read once
    for all of them (it is the whole model, hundreds of MB for a ViT-B)."""
    import open_clip

    if not all(class_lists):
        raise ConfigError("zero-shot heads need at least one class name.")
    _check_model_name(model_name)
    state = _full_state(Path(checkpoint))
    _check_text_tower(checkpoint, state)
    model = open_clip.create_model(model_name, pretrained=None)
    result = model.load_state_dict(state, strict=False)
    text_missing = [key for key in result.missing_keys if not key.startswith("visual.")]
    if text_missing:
        raise ConfigError(f"{checkpoint}: text tower incomplete for {model_name}: missing {text_missing[:3]}.")
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()

    def head(classes: list[str]) -> torch.Tensor:
        rows = []
        for name in classes:
            texts = tokenizer([template.format(name) for template in templates])
            rows.append(F.normalize(F.normalize(model.encode_text(texts), dim=-1).mean(dim=0), dim=-1))
        return torch.stack(rows) * model.logit_scale.exp()

    with torch.no_grad():
        return [head(classes) for classes in class_lists]
