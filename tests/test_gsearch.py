"""`gsearch` (G-Search) and the shared keep-fraction runtime (`pruners._ratio_schedule`): schedule ->
counts and equivalent tokens, the budget's scaling (equivalent tokens <= budget, monotone, closest),
depth-scaled resampling, every parameter's error, the null schedule's and the found_on mismatch's
errors, the per-image counts of a schedule run as found; the G-Search routine
(`benchmarks.schedule_search.g_search`) on the tiny LLaVA (deterministic, non-increasing, each layer's
count passes the threshold and count - 1 does not); the shipped conf/method/gsearch.yaml."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from benchmarks.schedule_search import g_search, parse_args, schedule_of
from benchmarks.tune import build_calibration, objective
from mllm_adapters import apply_pruner
from pruners import get_pruner_class
from pruners._ratio_schedule import (
    budget_counts,
    check_fractions,
    fraction_count,
    max_scale,
    pruning_layers,
    resample_depth,
    scale_for_budget,
    schedule_counts,
)
from pruners._schedule import equivalent_tokens
from pruners.base import ModelInfo
from pruners.gsearch import EMBEDDED_SCHEDULE, model_identity
from tests.conftest import PROMPTS, make_images, random_images

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "benchmarks" / "assets" / "embedded"
pytestmark = pytest.mark.filterwarnings("ignore:provider=hydra.searchpath in main, path=.*tuned is not available")
SCHEDULE = [1.0, 0.5, 0.5, 0.25]  # the tiny LLaVA has 4 decoder layers, 36 visual tokens


def info(n: int = 144, layers: int = 8, checkpoint_dir: str | None = None) -> ModelInfo:
    return ModelInfo(family="llava", num_visual_tokens=n, grid_hw=(12, 12), has_cls=True, vision_num_layers=4,
                     vision_feature_layer=2, vision_num_heads=4, llm_num_layers=layers, llm_hidden_size=64,
                     checkpoint_dir=checkpoint_dir)


# ---- schedule -> counts, equivalent tokens, budget scaling (no model) -------------------------------------
def test_counts_and_equivalent_tokens():
    assert [fraction_count(f, 144) for f in (1.0, 0.5, 0.25, 0.0, 1 / 144, 0.003)] == [144, 72, 36, 0, 1, 0]
    assert all(fraction_count(c / 144, 144) == c for c in range(145))  # found counts come back exactly
    counts = schedule_counts(SCHEDULE, 36)
    assert counts == [36, 18, 18, 9] and equivalent_tokens(counts) == pytest.approx(81 / 4)
    assert schedule_counts(SCHEDULE, 36, scale=4.0) == [36, 36, 36, 36]  # capped at n
    assert budget_counts(SCHEDULE, 36, None) == ([36, 18, 18, 9], 1.0)
    assert max_scale(SCHEDULE) == 2.0 and max_scale([1.0, 0.0, 0.0]) == 1.0
    assert pruning_layers([1.0, 1.0, 0.5, 0.5, 0.2], scaled=False) == [2, 4]
    assert pruning_layers([1.0, 1.0, 0.5, 0.5, 0.2], scaled=True) == [1, 2, 4]
    assert pruning_layers([1.0, 0.9, 0.9], scaled=False) == [1]


@pytest.mark.parametrize("fractions,n", [(SCHEDULE, 36), (list(EMBEDDED_SCHEDULE), 144),
                                         ([1.0, 0.9, 0.6, 0.6, 0.3, 0.1, 0.0, 0.0], 144)])
def test_budget_scaling_meets_the_budget_closest_from_below_and_is_monotone(fractions, n):
    L = len(fractions)
    floor = n / L  # layer 0 always sees every token
    prev = -1.0
    for budget in range(1, n):
        s = scale_for_budget(fractions, n, budget)
        counts = schedule_counts(fractions, n, s)
        e = equivalent_tokens(counts)
        assert counts[0] == n and all(a >= b for a, b in zip(counts, counts[1:]))
        if budget >= floor:
            assert e <= budget + 1e-9
            # closest from below: a slightly larger scale (the next step of the function) exceeds the budget,
            # unless the shape is already at its largest scale
            if s < max_scale(fractions):
                assert equivalent_tokens(schedule_counts(fractions, n, s * (1 + 1e-6) + 1e-9)) > budget
        else:  # below n / L: the smallest reachable count, every visual token dropped from layer 1
            assert s == 0.0 and e == floor
        assert e >= prev  # monotone in the budget
        prev = e


def test_depth_scaled_resampling():
    src = [1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.0]
    assert resample_depth(src, 8) == src  # the source's own depth: unchanged
    assert resample_depth(src, 4) == [1.0, 0.8, 0.4, 0.1]  # layers 0, 2, 4, 6 of the source
    r = resample_depth(src, 32)
    assert len(r) == 32 and r[0] == 1.0 and all(a >= b for a, b in zip(r, r[1:]))
    assert r[4] == pytest.approx(1.0) and r[10] == pytest.approx(0.8 * 0.5 + 0.6 * 0.5)
    assert resample_depth(list(EMBEDDED_SCHEDULE), 8) == list(EMBEDDED_SCHEDULE)
    check_fractions(resample_depth(list(EMBEDDED_SCHEDULE), 40), "gsearch", n_layers=40)


# ---- parameters -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule,match", [
    ("bogus", r"schedule='bogus' is not a list; accepted: a list of finite floats in \[0, 1\] or null"),
    ([0.5, 0.5], r"schedule starts with 0.5, not 1.0"),
    ([1.0, 0.5, 0.7], r"schedule increases at layer 2"),
    ([1.0, 1.5], r"schedule=\[1.0, 1.5\] has an item 1.5 that is out of range"),
    ([1.0, True], r"schedule=\[1.0, True\] has an item True"),
    ([], r"schedule=\[\] is empty"),
    (3, r"schedule=3 is not a list"),
])
def test_schedule_errors_name_the_parameter(schedule, match):
    with pytest.raises(ValueError, match=match):
        get_pruner_class("gsearch")(budget=12, schedule=schedule)


def test_other_parameter_errors():
    cls = get_pruner_class("gsearch")
    with pytest.raises(ValueError, match=r"found_on=.*is for a found schedule"):
        cls(depth_scaled=True, found_on="abc")
    with pytest.raises(ValueError, match=r"schedule and depth_scaled=true are exclusive"):
        cls(depth_scaled=True, schedule=SCHEDULE)
    with pytest.raises(ValueError, match="depth_scaled"):
        cls(depth_scaled="yes")
    with pytest.raises(ValueError, match="positions"):
        cls(depth_scaled=True, positions="sideways")
    with pytest.raises(ValueError, match="found_on"):
        cls(schedule=SCHEDULE, found_on=3)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['lam'\]"):
        cls(schedule=SCHEDULE, lam=0.5)


def test_wrong_length_and_null_schedule_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"gsearch: parameter schedule has 3 entries but this model has 4"):
        apply_pruner(model, "gsearch", budget=12, schedule=[1.0, 0.5, 0.5])
    with pytest.raises(ValueError) as e:
        apply_pruner(model, "gsearch", budget=12)
    msg = str(e.value)
    assert "gsearch" in msg and "no schedule was found for this model" in msg
    assert "python -m benchmarks.schedule_search model=" in msg and "depth_scaled=true" in msg
    assert getattr(model, "_prunebench_handle", None) is None or model._prunebench_handle.removed
    for budget in (None, 36):  # nothing to prune: accepted, keeps everything
        with apply_pruner(model, "gsearch", budget=budget) as h:
            assert h.pruner.keeps_all and not h.pruner.chooses_budget and h.pruner.llm_layers() == []


def test_found_on_is_checked(tmp_path):
    cls = get_pruner_class("gsearch")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"a": 1}))
    here = model_identity(info(36, 4, str(folder)))
    assert isinstance(here, str) and len(here) == 16
    cls(budget=12, schedule=SCHEDULE, found_on=here).attach(info(36, 4, str(folder)))  # the same model
    cls(budget=12, schedule=SCHEDULE).attach(info(36, 4, None))  # found_on null: not checked
    with pytest.raises(ValueError, match=r"schedule was found on model 'other' \(found_on\) but this model is '"):
        cls(budget=12, schedule=SCHEDULE, found_on="other").attach(info(36, 4, str(folder)))
    with pytest.raises(ValueError, match=r"identity is unknown"):
        cls(budget=12, schedule=SCHEDULE, found_on=here).attach(info(36, 4, None))
    assert model_identity(info(36, 4, "org/some-hub-model")) == "hub:org/some-hub-model"


# ---- running: as found, under a budget, per image --------------------------------------------------------
def _counts(model, inputs, **kw):
    with apply_pruner(model, "gsearch", **kw) as h, torch.no_grad():
        model(**inputs)
        return [list(c.llm_visual) for c in h.token_counts], h.pruner


def test_as_found_and_under_a_budget(tiny, batch):
    model, _ = tiny
    counts, p = _counts(model, batch, schedule=SCHEDULE)
    assert p.chooses_budget and not p.keeps_all and p.llm_layers() == [1, 3]
    assert counts == [[36, 18, 18, 9]] * 2 and p.token_schedule() == [36, 18, 18, 9]
    counts, p = _counts(model, batch, schedule=SCHEDULE, budget=12)
    assert not p.chooses_budget and p.llm_layers() == [1, 3]
    assert all(c == p.token_schedule() for c in counts) and equivalent_tokens(counts[0]) <= 12
    assert counts[0] == schedule_counts(SCHEDULE, 36, scale_for_budget(SCHEDULE, 36, 12))
    counts, p = _counts(model, batch, schedule=SCHEDULE, budget=36)
    assert p.keeps_all and counts == [[36] * 4] * 2


def test_as_found_counts_are_per_image_on_llava_next():
    """LLaVA-NeXT: each image keeps its own fraction of its own run (the engine's per-image counts mean
    keep-all without a budget, so the pruner reads each sample's run itself)."""

    from mllm_adapters.tiny import build_tiny_llava_next

    model, processor = build_tiny_llava_next(seed=0, attn_implementation="eager")
    images = random_images([(40, 60), (30, 80)], 0)
    x = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    runs = (x["input_ids"] == model.config.image_token_id).sum(1).tolist()
    L = model.config.text_config.num_hidden_layers
    fractions = resample_depth(SCHEDULE, L)
    counts, _ = _counts(model, x, schedule=fractions)
    assert runs[0] != runs[1]
    assert counts == [schedule_counts(fractions, n) for n in runs]
    alone = [_counts(model, processor(images=[images[i]], text=[PROMPTS[i]], return_tensors="pt"),
                     schedule=fractions)[0][0] for i in range(2)]
    assert alone == counts


# ---- the G-Search routine ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib(tiny):
    model, processor = tiny
    prompts = [f"USER: <image> {q} ASSISTANT:" for q in ("what is the colour of the circle ?", "how many ?")] * 2
    return build_calibration(model, processor, make_images(4, seed=1), prompts, batch_size=4)


def test_g_search_is_deterministic_non_increasing_and_minimal(calib):
    thr = 0.995
    a = g_search(calib, thr, first_layer=1)
    b = g_search(calib, thr, first_layer=1)
    assert a.counts == b.counts and a.objective == b.objective
    n, L = 36, 4
    c = a.counts
    assert c[0] == n and all(x >= y for x, y in zip(c, c[1:])) and c[-1] < n  # something was pruned
    assert a.fractions == schedule_of(c, n) and a.equiv_tokens == pytest.approx(sum(c) / L)
    assert a.objective >= thr
    for layer in range(1, L):  # recomputed independently of the search's cache
        def obj(count, layer=layer):
            counts = c[:layer] + [count] * (L - layer)
            return objective(calib, "gsearch", None, {"schedule": schedule_of(counts, n)})
        assert obj(c[layer]) >= thr
        if c[layer] > 0:
            assert obj(c[layer] - 1) < thr
        if c[layer] in a.trace[layer - 1]:  # else inherited from the layer before (its own check)
            assert a.trace[layer - 1][c[layer]] == pytest.approx(obj(c[layer]))
    # first_layer=2 keeps layer 1 whole and searches from layer 2
    d = g_search(calib, thr, first_layer=2)
    assert d.counts[1] == n and d.objective >= thr and len(d.trace) == L - 2


def test_g_search_and_cli_errors(calib):
    with pytest.raises(ValueError, match="min_fidelity"):
        g_search(calib, 1.5)
    with pytest.raises(ValueError, match="first_layer"):
        g_search(calib, 0.9, first_layer=4)
    with pytest.raises(ValueError, match="min_fidelity"):
        parse_args(["min_fidelity=high"])
    with pytest.raises(ValueError, match="calib_samples"):
        parse_args(["calib_samples=0"])
    with pytest.raises(ValueError, match="key=value"):
        parse_args(["embedded"])
    settings, overrides = parse_args(["model=tiny", "min_fidelity=0.98", "first_layer=1"])
    assert settings["min_fidelity"] == 0.98 and settings["first_layer"] == 1 and overrides == ["model=tiny"]


def test_cli_writes_a_runner_compatible_config(tmp_path):
    """The CLI on the tiny model writes <results_dir>/tuned/method/gsearch_tiny.yaml whose schedule the
    pruner accepts and whose recorded objective it reproduces."""
    from benchmarks.schedule_search import run

    out = run(["model=tiny", "calib_samples=4", "min_fidelity=0.99", "first_layer=1", "num_threads=1",
               "progress=false", f"results_dir={tmp_path}"])
    path = Path(out["path"])
    assert path == tmp_path / "tuned" / "method" / "gsearch_tiny.yaml"
    cfg = OmegaConf.load(path)
    assert cfg.name == "gsearch" and cfg.variant == "gsearch_tiny" and cfg.params.found_on is None
    assert cfg.searched.model == "tiny" and cfg.searched.calib_samples == 4
    assert cfg.searched.objective >= 0.99 and list(cfg.searched.counts) == out["counts"]
    get_pruner_class("gsearch")(**OmegaConf.to_container(cfg.params))


# ---- the shipped config ------------------------------------------------------------------------------------
def _compose(overrides):
    from hydra import compose, initialize_config_dir

    import benchmarks.run  # noqa: F401  (registers the method configs)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_shipped_config_composes_and_matches_the_depth_scaled_source():
    from benchmarks.models import weights_fingerprint

    cfg = _compose(["method=gsearch"]).method
    assert cfg.name == "gsearch" and cfg.variant == "gsearch"
    schedule = list(cfg.params.schedule)
    assert schedule == list(EMBEDDED_SCHEDULE)  # depth_scaled's source is the shipped result
    assert cfg.params.found_on == weights_fingerprint(EMBEDDED)
    s = cfg.searched
    assert s.model == "embedded" and s.task == "shapes" and s.objective >= s.min_fidelity
    assert [fraction_count(f, 144) for f in schedule] == list(s.counts)
    assert equivalent_tokens(list(s.counts)) == pytest.approx(float(s.equiv_tokens))
    p = get_pruner_class("gsearch")(**OmegaConf.to_container(cfg.params))
    p.attach(dataclasses.replace(info(144, 8), checkpoint_dir=str(EMBEDDED)))
    assert p.chooses_budget and p.token_schedule() == list(s.counts)
    with pytest.raises(ValueError, match="found_on"):  # another model: refused
        get_pruner_class("gsearch")(**OmegaConf.to_container(cfg.params)).attach(info(144, 8, None))


@pytest.mark.slow
def test_shipped_objective_is_reproduced():
    """The recorded objective of conf/method/gsearch.yaml, recomputed on the embedded model with the
    recorded calibration settings (about 15 s)."""
    from benchmarks.models import load_model
    from benchmarks.tasks import get_task

    cfg = _compose(["method=gsearch"])
    s = cfg.method.searched
    lm = load_model(cfg.model, "cpu")
    samples = get_task(str(s.task)).samples(split=str(s.calib_split), n=int(s.calib_samples), seed=int(s.seed))
    calib = build_calibration(lm.model, lm.processor, [x.image for x in samples],
                              [lm.prompt(x.question) for x in samples], int(s.batch_size))
    value = objective(calib, "gsearch", None, OmegaConf.to_container(cfg.method.params), int(s.seed))
    assert value == pytest.approx(float(s.objective), abs=1e-5)
