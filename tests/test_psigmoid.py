"""`psigmoid` (P-Sigmoid): the parametric sigmoid schedule, its budget semantics (equivalent tokens <=
budget, budget None / >= N keeps all), parameter errors, the declared search space running through the
general tuner (benchmarks.tune) on the tiny LLaVA, and the shipped conf/method/psigmoid*.yaml."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from benchmarks.tune import build_calibration, resolve_space, tune
from mllm_adapters import apply_pruner
from pruners import get_pruner_class
from pruners._ratio_schedule import scale_for_budget, schedule_counts
from pruners._schedule import equivalent_tokens
from pruners.base import ModelInfo
from pruners.psigmoid import psigmoid_fractions
from tests.conftest import make_images

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore:provider=hydra.searchpath in main, path=.*tuned is not available")


def embedded_info() -> ModelInfo:
    return ModelInfo(family="llava", num_visual_tokens=144, grid_hw=(12, 12), has_cls=True, vision_num_layers=4,
                     vision_feature_layer=2, vision_num_heads=4, llm_num_layers=8, llm_hidden_size=64)


def test_sigmoid_formula():
    f = psigmoid_fractions(8, k=10.0, alpha=0.5, b=0.2)
    assert f[0] == 1.0 and len(f) == 8 and all(x >= y for x, y in zip(f, f[1:]))
    for layer in range(1, 8):
        assert f[layer] == pytest.approx(0.2 + 0.8 / (1 + math.exp(10.0 * (layer / 8 - 0.5))))
    assert f[4] == pytest.approx(0.2 + 0.8 / 2)  # the midpoint: half way between 1 and the floor
    assert psigmoid_fractions(4, k=1000.0, alpha=0.6, b=0.0)[1:] == pytest.approx([1.0, 1.0, 0.0])  # a step
    assert psigmoid_fractions(32, k=50.0, alpha=0.0, b=0.3)[-1] == pytest.approx(0.3)


def test_budget_semantics(tiny, batch):
    model, _ = tiny
    for budget in (9, 12, 20, 30):
        with apply_pruner(model, "psigmoid", budget=budget) as h, torch.no_grad():
            model(**batch)
            counts = [list(c.llm_visual) for c in h.token_counts]
            p = h.pruner
            assert not p.chooses_budget and counts == [p.token_schedule()] * 2
            assert equivalent_tokens(counts[0]) <= budget
            f = psigmoid_fractions(4, 10.0, 0.5, 0.0)
            assert counts[0] == schedule_counts(f, 36, scale_for_budget(f, 36, budget))
    for budget in (None, 36):
        with apply_pruner(model, "psigmoid", budget=budget) as h:
            assert h.pruner.keeps_all and h.pruner.llm_layers() == []


@pytest.mark.parametrize("params,name", [({"k": 0.0}, "k"), ({"k": -1}, "k"), ({"alpha": 1.5}, "alpha"),
                                         ({"b": 1.0}, "b"), ({"b": -0.1}, "b"), ({"positions": "x"}, "positions"),
                                         ({"k": "steep"}, "k"), ({"k": float("nan")}, "k")])
def test_parameter_errors_name_the_parameter(params, name):
    with pytest.raises(ValueError, match=rf"psigmoid: parameter {name}="):
        get_pruner_class("psigmoid")(budget=12, **params)


def test_search_space_is_declared_for_the_tuner(tiny):
    cls = get_pruner_class("psigmoid")
    assert set(resolve_space(cls)) == {"k", "alpha", "b"}
    model, processor = tiny
    prompts = [f"USER: <image> {q} ASSISTANT:" for q in ("what is the colour of the circle ?", "how many ?")] * 2
    calib = build_calibration(model, processor, make_images(4, seed=1), prompts, batch_size=4)
    result = tune(calib, "psigmoid", target=12, n_trials=4, n_initial=2, seed=0)
    assert result.n_feasible == 4 and result.cost <= 12 and set(result.searched) == {"k", "alpha", "b"}
    assert -1 <= result.objective <= 1 + 1e-6


# ---- the shipped configs ----------------------------------------------------------------------------------
def _compose(overrides):
    from hydra import compose, initialize_config_dir

    import benchmarks.run  # noqa: F401  (registers the method configs)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_shipped_tuned_config_and_method_psigmoid_compose_it():
    tuned = _compose(["method=psigmoid_tuned_eq36"]).method
    assert tuned.name == "psigmoid" and tuned.variant == "psigmoid_tuned_eq36"
    t = tuned.tuned
    assert t.model == "embedded" and t.target.equiv_tokens == 36 and t.equiv_tokens <= 36
    assert set(t.searched) == {"k", "alpha", "b"}
    # the recorded equivalent tokens are the pure schedule's at the recorded budget
    p = get_pruner_class("psigmoid")(budget=int(t.budget), **OmegaConf.to_container(tuned.params))
    p.attach(embedded_info())
    assert equivalent_tokens(p.token_schedule()) == pytest.approx(float(t.equiv_tokens))
    # method=psigmoid is the tuned shape (composed from the tuned file, not a copy), under its own label
    plain = _compose(["method=psigmoid"]).method
    assert plain.name == "psigmoid" and plain.variant == "psigmoid"
    assert OmegaConf.to_container(plain.params) == OmegaConf.to_container(tuned.params)
    text = (ROOT / "conf" / "method" / "psigmoid.yaml").read_text()
    assert "psigmoid_tuned_eq36" in text and "k:" not in text


@pytest.mark.slow
def test_shipped_objective_is_reproduced():
    """`python -m benchmarks.tune mode=evaluate method=psigmoid_tuned_eq36` recomputes the recorded
    objective (about 15 s on the embedded model)."""
    from benchmarks.tune import run

    cfg = _compose(["method=psigmoid_tuned_eq36"])
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        tcfg = compose(config_name="tune", overrides=["mode=evaluate", "method=psigmoid_tuned_eq36"])
    summary = run(tcfg)
    assert summary["objective"] == pytest.approx(float(cfg.method.tuned.objective), abs=1e-5)
    assert summary["equiv_tokens"] == pytest.approx(float(cfg.method.tuned.equiv_tokens))
