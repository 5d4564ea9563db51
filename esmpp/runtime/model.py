"""The routed ESM++ encoder: a merged open_clip visual tower, low-rank experts, prototypes, task heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from esmpp.architecture import Architecture, block_index, build_visual, routed_keys, routed_kind
from esmpp.runtime.layers import ExpertBank, explicit_attention, routed_slot
from esmpp.runtime.routing import RoutingControl

# Logit given to the padding classes of tasks with fewer classes than the largest head (fp16-safe).
PADDED_LOGIT = -1.0e4


@dataclass
class Experts:
    """One routed layer's experts: ``up`` [T, d_out, r], ``down`` [T, r, d_in], ``prototypes`` [T, m, d_in]
    (unit-norm prototypes of the cosine router, or the discriminant router's weights) and ``prototype_bias``
    [T, m] (the discriminant router's biases; None for the cosine router)."""

    up: torch.Tensor
    down: torch.Tensor
    prototypes: torch.Tensor
    prototype_bias: torch.Tensor | None = None


@dataclass
class RoutedOutput:
    embedding: torch.Tensor  # [B, embed_dim]
    task: torch.Tensor  # [B] int64: the given or routed task of each image
    logits: torch.Tensor  # [B, max_classes], that task's head; padding classes = PADDED_LOGIT


def stack_heads(heads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task heads [C_t, D] → zero-padded stack [T, C_max, D] and validity mask [T, C_max]."""
    max_classes = max(head.shape[0] for head in heads)
    stacked = torch.zeros(len(heads), max_classes, heads[0].shape[1], dtype=heads[0].dtype)
    mask = torch.zeros(len(heads), max_classes, dtype=torch.bool)
    for t, head in enumerate(heads):
        stacked[t, : head.shape[0]] = head
        mask[t, : head.shape[0]] = True
    return stacked, mask


class RoutedEncoder(nn.Module):
    """``forward(pixels [B,3,H,W], task_ids [B] | None) → RoutedOutput``.

    With ``task_ids`` the given tasks' experts and heads are used (routing skipped); without, each routed
    layer picks its expert by prototype similarity and the last routed layer's choice picks the head.
    """

    def __init__(
        self,
        arch: Architecture,
        backbone: dict[str, torch.Tensor],
        experts: dict[str, Experts],
        heads: list[torch.Tensor],
        control: RoutingControl | None = None,
    ) -> None:
        super().__init__()
        if not experts:
            raise ValueError("a routed encoder needs at least one routed layer")
        self.arch = arch
        self.visual = build_visual(arch)
        self.visual.load_state_dict(backbone, strict=True)
        self.control = explicit_attention(self.visual, control)
        # In execution order, so that routed_keys[i] made control.decisions[i].
        self.routed_keys = [
            key for key in routed_keys(arch, tuple({routed_kind(k) for k in experts})) if key in experts
        ]
        for key, layer in experts.items():
            module, slot = routed_slot(self.visual, block_index(key), routed_kind(key))
            setattr(module, slot, ExpertBank(layer.up, layer.down, layer.prototypes, layer.prototype_bias))
        stacked, mask = stack_heads(heads)
        self.register_buffer("heads", stacked)
        self.register_buffer("head_mask", mask)
        self.eval()

    @property
    def num_tasks(self) -> int:
        return int(self.heads.shape[0])

    def forward(self, pixels: torch.Tensor, task_ids: torch.Tensor | None = None) -> RoutedOutput:
        self.control.start_pass(task_ids, self.num_tasks)
        embedding = self.visual(pixels)
        task = self.control.image_task
        head = self.heads[task]  # [B, C_max, D]
        logits = torch.einsum("bd,bcd->bc", F.normalize(embedding, dim=-1), head)
        logits = logits.masked_fill(~self.head_mask[task], PADDED_LOGIT)
        return RoutedOutput(embedding=embedding, task=task, logits=logits)
