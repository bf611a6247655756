"""The general tuner (benchmarks/tune.py) on the tiny LLaVA: it improves the flow objective over its
initial points, respects the compute constraint (checked against the token counts the adapter really
produces), works for pruners without a pure schedule, and its output config reproduces its objective."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from benchmarks.flops import equiv_tokens, prefill_flops
from benchmarks.tune import (
    build_calibration,
    cost,
    objective,
    reference_vision_counts,
    resolve_space,
    run,
    target_tag,
    tune,
    write_tuned_config,
)
from pruners import apply_pruner, get_pruner_class
from tests.conftest import make_images

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["what is the colour of the circle ?", "how many ?", "what shape is at row one ?",
             "is there a red square ?"]


@pytest.fixture(scope="module")
def calib(tiny):
    model, processor = tiny
    prompts = [f"USER: <image> {q} ASSISTANT:" for q in QUESTIONS * 2]
    return build_calibration(model, processor, make_images(8, seed=1), prompts, batch_size=8)


def _measured_counts(calib, method, budget, params):
    """Token counts the adapter actually produced on the first calibration batch."""
    with apply_pruner(calib.model, method, budget=budget, **params) as h, torch.no_grad():
        calib.model(**calib.batches[0])
        return dict(h.token_counts)


def test_objective_is_one_when_keeping_everything(calib):
    assert abs(objective(calib, "vflowopt", None, {}) - 1.0) < 1e-6


@pytest.mark.parametrize("method,target", [("vflowopt", 9), ("transprune", 20), ("pdrop", 16)])
def test_tuner_improves_over_initial_points_and_respects_equiv_constraint(calib, method, target):
    r = tune(calib, method, target=target, n_trials=20, n_initial=5, seed=0)
    assert r.objective > r.initial_best  # the model-based phase found a better point than the random start
    assert r.cost <= target
    assert all(h["cost"] <= target for h in r.history if "cost" in h)
    counts = _measured_counts(calib, method, r.budget, r.params)
    assert equiv_tokens(counts, 4, 36) == pytest.approx(r.cost) and equiv_tokens(counts, 4, 36) <= target


def test_tuner_respects_a_flops_constraint(calib):
    r = tune(calib, "transprune", target=0.8, kind="flops_rel", n_trials=8, n_initial=4, seed=0)
    counts = _measured_counts(calib, "transprune", r.budget, r.params)
    n_text = round(calib.n_text)
    cfg = calib.model.config
    measured = (prefill_flops(cfg, n_text, counts).total
                / prefill_flops(cfg, n_text, {"vision": reference_vision_counts(calib.info)}).total)
    assert measured == pytest.approx(r.cost) and measured <= 0.8
    # the solved budget is the largest that fits: one more token breaks the constraint
    bigger = _measured_counts(calib, "transprune", r.budget + 1, r.params)
    assert cost(calib, bigger, "flops_rel") > 0.8


def test_tuner_measures_counts_for_pruners_without_a_schedule(calib):
    """FastV has no token_schedule(): counts come from a measured forward pass."""
    r = tune(calib, "fastv", target=20, space={"layer": ["int", 1, 3]}, n_trials=4, n_initial=2, seed=0)
    assert r.cost <= 20
    # equiv = (K * 36 + (4 - K) * budget) / 4 <= 20 with the largest budget (K = 3 is infeasible)
    k = r.params["layer"]
    assert r.budget == (80 - 36 * k) // (4 - k)


def test_search_space_and_target_errors(calib):
    with pytest.raises(ValueError, match="space.r_v"):
        resolve_space(get_pruner_class("vflowopt"), {"r_v": ["float", 0.5, 0.1]})
    with pytest.raises(ValueError, match="declares no search_space"):
        resolve_space(get_pruner_class("fastv"))
    with pytest.raises(ValueError, match="sampler"):
        tune(calib, "vflowopt", target=9, sampler="annealing", n_trials=1, n_initial=1)
    with pytest.raises(ValueError, match="no trial"):
        tune(calib, "transprune", target=2, n_trials=2, n_initial=2)
    assert target_tag("equiv_tokens", 36) == "eq36" and target_tag("flops_rel", 0.25) == "flops0p25"


def test_cli_writes_a_config_that_reproduces_its_objective(tmp_path):
    """`python -m benchmarks.tune` end to end (tiny model, shapes calibration split), then
    `mode=evaluate` on the written config recomputes the same objective."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["model=tiny", "method=vflowopt", "target_equiv_tokens=9", "calib_samples=4", "n_trials=4",
            "n_initial=2", f"out_dir={tmp_path}", "num_threads=1", "progress=false"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.tune", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = tmp_path / "vflowopt_tuned_eq9.yaml"
    written = OmegaConf.load(path)
    assert written.name == "vflowopt" and written.tuned.equiv_tokens <= 9
    assert set(written.params) == set(get_pruner_class("vflowopt").defaults)
    # evaluate the written config the way the runner would load it (method group = the file)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("tune", overrides=["model=tiny", "mode=evaluate", "calib_samples=4", "num_threads=1"])
    OmegaConf.set_struct(cfg, False)
    cfg.method = written
    summary = run(cfg)
    assert summary["objective"] == pytest.approx(float(written.tuned.objective), abs=1e-6)
    assert summary["equiv_tokens"] == pytest.approx(float(written.tuned.equiv_tokens))


