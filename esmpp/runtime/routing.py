"""Prototype routing: which task's expert each image uses at a routed layer.

Pure tensor functions written only with graph-friendly ops (mean, normalize, MatMul, TopK/ArgMax,
Gather, Softmax), so the same code runs in PyTorch and exports to ONNX without Python control flow that
tracing would freeze.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F


def routing_feature(tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` [B, N, d] (a routed layer's input) → unit-norm mean token feature [B, d]."""
    return F.normalize(tokens.mean(dim=1), dim=-1)


def task_scores(features: torch.Tensor, prototypes: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """How well each image matches each task: ``features`` [B, d] (unit norm), ``prototypes`` [T, m, d],
    ``bias`` [T, m] → [B, T], the best of a task's m prototype scores ``f · p + b``. With unit prototypes
    and zero bias this is cosine similarity (the paper's router); the discriminant router stores its
    weights and biases in the same places (see :mod:`esmpp.experts`)."""
    T, m, d = prototypes.shape
    scores = features @ prototypes.reshape(T * m, d).T + bias.reshape(1, T * m)  # [B, T*m]
    return scores.reshape(-1, T, m).amax(dim=-1)


def hard_route(similarity: torch.Tensor) -> torch.Tensor:
    """Top-1 routing: ``similarity`` [B, T] → task ids [B, 1] int64 (each at weight 1)."""
    return similarity.argmax(dim=-1, keepdim=True)


def soft_route(similarity: torch.Tensor, top_k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft top-k routing: the k most similar tasks, weighted by a softmax of similarity / temperature
    over those k (for the discriminant router's log-likelihood scores, temperature 1 gives the posterior).
    ``similarity`` [B, T] → (task ids [B, k], weights [B, k] summing to 1)."""
    k = min(top_k, similarity.shape[-1])
    values, ids = similarity.topk(k, dim=-1)
    return ids, torch.softmax(values / temperature, dim=-1)


def forced_route(task_ids: torch.Tensor) -> torch.Tensor:
    """Routing given by the caller: ``task_ids`` [B] → ids [B, 1] int64 (each at weight 1)."""
    return task_ids.reshape(-1, 1).long()


@dataclass
class RoutingControl:
    """Routing options shared by every routed layer of one model, plus the decisions of the current
    forward pass. One control belongs to one model; callers that share a model across threads serialise
    forwards (the Predictor holds a lock), because the decisions of a pass are stored here."""

    mode: Literal["hard", "soft"] = "hard"
    top_k: int = 2
    temperature: float = 0.05
    route_once: bool = False
    forced_tasks: torch.Tensor | None = None
    decisions: list[torch.Tensor] = field(default_factory=list)

    def start_pass(self, forced_tasks: torch.Tensor | None = None) -> None:
        """Forget the previous pass's decisions; ``forced_tasks`` [B] skips routing for this pass."""
        self.forced_tasks = forced_tasks
        self.decisions = []

    def route(
        self, tokens: torch.Tensor, prototypes: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decide the experts of one routed layer: ``tokens`` [B, N, d_in], ``prototypes`` [T, m, d_in],
        ``bias`` [T, m] → (task ids [B, k], weights [B, k]; None for one expert at weight 1, which the
        experts then need not multiply by); the top task per image is appended to ``decisions``."""
        weights = None
        if self.forced_tasks is not None:
            ids = forced_route(self.forced_tasks)
        elif self.route_once and self.decisions:
            ids, weights = self._first
        else:
            similarity = task_scores(routing_feature(tokens), prototypes, bias)
            if self.mode == "soft":
                ids, weights = soft_route(similarity, self.top_k, self.temperature)
            else:
                ids = hard_route(similarity)
            if not self.decisions:
                self._first = (ids, weights)
        self.decisions.append(ids[:, 0])
        return ids, weights

    @property
    def image_task(self) -> torch.Tensor:
        """The task of each image [B]: the last routed layer's top choice (the deepest features)."""
        if not self.decisions:
            raise RuntimeError("no routed layer ran in this pass")
        return self.decisions[-1]
