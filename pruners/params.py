"""Typed parameter declarations for pruners: one `Param` per parameter.

A pruner declares ``parameters = {"layer": Param(int, 2, low=1, doc="...")}``; `pruners.base.Pruner`
derives ``defaults`` (name -> default) and ``search_space`` (name -> the tuner's range) from it and
checks every value given to the constructor with `Param.check`, so a bad value fails at
``apply_pruner`` with a ValueError naming the parameter and what it accepts, never deep in a forward.
Checks that need the model (e.g. a layer index against the model's depth) stay in ``attach(info)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Parameter kinds; ``object`` accepts any value (test-only pruners passing tensors, for instance).
KINDS = (int, float, bool, str, list, object)
SEARCH_KINDS = ("int", "float", "categorical")
#: ``positions`` of in-LLM pruners (read by the adapter): kept tokens keep their RoPE positions or are
#: renumbered contiguously.
POSITIONS = ("original", "compact")


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Param:
    """One pruner parameter.

    kind:      int | float | bool | str | list | object. Bool is not an int here; ints are accepted
               where a float is expected (stored as given).
    default:   the value used when the parameter is not given (``None`` makes it nullable).
    low, high: inclusive bounds (``low_inclusive`` / ``high_inclusive`` = False: exclusive); for a
               list they bound every item.
    finite:    floats (and float list items) must be finite (no nan/inf).
    choices:   the accepted values (categorical parameters).
    item:      list item kind, int or float; ``length``: the exact list length, if fixed.
    nullable:  ``None`` is accepted (default: when the default is None).
    search:    the tuner's range: ("int" | "float", low, high[, "log"]) or ("categorical", [choices]).
    folds_into: a flat spelling of another parameter (e.g. TransPrune's ``ratio_1`` for ``ratios[0]``,
               for the tuner): checked, then folded by the pruner's ``check_params``; it is not in
               ``defaults`` nor in the resolved ``Pruner.params``.
    doc:       one line saying what the parameter does.
    """

    kind: type
    default: Any = None
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    finite: bool = True
    choices: tuple | None = None
    item: type | None = None
    length: int | None = None
    nullable: bool | None = None
    search: tuple | None = None
    folds_into: str | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TypeError(f"Param kind must be one of {[k.__name__ for k in KINDS]}, got {self.kind!r}")
        if self.kind is list and self.item not in (int, float):
            raise TypeError(f"a list Param needs item=int or item=float, got {self.item!r}")
        if self.kind is not list and (self.item is not None or self.length is not None):
            raise TypeError("item and length are for list parameters only")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
        if self.nullable is None:
            object.__setattr__(self, "nullable", self.default is None)
        if self.search is not None:
            object.__setattr__(self, "search", tuple(self.search))

    # ---- checking ------------------------------------------------------------------------------
    def check(self, name: str, value: Any, method: str = "") -> Any:
        """``value`` unchanged if accepted, else a ValueError naming ``name`` and what is accepted."""
        problem = self.problem(value)
        if problem is not None:
            prefix = f"{method}: " if method else ""
            raise ValueError(
                f"{prefix}parameter {name}={value!r} {problem}; accepted: {self.accepted()}"
                + (f" -- {name}: {self.doc}" if self.doc else "")
            )
        return value

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused (a phrase), or None when it is accepted."""
        if value is None:
            return None if self.nullable else "is not allowed to be null"
        if self.kind is object:
            return None
        if self.kind is list:
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                return "is not a list"
            if self.length is not None and len(value) != self.length:
                return f"has {len(value)} item(s), not {self.length}"
            for v in value:
                p = self._scalar_problem(self.item, v)
                if p is not None:
                    return f"has an item {v!r} that {p}"
            return None
        return self._scalar_problem(self.kind, value)

    def _scalar_problem(self, kind: type, v: Any) -> str | None:
        if kind is bool:
            if not isinstance(v, bool):
                return "is not true or false"
        elif kind is int:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                return "is not an int"
        elif kind is float:
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                return "is not a number"
            if self.finite and not math.isfinite(float(v)):
                return "is not finite"
        elif kind is str and not isinstance(v, str):
            return "is not a string"
        if self.choices is not None and v not in self.choices:
            return "is not one of the choices"
        if kind in (int, float):
            if self.low is not None and (v < self.low if self.low_inclusive else v <= self.low):
                return "is out of range"
            if self.high is not None and (v > self.high if self.high_inclusive else v >= self.high):
                return "is out of range"
        return None

    def accepted(self) -> str:
        """What the parameter accepts, as a phrase (``a finite float in (0, 1] or null``)."""
        if self.kind is object:
            text = "any value"
        elif self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind is list:
            n = f"{self.length} " if self.length is not None else ""
            text = f"a list of {n}{self._scalar_phrase(self.item, plural=True)}"
        else:
            text = self._scalar_phrase(self.kind)
        return text + (" or null" if self.nullable and self.kind is not object else "")

    def _scalar_phrase(self, kind: type, plural: bool = False) -> str:
        if kind is bool:
            return "true or false"
        if kind is str:
            return "strings" if plural else "a string"
        if kind is int:
            base = "ints" if plural else "an int"
        else:
            base = ("finite floats" if plural else "a finite float") if self.finite else (
                "floats" if plural else "a float")
        return base + self._range_phrase()

    def _range_phrase(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f" in {'[' if self.low_inclusive else '('}{_num(lo)}, {_num(hi)}{']' if self.high_inclusive else ')'}"
        if lo is not None:
            return f" {'>=' if self.low_inclusive else '>'} {_num(lo)}"
        if hi is not None:
            return f" {'<=' if self.high_inclusive else '<'} {_num(hi)}"
        return ""

    # ---- declaration checks ------------------------------------------------------------------
    def validate_declaration(self, name: str, owner: str) -> None:
        """At class creation: the default and every end of the search range must be accepted."""
        where = f"{owner}.parameters[{name!r}]"
        if self.default is not None:
            p = self.problem(self.default)
            if p is not None:
                raise TypeError(f"{where}: the default {self.default!r} {p} (accepted: {self.accepted()})")
        s = self.search
        if s is None:
            return
        if not s or s[0] not in SEARCH_KINDS:
            raise TypeError(f"{where}: search must start with one of {SEARCH_KINDS}, got {s!r}")
        if s[0] == "categorical":
            if len(s) != 2 or not list(s[1]):
                raise TypeError(f"{where}: search must be ('categorical', [choices...]), got {s!r}")
            points = list(s[1])
        else:
            if len(s) not in (3, 4) or not s[1] < s[2] or (len(s) == 4 and s[3] != "log"):
                raise TypeError(f"{where}: search must be ({s[0]!r}, low, high[, 'log']) with low < high, got {s!r}")
            points = [s[1], s[2]]
        for v in points:
            p = self.problem(v)
            if p is not None:
                raise TypeError(f"{where}: the search range holds {v!r}, which {p} (accepted: {self.accepted()})")


def layer_index(method: str, name: str, value: int | None, n_layers: int, last: int, default: int,
                what: str = "ViT") -> int:
    """Resolve a layer parameter against the model (call it in ``attach``).

    ``None`` -> ``default``; a non-negative int is used as given; a negative one counts back from the
    end of the ``n_layers``-layer stack (-1 = its last layer). The result must lie in 0..``last``
    (e.g. the ViT feature layer LLaVA takes), else a ValueError naming ``name`` and the accepted range.
    """
    if value is None:
        return default
    s = n_layers + value if value < 0 else value
    if not 0 <= s <= last:
        raise ValueError(
            f"{method}: parameter {name}={value!r} is outside this model's layers; accepted: null (default), "
            f"an int in 0..{last}, or a negative int -{n_layers} <= {name} <= {last - n_layers} "
            f"(counted back from the end of the {n_layers}-layer {what})"
        )
    return s


def check_decoder_layer(method: str, k: int, n_layers: int, param: str = "layer") -> int:
    """An in-LLM pruning layer K given as parameter ``param``: a ValueError naming it unless
    1 <= K < n_layers (layers before K see every token). Returns K."""
    if not 1 <= k < n_layers:
        raise ValueError(
            f"{method}: parameter {param}={k!r} is outside this model's decoder layers; accepted: an int in "
            f"1..{n_layers - 1} (layers before K see every token)"
        )
    return k
