"""Task registry: procedural VQA tasks the benchmark runner evaluates pruners on.

A task is one module (or package) in ``benchmarks/tasks/`` whose class derives from `Task` and is
decorated with `register_task`. Built-in task modules are imported lazily on the first registry
lookup, so importing this package stays cheap.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pruners.registry import Registry

_INSTANCES: dict[str, Task] = {}


@dataclass
class Sample:
    """One VQA item: an RGB image, a question, its one-word answer and the scene behind them.

    ``meta`` is JSON-serialisable and always holds ``meta["task"]`` (the registered task name), so
    `relevant_patches` can be answered by the task that generated the sample. ``extra_images``: the
    further images of a multi-image item (an lmms-eval document with several), given to the model after
    ``image`` in one prompt; `relevant_patches` concerns ``image``.
    """

    id: str
    image: Image.Image  # RGB
    question: str
    answer: str  # one word
    family: str  # question family name
    meta: dict[str, Any] = field(default_factory=dict)
    extra_images: list[Image.Image] = field(default_factory=list)  # RGB

    @property
    def images(self) -> list[Image.Image]:
        """Every image of the item, in prompt order (``image`` first)."""
        return [self.image, *self.extra_images]

    def relevant_patches(self, grid_hw: tuple[int, int]) -> list[int]:
        """Raster indices of the patches (``grid_hw`` = rows x cols over the whole image) covered by the
        objects the answer depends on.

        Ordered by priority, not raster order: each relevant object's centre patch comes first, then
        the remaining covered patches in raster order. An oracle with a budget smaller than the list
        therefore keeps a piece of every relevant object by taking a prefix; sort the result if you need
        raster order.
        """
        task_name = self.meta.get("task")
        if task_name is None:
            raise ValueError("sample.meta['task'] is missing; cannot tell which task computes relevant patches")
        return get_task(task_name).relevant_patches(self, grid_hw)


class Task:
    """Base class of a task. Subclasses set ``name``, ``families``, ``max_new_tokens`` and implement
    `samples` and `relevant_patches`; `score` is exact match after normalisation."""

    name: str = ""
    families: list[str] = []
    max_new_tokens: int = 2
    #: the ability the task stresses, for the summary table's per-ability view (benchmarks.summary)
    ability: str = "general"

    def samples(self, split: str = "eval", n: int | None = None, seed: int = 0) -> list[Sample]:
        """Samples of ``split``; ``"eval"`` is the fixed 1,000-sample split (``seed`` is ignored for it),
        deterministic and disjoint from the training stream. ``n`` keeps the first ``n``."""
        raise NotImplementedError

    def relevant_patches(self, sample: Sample, grid_hw: tuple[int, int]) -> list[int]:
        """See `Sample.relevant_patches`."""
        raise NotImplementedError

    @staticmethod
    def normalise(text: str) -> str:
        """Strip, lower-case, keep the first word without surrounding punctuation ("" if none)."""
        words = text.strip().lower().split()
        if not words:
            return ""
        return re.sub(r"^[^\w]+|[^\w]+$", "", words[0])

    def score(self, prediction: str, sample: Sample) -> float:
        """Exact match after `normalise` of both sides: 1.0 or 0.0."""
        return 1.0 if self.normalise(prediction) == self.normalise(sample.answer) else 0.0

    def clean_prediction(self, text: str) -> str:
        """The decoded generation as the task scores and stores it (default: unchanged)."""
        return text

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Task-level metrics over a cell's prediction rows beyond accuracy (POPE's F1, lmms-eval's own
        aggregations), stored as the cell's ``task_metrics``; None when the task has none."""
        return None


#: Every task: one module or package in `benchmarks/tasks/` each.
TASKS: Registry[type[Task]] = Registry("task", __name__, base=Task)


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator registering a `Task` subclass under ``name`` (sets ``cls.name``)."""
    return TASKS.register(name)


def available_tasks() -> list[str]:
    """Sorted names of the registered tasks."""
    return TASKS.names()


def get_task(name: str) -> Task:
    """The (cached) instance of task ``name``; ValueError naming the known tasks if unknown."""
    cls = TASKS.get(name)
    if name not in _INSTANCES:
        _INSTANCES[name] = cls()
    return _INSTANCES[name]


def tasks_for(task_cfg: dict[str, Any]) -> list[tuple[Task, dict[str, Any]]]:
    """The tasks a run's ``task`` config names, each with the task config its cells record.

    A plain task is one (its instance, the config as given). A task class with a ``configured``
    classmethod expands its config into several bound tasks (``task=lmms task.names=[pope,gqa]``: one
    per name, each recorded as its own task, e.g. ``lmms-pope``); it checks them before any model loads."""
    name = str(task_cfg["name"])
    cls = TASKS.get(name)
    expand = getattr(cls, "configured", None)
    if expand is None:
        return [(get_task(name), dict(task_cfg))]
    return [(t, {**task_cfg, **t.recorded_config()}) for t in expand(task_cfg)]


__all__ = ["Sample", "Task", "available_tasks", "get_task", "register_task", "tasks_for"]
