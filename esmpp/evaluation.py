"""Accuracy of an encoder on zoo tasks, and the tables that compare merging methods.

Head convention (used everywhere in esmpp): a task head is a matrix ``head`` [num_classes, embed_dim]
with the logit scale folded in, and ``logits = normalize(embedding) @ head.T`` — the role CLIP's
zero-shot text classifiers play. The zoo's heads are normalised class means of pretrained features
times a scale, frozen during fine-tuning.

A result row is a JSON-able dict ``{"method": str, "accuracy": {task: percent}, "seconds": float, ...}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from esmpp.architecture import Architecture
from esmpp.images import preprocess_uint8

if TYPE_CHECKING:
    from esmpp.zoo import Zoo


def head_logits(features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """``features`` [N, D] embeddings, ``head`` [C, D] → logits [N, C] = normalize(features) @ head.T."""
    return F.normalize(features, dim=-1) @ head.T


@torch.inference_mode()
def embed(encoder: torch.nn.Module, images: np.ndarray, arch: Architecture, batch_size: int = 256) -> torch.Tensor:
    """uint8 images [N, H, W, 3] → embeddings [N, D], in batches."""
    chunks = [
        encoder(preprocess_uint8(images[start : start + batch_size], arch))
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


def accuracy(
    encoder: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    head: torch.Tensor,
    arch: Architecture,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy in percent of ``encoder`` + ``head`` on uint8 ``images`` [N, H, W, 3]."""
    predictions = head_logits(embed(encoder, images, arch, batch_size), head).argmax(dim=1)
    return 100.0 * float((predictions.numpy() == labels).mean())


def evaluate(
    encoder: torch.nn.Module,
    zoo: Zoo,
    tasks: Iterable[str] | None = None,
    split: str = "test",
    batch_size: int = 256,
) -> dict[str, float]:
    """Accuracy (%) per task of ``encoder`` (normalised images [N, 3, H, W] → embeddings [N, D]) with each
    task's zoo head, on ``split`` of every task in ``tasks`` (default: all of the zoo's)."""
    chosen = zoo.tasks if tasks is None else list(tasks)
    return {task: accuracy(encoder, *zoo.split(task, split), zoo.head(task), zoo.arch, batch_size) for task in chosen}


def normalized_accuracy(acc: Mapping[str, float], finetuned_acc: Mapping[str, float]) -> dict[str, float]:
    """Accuracy as a percentage of each task's fine-tuned expert accuracy."""
    return {task: 100.0 * value / finetuned_acc[task] for task, value in acc.items()}


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def summarize_rows(
    rows: Sequence[Mapping[str, Any]], finetuned_acc: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """Rows with ``average`` added, and ``normalized`` / ``normalized_average`` when ``finetuned_acc``
    is given (JSON-able, for ``--json`` outputs and reports)."""
    summary = []
    for row in rows:
        out = dict(row)
        out["average"] = _mean(row["accuracy"].values())
        if finetuned_acc is not None:
            out["normalized"] = normalized_accuracy(row["accuracy"], finetuned_acc)
            out["normalized_average"] = _mean(out["normalized"].values())
        summary.append(out)
    return summary


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def format_table(
    rows: Sequence[Mapping[str, Any]], finetuned_acc: Mapping[str, float] | None = None, digits: int = 1
) -> str:
    """Markdown tables: methods × tasks + average (+ seconds when rows have them); a second table of
    normalised accuracy when ``finetuned_acc`` is given. Tasks are the first row's, in its order."""
    summary = summarize_rows(rows, finetuned_acc)
    tasks = list(summary[0]["accuracy"])
    with_seconds = all("seconds" in row for row in summary)

    def body(key: str, average_key: str) -> list[list[str]]:
        lines = []
        for row in summary:
            cells = [
                str(row["method"]),
                *(f"{row[key][t]:.{digits}f}" for t in tasks),
                f"{row[average_key]:.{digits}f}",
            ]
            if with_seconds:
                cells.append(f"{row['seconds']:.1f}")
            lines.append(cells)
        return lines

    header = ["method", *tasks, "avg", *(["seconds"] if with_seconds else [])]
    tables = ["Accuracy (%)\n\n" + _markdown(header, body("accuracy", "average"))]
    if finetuned_acc is not None:
        tables.append(
            "Normalised accuracy (% of fine-tuned)\n\n" + _markdown(header, body("normalized", "normalized_average"))
        )
    return "\n\n".join(tables)
