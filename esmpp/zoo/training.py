"""Training loop of the zoo: distillation pretraining with a trainable projection, fine-tuning with a frozen head.

All randomness comes from the generators passed in, so a build is reproducible to the byte (see
``build.deterministic``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from esmpp.architecture import Architecture
from esmpp.evaluation import embed, head_logits
from esmpp.zoo.presets import TrainRecipe

Batch = tuple[torch.Tensor, torch.Tensor]


def warmup_cosine(step: int, steps: int, warmup_fraction: float) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup_fraction`` of the steps, then cosine to 0."""
    warmup = max(1, int(steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def classification_loss(embeddings: torch.Tensor, head: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``head_logits(embeddings, head)`` against ``labels`` (fine-tuning with a frozen head)."""
    return F.cross_entropy(head_logits(embeddings, head), labels)


def train(
    encoder: torch.nn.Module,
    head: torch.Tensor,
    next_batch: Callable[[], Batch],
    recipe: TrainRecipe,
    *,
    description: str,
    progress: bool,
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = classification_loss,
) -> None:
    """Run ``recipe.steps`` AdamW steps minimising ``loss(encoder(images), head, targets)`` on batches from
    ``next_batch`` (normalised images [B, 3, H, W], targets). ``head`` is trained along when it requires
    grad (the distillation projection), frozen otherwise (task heads). Biases and norms get no weight decay."""
    trainable_head = head.requires_grad
    decay = [p for p in encoder.parameters() if p.ndim >= 2]
    no_decay = [p for p in encoder.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if trainable_head:
        groups.append({"params": [head], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, recipe.steps, recipe.warmup_fraction)
    )
    encoder.train()
    bar = tqdm(range(recipe.steps), desc=description, disable=not progress, leave=False)
    for _ in bar:
        images, targets = next_batch()
        value = loss(encoder(images), head, targets)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{value.item():.3f}", refresh=False)
    encoder.eval()


def class_mean_head(
    encoder: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    arch: Architecture,
    scale: float,
) -> torch.Tensor:
    """Frozen task head [C, D]: normalised mean of normalised embeddings of each class, times ``scale``."""
    features = F.normalize(embed(encoder, images, arch), dim=1)
    one_hot = F.one_hot(torch.from_numpy(labels), num_classes).to(features.dtype)
    means = one_hot.T @ features
    return scale * F.normalize(means, dim=1)


def shifted(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate a batch [B, 3, H, W] by one random offset of up to ``max_shift`` pixels (edges copied)."""
    if max_shift == 0:
        return images
    height, width = images.shape[-2:]
    top, left = (int(v) for v in torch.randint(0, 2 * max_shift + 1, (2,), generator=generator))
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    return padded[..., top : top + height, left : left + width]
