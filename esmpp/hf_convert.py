"""Hugging Face ``transformers`` CLIP vision weights → the open_clip visual-tower form.

HF keeps q, k and v as three ``Linear`` layers and the output projection as a ``Linear`` whose weight is
the transpose of open_clip's ``proj``; everything else is a rename. The keys handled here are relative to
the HF ``CLIPVisionTransformer`` (``embeddings.*``, ``encoder.layers.*``, ``pre_layrnorm.*``,
``post_layernorm.*``); ``visual_projection.weight`` sits beside it and is passed separately.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import Tensor

from esmpp.architecture import Architecture
from esmpp.errors import CheckpointError

# The key that marks an HF CLIP vision transformer; what precedes it is the prefix to strip.
HF_MARKER_KEY = "embeddings.patch_embedding.weight"
HF_PROJECTION_KEY = "visual_projection.weight"

_RENAMES = {
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.class_embedding": "class_embedding",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_BLOCK_RENAMES = {
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_QKV = ("q_proj", "k_proj", "v_proj")
# Buffers HF saves that open_clip rebuilds itself.
_IGNORED = {"embeddings.position_ids"}
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
# hidden_act → (open_clip quick_gelu flag, act_kwargs for nn.GELU).
_ACTIVATIONS: dict[str, tuple[bool, dict[str, str] | None]] = {
    "quick_gelu": (True, None),
    "gelu": (False, None),
    "gelu_new": (False, {"approximate": "tanh"}),
    "gelu_pytorch_tanh": (False, {"approximate": "tanh"}),
}
_OPEN_CLIP_LAYER_NORM_EPS = 1e-5


def hf_to_open_clip(hf_state: dict[str, Tensor], projection: Tensor | None, source: str) -> dict[str, Tensor]:
    """HF vision-transformer tensors → an open_clip visual state dict.

    ``projection`` is ``visual_projection.weight`` [embed_dim, width]; open_clip's ``proj`` is its
    transpose [width, embed_dim]. Without one (``CLIPVisionModel``) ``proj`` is the identity [width, width],
    so the open_clip output equals HF's ``pooler_output``.
    """
    state: dict[str, Tensor] = {}
    fused: dict[tuple[int, str], dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in hf_state.items():
        if key in _IGNORED:
            continue
        if key in _RENAMES:
            state[_RENAMES[key]] = tensor
            continue
        match = _LAYER_KEY.match(key)
        rest = match.group(2) if match else ""
        if match and rest in _BLOCK_RENAMES:
            state[f"transformer.resblocks.{match.group(1)}.{_BLOCK_RENAMES[rest]}"] = tensor
        elif match and rest.startswith("self_attn.") and rest.split(".")[1] in _QKV:
            _, part, kind = rest.split(".")
            fused.setdefault((int(match.group(1)), kind), {})[part] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{source}: unexpected Hugging Face CLIP vision keys {unknown[:5]} (of {len(unknown)}). "
            "Only CLIP ViT vision towers (CLIPModel / CLIPVisionModel / CLIPVisionModelWithProjection) "
            "are supported; check that this is a CLIP checkpoint."
        )
    for (layer, kind), parts in sorted(fused.items()):
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise CheckpointError(
                f"{source}: encoder.layers.{layer}.self_attn.{missing[0]}.{kind} is missing, so q/k/v "
                "cannot be fused into open_clip's in_proj. The checkpoint is truncated or not a CLIP model; "
                "re-export it with save_pretrained."
            )
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        state[f"transformer.resblocks.{layer}.attn.{name}"] = torch.cat([parts[p] for p in _QKV])
    if "conv1.weight" in state:
        width = state["conv1.weight"].shape[0]
        state["proj"] = projection.T.contiguous() if projection is not None else torch.eye(width, dtype=torch.float32)
    return state


def apply_hf_config(
    arch: Architecture, config: dict[str, Any], preprocessor: dict[str, Any] | None, source: str
) -> Architecture:
    """The shape-inferred ``arch`` completed with what only the HF config knows: the number of heads, the
    activation, the layer-norm eps, and (from ``preprocessor_config.json``) the image mean and std.

    ``config`` is a ``CLIPConfig`` (vision settings under ``vision_config``) or a ``CLIPVisionConfig``;
    missing fields take the ``transformers`` CLIP defaults (quick_gelu, eps 1e-5).
    """
    vision_config = config.get("vision_config") or config
    hidden_act = vision_config.get("hidden_act", "quick_gelu")
    if hidden_act not in _ACTIVATIONS:
        raise CheckpointError(
            f"{source}: config.json has hidden_act={hidden_act!r}; supported: {sorted(_ACTIVATIONS)}. "
            "This does not look like a CLIP vision model."
        )
    quick_gelu, act_kwargs = _ACTIVATIONS[hidden_act]
    vision = dict(arch.vision)
    heads = vision_config.get("num_attention_heads")
    if heads is not None:
        if arch.width % int(heads):
            raise CheckpointError(
                f"{source}: config.json has num_attention_heads={heads}, which does not divide the hidden "
                f"size {arch.width} found in the weights. Fix the config or pass the architecture explicitly."
            )
        vision["head_width"] = arch.width // int(heads)
    eps = float(vision_config.get("layer_norm_eps", _OPEN_CLIP_LAYER_NORM_EPS))
    if eps != _OPEN_CLIP_LAYER_NORM_EPS:
        vision["norm_kwargs"] = {"eps": eps}
    if act_kwargs is not None:
        vision["act_kwargs"] = act_kwargs
    preprocessor = preprocessor or {}
    return dataclasses.replace(
        arch,
        vision=vision,
        name=str(config.get("_name_or_path") or "hf-clip"),
        quick_gelu=quick_gelu,
        mean=tuple(preprocessor.get("image_mean", arch.mean)),
        std=tuple(preprocessor.get("image_std", arch.std)),
    )
