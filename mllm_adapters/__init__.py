"""Adapters that plug pruners into unmodified Hugging Face multimodal models.

One engine (`mllm_adapters.engine`) and one short spec per model family (`mllm_adapters.families`);
see docs/engine.md.
"""

from __future__ import annotations

from typing import Any

from mllm_adapters.handle import PruningHandle

#: Behaviour version of the adapters (hooks, prompt surgery, LLM-stage slicing): bump it whenever the
#: same pruner on the same inputs can give a different result. Part of every result cell's identity.
ENGINE_VERSION = 1


def __getattr__(name: str) -> Any:
    if name == "SUPPORTED_MODEL_CLASSES":  # transformers model classes `attach` has an adapter for
        from mllm_adapters.registry import supported_model_classes

        return supported_model_classes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available_families() -> list[str]:
    """Sorted names of every registered model family (`mllm_adapters.registry`)."""
    from mllm_adapters.registry import available_families as names

    return names()


def apply_pruner(model: Any, method: str, budget: int | None = None, **params: Any) -> PruningHandle:
    """Attach pruner ``method`` to an unmodified Hugging Face model; returns its `PruningHandle`.

    ``budget``: visual tokens per image reaching the LLM (None keeps all); other keyword arguments
    are the method's parameters (and ``seed``, ``tokenizer``). The model's family (`available_families`)
    is picked by its class. Bad budgets and parameters raise a ValueError before any hook is placed.
    """
    return attach(model, method, budget=budget, **params)


def attach(model: Any, method: str, budget: int | None = None, tokenizer: Any = None, **params: Any) -> PruningHandle:
    """Build pruner `method` and hook it into `model`; see `apply_pruner`."""
    from mllm_adapters.engine import Engine
    from mllm_adapters.registry import family_for
    from pruners.registry import get_pruner_class

    cls = get_pruner_class(method)
    pruner = cls(budget=budget, **params)
    spec_cls = family_for(model)
    existing = getattr(model, "_prunebench_handle", None)
    if existing is not None and not existing.removed:
        raise ValueError("this model already has a pruner attached; call handle.remove() first")
    handle = PruningHandle(pruner=pruner)
    adapter = Engine(spec_cls(model), pruner, handle)
    adapter.tokenizer = tokenizer
    handle.adapter = adapter
    model._prunebench_handle = handle
    return handle
