"""The model families prunebench attaches to: ``@register_family(name)`` on a `FamilySpec` subclass.

A family is one module of `mllm_adapters.families` whose spec declares the transformers
``model_classes`` it serves and ``tiny_builders`` (`FamilySpec.build_tiny`: a tiny model built from
config, no download, what the conformance suite runs every pruner on; `FamilySpec.tiny_config`: that
model's config alone, what settings are checked against before anything is built). `attach` picks the
family by the model's class; `available_families()` lists them.
"""

from __future__ import annotations

from typing import Any

from mllm_adapters.engine.spec import FamilySpec
from pruners.registry import Registry

#: Every model family: one module in `mllm_adapters/families/` each.
FAMILIES: Registry[type[FamilySpec]] = Registry("family", "mllm_adapters.families", base=FamilySpec)


def register_family(name: str):
    """Class decorator registering a `FamilySpec` subclass as model family ``name``; it must declare
    ``model_classes`` (transformers class names) and ``tiny_builders``."""
    inner = FAMILIES.register(name)

    def wrap(cls: type) -> type:
        if "model_classes" not in cls.__dict__ or not cls.model_classes or not all(cls.tiny_builders):
            raise ValueError(f"family {name!r}: {cls.__qualname__} must declare model_classes and tiny_builders")
        return inner(cls)

    return wrap


def available_families() -> list[str]:
    """Sorted names of every registered model family."""
    return FAMILIES.names()


def get_family(name: str) -> type:
    """The spec class of family ``name``; a ValueError listing the known families otherwise."""
    return FAMILIES.get(name)


def supported_model_classes() -> tuple[str, ...]:
    """Every transformers model class some family attaches to, in family order."""
    return tuple(mc for cls in FAMILIES.classes() for mc in cls.model_classes)


def family_of_class(model_class: str) -> type:
    """The spec class serving transformers class ``model_class``; a TypeError listing the supported ones."""
    for cls in FAMILIES.classes():
        if model_class in cls.model_classes:
            return cls
    raise TypeError(f"no prunebench adapter for {model_class}; supported model classes: "
                    f"{', '.join(supported_model_classes())}")


def family_for(model: Any) -> type:
    """The spec class for ``model`` (by its class name); a TypeError listing the supported ones."""
    return family_of_class(type(model).__name__)


def family_of_config(config: Any) -> type[FamilySpec]:
    """The spec class of a transformers model config (by ``config.model_type``); a TypeError listing
    the supported model types otherwise. What `benchmarks/` asks before any weights load."""
    model_type = getattr(config, "model_type", None)
    for cls in FAMILIES.classes():
        if model_type in cls.model_types:
            return cls
    known = [t for cls in FAMILIES.classes() for t in cls.model_types]
    raise TypeError(f"no prunebench family for model_type {model_type!r}; supported: {', '.join(known)}")
