"""The contract every merge method follows, built for streaming over fine-tuned models.

A driver loads one fine-tuned model at a time and folds each of its parameters into a per-parameter
summary; only summaries stay in memory, never all task vectors (where the method allows it)::

    method = get_method(name)(options, num_tasks=T)
    summaries = {}
    for model in fine_tuned_models:                  # task order
        for key, delta in task_vector(model).items():
            summaries[key] = method.summarize(key, delta, stats.get(key), summaries.get(key))
    merged = method.finalize({key: method.combine(key, s) for key, s in summaries.items()})
    θ = θ0 + α · merged                              # α is applied by the caller, never here

Summaries are folds rather than per-task lists so that task arithmetic or TIES keep one running sum
per parameter, whatever the number of tasks. Methods that must keep a piece of every task (ESM) ``park``
it: inside ``with method.spilling():`` (the streaming driver opens it) the piece goes to a temporary file
until ``combine`` needs it, elsewhere it stays in memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import pydantic
import torch
from torch import Tensor

from esmpp.architecture import LINEAR_KINDS
from esmpp.errors import ConfigError, validation_problems
from esmpp.spill import Parked, SpillDirectory

Item = TypeVar("Item")


@dataclass(frozen=True)
class LayerStats:
    """Activation statistics of one linear layer's input over all proxy tokens of a fine-tuned model.

    ``gram``: XᵀX (``d_in × d_in``, float64); ``mean``: token mean of X (``d_in``); ``num_tokens``: N.
    With ``projected``, ``gram`` is instead the second moment of this task's activation shift at the layer,
    ΔYᵀΔY = ΔW XᵀX ΔWᵀ (``d_out × d_out``): the streaming driver gives that to methods with
    ``shift_moments`` on layers that narrow (d_out < d_in), where it is the smaller matrix.
    """

    gram: Tensor
    mean: Tensor
    num_tokens: int
    projected: bool = False


class MethodOptions(pydantic.BaseModel):
    """Base of every method's ``Options``: unknown keys refused, values frozen, and floats finite (a NaN or
    infinite option would only show as a broken merge, after the build)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NoOptions(MethodOptions):
    """Options of a method that has none."""


class MergeMethod(ABC):
    """A static merge method: per-parameter fold (``summarize``), per-parameter result (``combine``),
    then a model-level step (``finalize``). The merged task vector excludes α."""

    name: ClassVar[str]
    needs_grams: ClassVar[bool] = False  # True: the driver captures LayerStats on each fine-tuned model
    shift_moments: ClassVar[bool] = False  # True: ... and may give ``projected`` ones (see LayerStats)
    Options: ClassVar[type[pydantic.BaseModel]] = NoOptions
    # α the method is defined with (weight averaging is θ0 + mean τ, α = 1); None: α is searched.
    fixed_alpha: ClassVar[float | None] = None

    def __init__(self, options: pydantic.BaseModel | Mapping[str, Any] | None, num_tasks: int) -> None:
        if num_tasks < 1:
            raise ConfigError(f"Merge method {self.name!r}: num_tasks must be at least 1, got {num_tasks}.")
        self.options = self.parse_options(options)
        self.num_tasks = num_tasks
        self._spill: SpillDirectory | None = None

    @classmethod
    def parse_options(cls, options: pydantic.BaseModel | Mapping[str, Any] | None) -> Any:
        """``options`` as this method's ``Options`` model (a mapping is validated; None gives defaults)."""
        if isinstance(options, cls.Options):
            return options
        raw = options.model_dump() if isinstance(options, pydantic.BaseModel) else dict(options or {})
        try:
            return cls.Options.model_validate(raw)
        except pydantic.ValidationError as exc:
            fields = ", ".join(cls.Options.model_fields) or "none"
            raise ConfigError(
                f"Invalid options for merge method {cls.name!r}: {validation_problems(exc)}. Known options: {fields}."
            ) from exc

    def statistics_kinds(self) -> tuple[str, ...]:
        """The linear kinds whose layers the driver captures :class:`LayerStats` for: every kind for a method
        that ``needs_grams``, none otherwise. A method that reads the statistics of some kinds only says so, and
        the others are not captured."""
        return tuple(LINEAR_KINDS) if self.needs_grams else ()

    @abstractmethod
    def summarize(self, key: str, delta: Tensor, stats: LayerStats | None, previous: Any | None) -> Any:
        """Fold task t's task vector ``delta`` of parameter ``key`` into ``previous``, the summary of tasks
        1..t−1 (None for the first task). Called once per task, in task order. ``stats`` is given only for
        the weights of the :meth:`statistics_kinds`."""

    @abstractmethod
    def combine(self, key: str, summary: Any) -> Tensor:
        """The merged task vector of parameter ``key`` (the parameter's shape) from its final summary."""

    def finalize(self, merged: dict[str, Tensor]) -> dict[str, Tensor]:
        """Model-level step once every key is combined. Default: none."""
        return merged

    @contextmanager
    def spilling(self) -> Iterator[None]:
        """Within the block, :meth:`park` writes to a temporary directory, removed when the block ends
        (also on errors): summarize and combine inside it."""
        with SpillDirectory() as spill:
            self._spill = spill
            try:
                yield
            finally:
                self._spill = None

    def park(self, item: Item) -> Item | Parked[Item]:
        """A per-task piece of a summary (a dataclass of tensors) parked on disk inside :meth:`spilling`,
        else ``item`` itself; ``esmpp.spill.unpark`` gives it back."""
        return item if self._spill is None else self._spill.park(item)


@dataclass(frozen=True)
class TaskSum:
    """Running sum of task vectors: all that averaging and task arithmetic need."""

    total: Tensor
    count: int

    @property
    def mean(self) -> Tensor:
        return self.total / self.count


def add_to_sum(previous: TaskSum | None, delta: Tensor) -> TaskSum:
    """``previous`` plus one task vector (accumulated in at least float32)."""
    delta = delta.to(torch.promote_types(delta.dtype, torch.float32))
    if previous is None:
        return TaskSum(total=delta.clone(), count=1)
    return TaskSum(total=previous.total + delta, count=previous.count + 1)


def append_summary(previous: list[Any] | None, item: Any) -> list[Any]:
    """Per-task summaries kept side by side, for methods that need every task at combine time."""
    return [*(previous or []), item]