def test_written_config_is_runner_compatible(calib, tmp_path):
    r = tune(calib, "vflowopt", target=9, n_trials=3, n_initial=3, seed=0)
    path = write_tuned_config(r, tmp_path, {"model": "tiny"})
    conf = OmegaConf.to_container(OmegaConf.load(path))
    assert path.name == "vflowopt_tuned_eq9.yaml"
    # the runner builds the pruner from name + params
    p = get_pruner_class(conf["name"])(budget=conf["tuned"]["budget"], **conf["params"])
    assert p.params == r.params and conf["tuned"]["objective"] == r.objective
    assert set(conf["tuned"]["searched"]) == set(get_pruner_class("vflowopt").search_space)


def test_tuner_is_seeded(calib):
    runs = [tune(calib, "vflowopt", target=9, n_trials=6, n_initial=3, seed=s).history for s in (0, 0, 1)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_gp_sampler_runs(calib):
    """scipy is a dependency, so the Gaussian-process sampler is always available."""
    r = tune(calib, "vflowopt", target=9, n_trials=3, n_initial=2, sampler="gp", seed=0)
    assert r.cost <= 9


# ---- LLaVA-NeXT (anyres): the constraint is the mean of each image's own cost ---------------------
NEXT_SIZES = [(40, 60), (30, 80), (40, 60)]  # (h, w) px: 70, 52 and 70 visual tokens (tiny-next)


@pytest.fixture(scope="module")
def next_calib():
    import numpy as np
    from PIL import Image

    from mllm_adapters.tiny import build_tiny_llava_next

    model, processor = build_tiny_llava_next(seed=0)
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in NEXT_SIZES]
    prompts = [f"USER: <image> {q} ASSISTANT:" for q in QUESTIONS[:3]]
    return build_calibration(model, processor, images, prompts, batch_size=2)  # the first batch is ragged


def _runner_cost(calib, method, budget, params, kind):
    """The runner's figures (`sample_cost` per sample of every batch) at the tuner's mean text length."""
    from benchmarks.flops import sample_cost

    per = []
    with apply_pruner(calib.model, method, budget=budget, **params) as h, torch.no_grad():
        for enc in calib.batches:
            calib.model(**enc)
            per += [sample_cost(calib.model.config, round(calib.n_text), h.token_counts, b)
                    for b in range(len(enc["input_ids"]))]
    assert [c.visual_in for c in per] == [70, 52, 70]
    if kind == "equiv_tokens":
        return sum(c.equiv_tokens for c in per) / len(per)
    return sum(c.flops.total for c in per) / sum(c.reference for c in per)


def test_next_calibration_probes_one_sample_per_image_size(next_calib):
    assert [(tuple(e["image_sizes"][0].tolist()), w) for e, w in next_calib.probes] == [((40, 60), 2 / 3),
                                                                                        ((30, 80), 1 / 3)]
    assert next_calib.info.num_visual_tokens == 88  # the longest run any image can have: the budget range


@pytest.mark.parametrize("method,kind,target,params", [("pdrop", "equiv_tokens", 40, {}),
                                                       ("fastv", "flops_rel", 0.8, {})])
def test_next_tuner_meets_the_runners_per_image_constraint(next_calib, method, kind, target, params):
    """PDrop has a pure schedule, but it is computed from the model's longest run (88): on NeXT the counts
    are measured, so the tuner's cost is the runner's mean over the calibration images (70, 52, 70
    tokens), and the solved budget is the largest meeting the target."""
    space = {"lam": ["float", 0.3, 0.5]} if method == "pdrop" else {"layer": ["int", 1, 3]}
    r = tune(next_calib, method, target=target, kind=kind, base_params=params, space=space, n_trials=2,
             n_initial=2, seed=0)
    assert r.cost == pytest.approx(_runner_cost(next_calib, method, r.budget, r.params, kind)) and r.cost <= target
    assert _runner_cost(next_calib, method, r.budget + 1, r.params, kind) > target
    if method == "pdrop":  # the schedule of an 88-token image is not what these images get
        p = get_pruner_class("pdrop")(budget=r.budget, **r.params)
        p.attach(next_calib.info)
        assert equiv_tokens({"llm_visual": p.token_schedule()}, 4, 88) != pytest.approx(r.cost)


def test_next_evaluate_validates_the_budget_like_the_runner():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("tune", overrides=["model=tiny-next", "mode=evaluate", "budget=89", "calib_samples=1",
                                         "num_threads=1"])
    with pytest.raises(ValueError, match=r"budgets: 89 is above the 88 visual tokens of the longest image run"):
        run(cfg)
