"""The model families prunebench attaches to: ``@register_family(name)`` on an adapter class.

A family is one module of `mllm_adapters` whose adapter class declares the transformers
``model_classes`` it serves and the classmethods ``build_tiny`` (a tiny model built from config, no
download: what the conformance suite runs every pruner on) and ``tiny_config`` (that model's config
alone, what settings are checked against before anything is built). `attach` picks the family by the
model's class; `available_families()` lists them.
"""

from __future__ import annotations

from typing import Any

from pruners.registry import Registry

#: Every model family: one module in `mllm_adapters/` each.
FAMILIES: Registry[type] = Registry("family", "mllm_adapters", skip={"registry", "handle", "tiny"})


def register_family(name: str):
    """Class decorator registering an adapter class as model family ``name``; it must declare
    ``model_classes`` (transformers class names) and ``build_tiny``."""
    inner = FAMILIES.register(name)

    def wrap(cls: type) -> type:
        if not getattr(cls, "model_classes", None) or not callable(getattr(cls, "build_tiny", None)):
            raise ValueError(f"family {name!r}: {cls.__qualname__} must declare model_classes and build_tiny")
        return inner(cls)

    return wrap


def available_families() -> list[str]:
    """Sorted names of every registered model family."""
    return FAMILIES.names()


def get_family(name: str) -> type:
    """The adapter class of family ``name``; a ValueError listing the known families otherwise."""
    return FAMILIES.get(name)


def supported_model_classes() -> tuple[str, ...]:
    """Every transformers model class some family attaches to, in family order."""
    return tuple(mc for cls in FAMILIES.classes() for mc in cls.model_classes)


def family_of_class(model_class: str) -> type:
    """The adapter class serving transformers class ``model_class``; a TypeError listing the supported ones."""
    for cls in FAMILIES.classes():
        if model_class in cls.model_classes:
            return cls
    raise TypeError(f"no prunebench adapter for {model_class}; supported model classes: "
                    f"{', '.join(supported_model_classes())}")


def family_for(model: Any) -> type:
    """The adapter class for ``model`` (by its class name); a TypeError listing the supported ones."""
    return family_of_class(type(model).__name__)
