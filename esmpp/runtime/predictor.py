"""The application-facing API: load an artifact, send images, get a task, a label and a score per image."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import torch

from esmpp.artifact import Artifact, load_artifact
from esmpp.errors import ConfigError, EsmppError
from esmpp.images import ImageInput, preprocess_images
from esmpp.runtime.routing import RoutingMode, check_routing_options, is_whole_number


@dataclass
class Prediction:
    task: str  # the given task, or the routed one
    label: str
    score: float  # softmax probability of the label within the task's classes
    routed: bool  # True when the task was chosen by the router
    routes: dict[str, str] | None = None  # routed layer → chosen task, when asked for


class Predictor:
    """Thread-safe predictions from an ESM++ artifact.

    ``predict(images, task=None)``: without a task every image is routed and the routed task's head is
    used — prediction without knowing the task. Concurrent calls are serialised around the forward pass
    (the model's routing decisions of a pass are shared state); preprocessing runs in parallel.
    Soft routing's ``top_k``: None mixes ``DEFAULT_TOP_K`` experts, or every task when the artifact has
    fewer; a number given above the artifact's tasks is refused.
    """

    def __init__(
        self,
        artifact: Artifact,
        device: str | torch.device = "cpu",
        mode: RoutingMode = "hard",
        top_k: int | None = None,
        temperature: float = 0.05,
        route_once: bool = False,
    ) -> None:
        check_routing_options(mode, top_k, temperature, route_once, len(artifact.tasks))
        self.artifact = artifact
        self.device = torch.device(device)
        self.model = artifact.to_model().to(self.device)
        control = self.model.control
        control.mode, control.top_k, control.temperature, control.route_once = (
            mode,
            top_k,
            temperature,
            route_once,
        )
        self.task_names = [task.name for task in artifact.tasks]
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", **routing) -> Predictor:
        """Load the artifact directory ``path`` (validated) onto ``device``."""
        return cls(load_artifact(Path(path)), device=device, **routing)

    def _task_index(self, task: str | Integral) -> int:
        # A name, or an index (numpy's integers too); bool is an int, but task=True must not quietly mean task 1.
        if is_whole_number(task) and 0 <= task < len(self.task_names):
            return int(task)
        if isinstance(task, str) and task in self.task_names:
            return self.task_names.index(task)
        raise ConfigError(
            f"unknown task {task!r}; this artifact serves {self.task_names} (a name, or an index from 0 to "
            f"{len(self.task_names) - 1})."
        )

    def predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        task: str | Integral | None = None,
        batch_size: int = 64,
        return_routes: bool = False,
    ) -> list[Prediction]:
        """One ``Prediction`` per image: ``images`` is one image or any iterable of them (a generator is read
        once). ``task``: a name, or an index from 0 (an int or numpy integer); None routes each image.
        ``batch_size``: images per forward pass, a whole number ≥ 1."""
        if not is_whole_number(batch_size) or batch_size < 1:
            raise ConfigError(f"batch_size {batch_size!r} is not a whole number ≥ 1 (images per forward pass).")
        # An array, a tensor or a path is iterable too, but is one image.
        images = list(images) if isinstance(images, Iterable) and not isinstance(images, ImageInput) else [images]
        if not images:
            raise EsmppError("no images given to predict.")
        forced = None if task is None else self._task_index(task)
        results: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            batch = preprocess_images(images[start : start + batch_size], self.artifact.arch, first_index=start)
            pixels = batch.to(self.device)
            task_ids = None if forced is None else torch.full((pixels.shape[0],), forced, dtype=torch.long)
            with self._lock, torch.no_grad():
                output = self.model(pixels, None if task_ids is None else task_ids.to(self.device))
                decisions = [d.cpu() for d in self.model.control.decisions]
            results.extend(self._predictions(output.task.cpu(), output.logits.cpu(), decisions, forced, return_routes))
        return results

    def _predictions(self, tasks, logits, decisions, forced, return_routes) -> list[Prediction]:
        predictions = []
        for i, t in enumerate(tasks.tolist()):
            classes = self.artifact.tasks[t].classes
            probabilities = logits[i, : len(classes)].softmax(dim=-1)
            label = int(probabilities.argmax())
            routes = None
            if return_routes:
                routes = {key: self.task_names[int(d[i])] for key, d in zip(self.model.routed_keys, decisions)}
            predictions.append(
                Prediction(self.task_names[t], classes[label], float(probabilities[label]), forced is None, routes)
            )
        return predictions
