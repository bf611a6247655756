"""Name -> class registries. One method, one model family, one task is one file that registers itself.

`Registry` is the one generic registry: `PRUNERS` here (``@register_pruner``), the model families in
`mllm_adapters.families` (``@register_family``) and the tasks in `benchmarks.tasks`
(``@register_task``). It lives in the lowest layer so every layer can use it without importing a
higher one. A registry imports its package's modules once, on first look-up, so their decorators run.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from pruners.base import Pruner

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes registered by name (``cls.name`` is set to it).

    kind:    what is registered, for messages ("method", "family", "task").
    package: the package whose modules register themselves (imported on first look-up).
    skip:    module names of ``package`` that register nothing (modules starting with ``_`` are skipped).
    base:    the class every registered class must subclass (checked at registration), or None.
    """

    def __init__(self, kind: str, package: str, skip: Iterable[str] = (), base: type | None = None) -> None:
        self.kind, self.package, self.skip, self.base = kind, package, set(skip), base
        self._classes: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: ``@registry.register("fastv")`` makes the class available as ``"fastv"``."""

        def wrap(cls: T) -> T:
            if self.base is not None and not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise ValueError(f"register {self.kind} {name!r}: must decorate a subclass of "
                                 f"{self.base.__name__}, got {cls!r}")
            prev = self._classes.get(name)
            same = prev is not None and (prev.__module__, prev.__qualname__) == (cls.__module__, cls.__qualname__)
            if prev is not None and not same:
                raise ValueError(f"{self.kind} name {name!r} is already registered by {prev.__qualname__}")
            cls.name = name
            self._classes[name] = cls
            return cls

        return wrap

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name not in self.skip and not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        """Sorted names of every registered class."""
        self._load()
        return sorted(self._classes)

    def classes(self) -> list[T]:
        """Every registered class, in name order."""
        return [self._classes[n] for n in self.names()]

    def get(self, name: str) -> T:
        """The class registered as ``name``; a ValueError listing the known names otherwise."""
        self._load()
        if not isinstance(name, str) or name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}")
        return self._classes[name]


#: Every pruning method: one file in `pruners/` each.
PRUNERS: Registry[type[Pruner]] = Registry("method", "pruners", skip={"registry", "base", "api", "ops", "params"})


def register_pruner(name: str):
    """Class decorator: `@register_pruner("fastv")` makes the class available as `"fastv"`."""
    return PRUNERS.register(name)


def available_pruners() -> list[str]:
    """Sorted names of every registered pruner."""
    return PRUNERS.names()


def get_pruner_class(name: str) -> type[Pruner]:
    """The class registered as `name`; a ValueError listing the known names otherwise."""
    return PRUNERS.get(name)
