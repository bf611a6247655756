"""Typed parameter declarations (`pruners.params.Param`): every bad value fails at `apply_pruner` with a
ValueError naming the parameter and what it accepts, before any forward pass."""

from __future__ import annotations

import math

import pytest

from mllm_adapters import apply_pruner
from pruners import available_pruners, get_pruner_class
from pruners.base import Pruner
from pruners.params import Param

NAN = float("nan")

# The cases: each was accepted, then failed deep in forward (or was silently changed).
BAD = [
    ("vflowopt", {"pixel_mean": "x"}, ["pixel_mean", "a list of 3 finite floats"]),
    ("vflowopt", {"pixel_mean": [1.0]}, ["pixel_mean", "1 item(s)", "a list of 3"]),
    ("vflowopt", {"alpha": NAN}, ["alpha", "not finite"]),
    ("vflowopt", {"pixel_std": [0, 0, 0]}, ["pixel_std", "> 0"]),
    ("vflowopt", {"t": NAN}, ["t=nan", "not finite"]),
    ("recoverable", {"text_weight": "x"}, ["text_weight", "a finite float"]),
    ("recoverable", {"lof_threshold": "x"}, ["lof_threshold", "a finite float > 0"]),
    ("recoverable", {"lof_threshold": NAN}, ["lof_threshold", "not finite"]),
    ("recoverable", {"lof_threshold": -1}, ["lof_threshold", "> 0"]),
    ("transprune", {"ratio_1": 0.5, "ratio_2": 0.9}, ["ratio_1=0.5", "ratio_2=0.9", "non-increasing"]),
    ("random", {"seed": "abc"}, ["seed", "an int"]),
    # layer parameters resolve the same way once the model is known (tiny: 4 ViT layers, feature layer 2)
    ("recoverable", {"score_layer": -99}, ["score_layer=-99", "0..2", "-4 <= score_layer <= -2"]),
    ("vtc_cls", {"start_layer": -99}, ["start_layer=-99", "0..2", "-4 <= start_layer <= -2"]),
    ("vflowopt", {"vision_layer": -99}, ["vision_layer=-99", "0..2", "-4 <= vision_layer <= -2"]),
]


@pytest.mark.parametrize("method,params,words", BAD, ids=[f"{m}-{'-'.join(p)}-{i}" for i, (m, p, _) in enumerate(BAD)])
def test_bad_value_fails_at_apply_pruner_naming_the_parameter(tiny, method, params, words):
    model, _ = tiny
    with pytest.raises(ValueError) as exc:
        apply_pruner(model, method, budget=6, **params)
    msg = str(exc.value)
    assert "accepted" in msg and method in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert not model._forward_pre_hooks  # nothing left attached


def test_negative_layers_count_back_from_the_end_consistently(tiny):
    """-2 is the tiny model's feature layer (2 of 4) for every ViT layer parameter."""
    model, _ = tiny
    for method, name, attr in [("recoverable", "score_layer", "_layer"), ("vtc_cls", "start_layer", "_start"),
                               ("vflowopt", "vision_layer", "_vision_layer")]:
        with apply_pruner(model, method, budget=6, **{name: -2}) as h:
            assert getattr(h.pruner, attr) == 2, method
        with apply_pruner(model, method, budget=6, **{name: -4}) as h:
            assert getattr(h.pruner, attr) == 0, method


# ---- every registered pruner, every declared parameter -------------------------------------------
#: values of the wrong type for each kind (bool is not an int; a str is not a list)
WRONG = {int: ["x", 1.5, True], float: ["x", True], bool: ["x", 1], str: [1, True], list: ["x", 1, {"a": 1}]}


def _declared() -> list[tuple[str, str, Param]]:
    """(method, parameter, declaration) of every pruner shipped in the pruners package."""
    out = []
    for method in available_pruners():
        cls = get_pruner_class(method)
        if cls.__module__.startswith("pruners."):
            out += [(method, name, p) for name, p in cls.parameters.items()]
    return out


DECLARED = _declared()
IDS = [f"{m}.{n}" for m, n, _ in DECLARED]


