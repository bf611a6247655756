"""Name -> pruner class registry. One method is one file in `pruners/` that registers itself."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pruners.base import Pruner

_REGISTRY: dict[str, type[Pruner]] = {}
_LOADED = False


def register_pruner(name: str):
    """Class decorator: `@register_pruner("fastv")` makes the class available as `"fastv"`."""

    def wrap(cls: type[Pruner]) -> type[Pruner]:
        prev = _REGISTRY.get(name)
        same = prev is not None and (prev.__module__, prev.__qualname__) == (cls.__module__, cls.__qualname__)
        if prev is not None and not same:
            raise ValueError(f"pruner name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    """Import every module in the `pruners` package once so their decorators run."""
    global _LOADED
    if _LOADED:
        return
    import pruners

    skip = {"registry", "base", "api", "ops"}
    for info in pkgutil.iter_modules(pruners.__path__):
        if info.name not in skip and not info.name.startswith("_"):
            importlib.import_module(f"pruners.{info.name}")
    _LOADED = True


def available_pruners() -> list[str]:
    """Sorted names of every registered pruner."""
    _load_all()
    return sorted(_REGISTRY)


def get_pruner_class(name: str) -> type[Pruner]:
    """The class registered as `name`; a ValueError listing the known names otherwise."""
    _load_all()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(available_pruners())}")
    return _REGISTRY[name]
