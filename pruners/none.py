"""`none`: the unpruned model. Every relative number in prunebench is measured against it."""

from __future__ import annotations

from pruners.base import ModelInfo, Pruner, check_budget_fits
from pruners.registry import register_pruner


@register_pruner("none")
class NoPruning(Pruner):
    """Keeps every visual token; attaching it changes no output."""

    stages = ()

    def __init__(self, budget: int | None = None, seed: int = 0, **params) -> None:
        super().__init__(budget=budget, seed=seed, **params)  # a bad budget is refused as for any method,
        self.asked_budget, self.budget = self.budget, None  # then ignored: every token is kept
        self.budget_fraction = None

    def attach(self, info: ModelInfo) -> None:
        if not isinstance(self.asked_budget, float):
            check_budget_fits(self.asked_budget, info)
        super().attach(info)