def test_every_shipped_pruner_declares_typed_parameters():
    assert {"fastv", "vflowopt", "recoverable", "transprune", "vtc_cls"} <= {m for m, _, _ in DECLARED}
    for method in available_pruners():
        cls = get_pruner_class(method)
        if not cls.__module__.startswith("pruners."):
            continue
        assert all(isinstance(p, Param) and p.kind is not object for p in cls.parameters.values()), method
        # defaults and search_space are derived from the declarations
        assert cls.defaults == {k: p.default for k, p in cls.parameters.items() if p.folds_into is None}
        assert cls.search_space == {k: p.search for k, p in cls.parameters.items() if p.search is not None}


@pytest.mark.parametrize("method,name,param", DECLARED, ids=IDS)
def test_wrong_type_is_refused_naming_the_parameter(method, name, param):
    cls = get_pruner_class(method)
    for bad in WRONG[param.kind]:
        with pytest.raises(ValueError) as exc:
            cls(budget=None, **{name: bad})
        msg = str(exc.value)
        assert f"{name}={bad!r}" in msg and "accepted" in msg, msg
    if param.kind is float and param.finite:
        with pytest.raises(ValueError, match=f"{name}=nan"):
            cls(budget=None, **{name: NAN})


@pytest.mark.parametrize("method,name,param", DECLARED, ids=IDS)
def test_default_is_accepted(tiny, method, name, param):
    """Each declared default passes its own check and attaches (with the method's ``conformance_params``
    for the others: gsearch's schedule); a method refusing every model without its files (``"*"``
    opt-out: dyvte without weights) must accept the default at construction and refuse at attach."""
    model, _ = tiny
    cls = get_pruner_class(method)
    budget = None if cls(budget=None).chooses_budget else 6
    if "*" in cls.conformance_opt_outs or name in cls.conformance_params:  # the default is what refuses
        assert cls(budget=budget, **{name: param.default}).params == cls(budget=budget).params
        with pytest.raises(ValueError, match=method):
            apply_pruner(model, method, budget=budget, **{name: param.default})
        return
    fixed = {k: v for k, v in cls.conformance_params.items() if k != name}
    with apply_pruner(model, method, budget=budget, **fixed, **{name: param.default}) as h:
        assert h.pruner.params == cls(budget=budget, **fixed).params


# ---- Param itself ---------------------------------------------------------------------------------
def test_param_kinds_and_messages():
    f = Param(float, 0.5, low=0, high=1, low_inclusive=False, doc="a keep fraction")
    assert f.check("r", 1) == 1 and f.check("r", 0.25) == 0.25  # ints are floats; values kept as given
    for bad, why in [(0, "out of range"), (1.5, "out of range"), (math.inf, "not finite"), (True, "not a number"),
                     (None, "null")]:
        with pytest.raises(ValueError, match=why) as exc:
            f.check("r", bad, "m")
        assert str(exc.value).startswith(f"m: parameter r={bad!r}") and "accepted: a finite float in (0, 1]" in str(exc.value)
    assert Param(float, None).check("r", None) is None  # a None default makes it nullable
    assert Param(float, 0.0, finite=False).check("x", math.inf) == math.inf
    with pytest.raises(ValueError, match="not an int"):
        Param(int, 1).check("k", True)
    lst = Param(list, None, item=int, length=2)
    assert lst.check("layers", (1, 2)) == (1, 2)
    with pytest.raises(ValueError, match=r"has an item 1.5"):
        lst.check("layers", [1, 1.5])
    with pytest.raises(ValueError, match=r"one of 'a', 'b'"):
        Param(str, "a", choices=("a", "b")).check("c", "z")


def test_declarations_are_checked_at_class_creation():
    with pytest.raises(TypeError, match="default"):
        type("BadDefault", (Pruner,), {"parameters": {"x": Param(int, "two")}})
    with pytest.raises(TypeError, match="search range"):
        type("BadSearch", (Pruner,), {"parameters": {"x": Param(float, 0.5, low=0, high=1, search=("float", 0, 2))}})
    with pytest.raises(TypeError, match="by hand"):  # search_space is derived, never written
        type("HandSpace", (Pruner,), {"search_space": {"x": ("float", 0, 1)}})
    with pytest.raises(TypeError, match="by hand"):  # a shipped pruner must declare typed parameters
        type("HandDefaults", (Pruner,), {"defaults": {"x": 1}, "__module__": "pruners.hand"})
