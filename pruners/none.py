"""`none`: the unpruned model. Every relative number in prunebench is measured against it."""

from __future__ import annotations

from pruners.base import Pruner
from pruners.registry import register_pruner


@register_pruner("none")
class NoPruning(Pruner):
    """Keeps every visual token; attaching it changes no output."""

    stages = ()

    def __init__(self, budget: int | None = None, seed: int = 0, **params) -> None:
        super().__init__(budget=None, seed=seed, **params)
