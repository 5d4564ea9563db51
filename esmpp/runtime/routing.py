"""Prototype routing: which task's expert each image uses at a routed layer.

Pure tensor functions written only with graph-friendly ops (mean, normalize, MatMul, TopK/ArgMax,
Gather, Softmax), so the same code runs in PyTorch and exports to ONNX without Python control flow that
tracing would freeze.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from esmpp.errors import ConfigError

RoutingMode = Literal["hard", "soft"]
ROUTING_MODES: tuple[str, ...] = get_args(RoutingMode)
# Experts soft routing mixes when top_k is not given, at most every task of the artifact.
DEFAULT_TOP_K = 2


def is_whole_number(value: object) -> bool:
    """An integer of Python or numpy (``numbers.Integral``), but not a bool: ``True`` must not mean 1."""
    return isinstance(value, Integral) and not isinstance(value, bool)


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


def check_routing_options(mode: str, top_k: int | None, temperature: float, route_once: bool, num_tasks: int) -> None:
    """Refuse routing options the router cannot honour, with a ``ConfigError`` naming the option and the values
    it takes: a mode the router does not know would fall back to hard routing, a temperature ≤ 0 gives NaN or
    inverted weights, and soft routing cannot mix fewer than 1 or more than ``num_tasks`` experts. ``top_k``
    None is the default, ``DEFAULT_TOP_K`` experts or every task when there are fewer."""
    if mode not in ROUTING_MODES:
        raise ConfigError(f"routing mode {mode!r} is not one of {list(ROUTING_MODES)}.")
    if top_k is not None and (not is_whole_number(top_k) or top_k < 1):
        raise ConfigError(f"top_k {top_k!r} is not a whole number ≥ 1 (how many experts soft routing mixes).")
    # Hard routing ignores top_k; a top_k the caller gave above the tasks is refused rather than quietly lowered.
    if mode == "soft" and top_k is not None and top_k > num_tasks:
        raise ConfigError(
            f"top_k {top_k} is more than the artifact's {num_tasks} tasks; soft routing mixes 1 to {num_tasks} experts."
        )
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not 0 < temperature < math.inf:
        raise ConfigError(f"temperature {temperature!r} is not a positive finite number (soft routing divides by it).")
    if not isinstance(route_once, bool):
        raise ConfigError(f"route_once {route_once!r} is not True or False.")


def forced_route(task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Routing given by the caller: ``task_ids`` [B] → ids [B, 1] int64 (each at weight 1).

    An id outside [0, ``num_tasks``) becomes ``num_tasks``, an index that no Gather takes: eager runs refuse such
    ids before (see :meth:`RoutingControl.start_pass`), but a traced graph cannot raise, and ONNX's Gather, like
    Python, would read −1 as the last task and answer for it. So the graph's run fails instead."""
    ids = task_ids.reshape(-1, 1).long()
    return torch.where((ids >= 0) & (ids < num_tasks), ids, num_tasks)


def check_forced_tasks(task_ids: torch.Tensor, num_tasks: int) -> None:
    """Refuse ``task_ids`` [B] with an id outside [0, ``num_tasks``) (−1 would index the last task)."""
    outside = (task_ids < 0) | (task_ids >= num_tasks)
    if bool(outside.any()):
        raise ConfigError(
            f"task id {int(task_ids[outside][0])} is outside 0 to {num_tasks - 1}: the model has {num_tasks} tasks."
        )


@dataclass
class RoutingControl:
    """Routing options shared by every routed layer of one model, plus the decisions of the current
    forward pass. One control belongs to one model; callers that share a model across threads serialise
    forwards (the Predictor holds a lock), because the decisions of a pass are stored here."""

    mode: RoutingMode = "hard"
    top_k: int | None = None  # None: DEFAULT_TOP_K, or every task when there are fewer
    temperature: float = 0.05
    route_once: bool = False
    forced_tasks: torch.Tensor | None = None
    decisions: list[torch.Tensor] = field(default_factory=list)

    def start_pass(self, forced_tasks: torch.Tensor | None = None, num_tasks: int | None = None) -> None:
        """Forget the previous pass's decisions; ``forced_tasks`` [B] skips routing for this pass. A routed pass
        checks the options first (see :func:`check_routing_options`; ``num_tasks``: the model's), once for all
        its layers: they may have been set on the control directly, past the Predictor's check, where a mode it
        does not know would route hard and a temperature of 0 give NaN weights. An eager forced pass refuses ids
        outside [0, ``num_tasks``) (see :func:`check_forced_tasks`)."""
        if num_tasks is not None:  # None: a reset, no pass follows (see onnx._trace)
            if forced_tasks is None:
                check_routing_options(self.mode, self.top_k, self.temperature, self.route_once, num_tasks)
            elif not torch.compiler.is_compiling():  # a traced graph cannot raise: forced_route guards it
                check_forced_tasks(forced_tasks, num_tasks)
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
            ids = forced_route(self.forced_tasks, prototypes.shape[0])
        elif self.route_once and self.decisions:
            ids, weights = self._first
        else:
            similarity = task_scores(routing_feature(tokens), prototypes, bias)
            if self.mode == "soft":
                ids, weights = soft_route(
                    similarity, DEFAULT_TOP_K if self.top_k is None else self.top_k, self.temperature
                )
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
