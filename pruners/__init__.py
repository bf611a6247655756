"""prunebench pruners: `apply_pruner(model, name, budget=..., **params)` and the registry."""

from pruners.registry import available_pruners, get_pruner_class, register_pruner

__all__ = ["apply_pruner", "available_pruners", "get_pruner_class", "register_pruner"]


def apply_pruner(model, method: str, budget: int | None = None, **params):
    """Attach pruner `method` to an unmodified HF model; returns a handle (see mllm_adapters)."""
    from mllm_adapters import attach

    return attach(model, method, budget=budget, **params)
