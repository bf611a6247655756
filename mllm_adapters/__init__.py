"""Adapters that plug pruners into Hugging Face multimodal models (one module per model family)."""

from __future__ import annotations

from typing import Any

from mllm_adapters.handle import PruningHandle

#: Behaviour version of the adapters (hooks, prompt surgery, LLM-stage slicing): bump it whenever the
#: same pruner on the same inputs can give a different result. Part of every result cell's identity.
ENGINE_VERSION = 1

#: transformers model classes `attach` has an adapter for.
SUPPORTED_MODEL_CLASSES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")


def attach(model: Any, method: str, budget: int | None = None, tokenizer: Any = None, **params: Any) -> PruningHandle:
    """Build pruner `method` and hook it into `model`; see `pruners.apply_pruner`."""
    from pruners.registry import get_pruner_class

    cls = get_pruner_class(method)
    pruner = cls(budget=budget, **params)
    family = type(model).__name__
    if family == "LlavaForConditionalGeneration":
        from mllm_adapters.llava import LlavaAdapter

        adapter_cls = LlavaAdapter
    elif family == "LlavaNextForConditionalGeneration":
        from mllm_adapters.llava_next import LlavaNextAdapter

        adapter_cls = LlavaNextAdapter
    else:
        raise TypeError(
            f"no prunebench adapter for {family}; supported model classes: "
            f"{', '.join(SUPPORTED_MODEL_CLASSES)}"
        )
    existing = getattr(model, "_prunebench_handle", None)
    if existing is not None and not existing.removed:
        raise ValueError("this model already has a pruner attached; call handle.remove() first")
    handle = PruningHandle(pruner=pruner)
    adapter = adapter_cls(model, pruner, handle)
    adapter.tokenizer = tokenizer
    handle.adapter = adapter
    model._prunebench_handle = handle
    return handle
