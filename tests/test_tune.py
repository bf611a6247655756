"""The general tuner (benchmarks/tune.py) on the tiny LLaVA: it improves the flow objective over its
initial points, respects the compute constraint (checked against the token counts the adapter really
produces), works for pruners without a pure schedule, and its output config reproduces its objective.
It writes <results_dir>/tuned/method/ (found by name through Hydra's search path), never the tracked
conf/method/ without overwrite=true, and mode=evaluate calibrates with the settings the tuned file stores."""

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
    CALIB_DEFAULTS,
    TuneResult,
    build_calibration,
    calibration_settings,
    cost,
    objective,
    reference_vision_counts,
    resolve_space,
    run,
    search_roots,
    selection,
    target_tag,
    tune,
    write_tuned_config,
)
from mllm_adapters import apply_pruner
from mllm_adapters.handle import TokenCounts
from pruners import get_pruner_class
from tests.conftest import make_images, random_images

ROOT = Path(__file__).resolve().parent.parent
# composing from the repository root before anything was tuned: results/tuned does not exist yet
pytestmark = pytest.mark.filterwarnings("ignore:provider=hydra.searchpath in main, path=.*tuned is not available")
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
        return h.token_counts[0]


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
                / prefill_flops(cfg, n_text, TokenCounts(vision=[reference_vision_counts(calib.info)])).total)
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


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name, overrides=overrides)


SHIPPED = ROOT / "conf" / "method" / "vflowopt_tuned_eq36.yaml"
SHIPPED_OBJECTIVE = float(OmegaConf.load(SHIPPED).tuned.objective)  # 0.9651


def test_cli_writes_a_config_that_reproduces_its_objective(tmp_path, monkeypatch):
    """The README's tune command (`python -m benchmarks.tune method=vflowopt target_equiv_tokens=36 ...`,
    tiny model, shapes calibration split, run from a fresh working directory) used to replace the shipped
    conf/method/vflowopt_tuned_eq36.yaml (objective 0.9651) with its own result. Now it leaves every file
    under conf/method/ byte-identical and writes results/tuned/method/, saying that the tracked file of the
    same name still wins; then `mode=evaluate` on the written config, with no calibration settings on the
    command line, recomputes the same objective because it uses the file's calib_samples=4 (it used
    tune.yaml's 32 before, silently)."""
    before = _tree_bytes(ROOT / "conf" / "method")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["model=tiny", "method=vflowopt", "target_equiv_tokens=36", "calib_samples=4", "n_trials=4",
            "n_initial=2", "num_threads=1", "progress=false"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.tune", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _tree_bytes(ROOT / "conf" / "method") == before
    path = tmp_path / "results" / "tuned" / "method" / "vflowopt_tuned_eq36.yaml"
    written = OmegaConf.load(path)
    assert written.name == "vflowopt" and written.tuned.equiv_tokens <= 36
    assert set(written.params) == set(get_pruner_class("vflowopt").defaults)
    assert written.tuned.calib_samples == 4 and written.tuned.batch_size == 8 and written.tuned.model == "tiny"
    # shadowed: said on stdout and in the file, instead of a benchmark command that would pick the tracked one
    assert "still composes the tracked file" in proc.stdout
    assert "# NOTE: " in path.read_text() and "# Benchmark it" not in path.read_text()
    monkeypatch.chdir(tmp_path)  # where the command ran: the search path is relative to it
    for config_name in ("config", "tune"):
        assert _compose(config_name, ["method=vflowopt_tuned_eq36"]).method.tuned.objective == SHIPPED_OBJECTIVE
    # evaluate the written config the way the runner would load it (method group = the file)
    cfg = _compose("tune", ["model=tiny", "mode=evaluate", "num_threads=1"])
    OmegaConf.set_struct(cfg, False)
    cfg.method = written
    summary = run(cfg)
    assert summary["calibration"]["calib_samples"] == 4 and summary["calibration_source"]["calib_samples"] == "tuned file"
    assert summary["objective"] == pytest.approx(float(written.tuned.objective), abs=1e-6)
    assert summary["equiv_tokens"] == pytest.approx(float(written.tuned.equiv_tokens))
    # a command-line value that differs from the stored one is refused, naming both (before the model loads)
    cfg.calib_samples = 8
    with pytest.raises(ValueError, match=r"calib_samples=8 differs from the calib_samples=4 stored in the tuned file"):
        run(cfg)
    cfg = _compose("tune", ["mode=evaluate"])  # model: the default (embedded), not the stored tiny
    OmegaConf.set_struct(cfg, False)
    cfg.method = written
    with pytest.raises(ValueError, match=r"model=embedded differs .*tuned.model=tiny\); pass model=tiny"):
        run(cfg)


def _result(objective: float, target: float = 9) -> TuneResult:
    params = dict(get_pruner_class("vflowopt").defaults)
    return TuneResult(method="vflowopt", params=params, searched={}, budget=8, cost=8.5, objective=objective,
                      initial_best=objective, kind="equiv_tokens", target=target, n_trials=1, n_initial=1,
                      n_feasible=1)


def test_tuned_configs_compose_by_name_from_results_dir(tmp_path, monkeypatch):
    """`method=<name>_tuned_<target>` finds <results_dir>/tuned/method/ in benchmarks.run's and
    benchmarks.tune's config (the search path is relative to the working directory, as `make bench`
    runs from the repository root); conf/method/ wins a name collision; another results_dir needs the
    hydra.searchpath override the tuner prints."""
    monkeypatch.chdir(tmp_path)
    assert search_roots("config") == search_roots("tune") == [tmp_path.resolve() / "results" / "tuned"]
    tuned = tmp_path / "results" / "tuned" / "method"
    path = write_tuned_config(_result(0.5), tuned, {"calib_samples": 4})
    assert selection(path) == ("", None)
    for config_name in ("config", "tune"):
        cfg = _compose(config_name, ["method=vflowopt_tuned_eq9"])
        assert cfg.method.name == "vflowopt" and cfg.method.tuned.objective == 0.5
        assert "hydra" not in cfg  # the search path is not part of a cell's config (nor its hash)
    # collision: the tracked file wins, deterministically
    write_tuned_config(_result(0.5, target=36), tuned)
    assert _compose("config", ["method=vflowopt_tuned_eq36"]).method.tuned.objective == SHIPPED_OBJECTIVE
    assert "still composes the tracked file" in selection(tuned / "vflowopt_tuned_eq36.yaml")[1]
    # results_dir=<other> on the command line does not move the search path (Hydra reads it first) ...
    other = write_tuned_config(_result(0.25), tmp_path / "other" / "tuned" / "method", name="mine")
    with pytest.raises(Exception, match="mine"):
        _compose("config", ["method=mine", f"results_dir={tmp_path / 'other'}"])
    # ... the override the tuner prints (and writes into the file's header) does
    args, warning = selection(other)
    assert warning is None and args == f"hydra.searchpath=[file://{tmp_path.resolve() / 'other' / 'tuned'}]"
    write_tuned_config(_result(0.25), other.parent, name="mine", run_args=args)  # as run() writes it
    assert f"method=mine budgets=[8] {args}" in other.read_text()
    assert _compose("config", ["method=mine", args]).method.tuned.objective == 0.25


def test_overwrite_writes_conf_method_only_when_asked(tmp_path, monkeypatch, caplog):
    """Without overwrite=true the tuner cannot write into conf/method (however it is named) and leaves a
    tracked file of its name untouched; with it, it replaces that file (logging both objectives). The
    tracked directory is a temporary copy here: the real one is never written."""
    import benchmarks.tune as tune_mod

    real = _tree_bytes(ROOT / "conf" / "method")
    conf_method = tmp_path / "conf_method"
    conf_method.mkdir()
    tracked = conf_method / SHIPPED.name
    tracked.write_bytes(SHIPPED.read_bytes())
    monkeypatch.setattr(tune_mod, "CONF_METHOD", conf_method)
    base = ["model=tiny", "method=vflowopt", "target_equiv_tokens=36", "calib_samples=2", "n_trials=2",
            "n_initial=1", "num_threads=1", "progress=false", f"results_dir={tmp_path / 'res'}"]

    with pytest.raises(ValueError, match=r"out_dir=.* is inside the tracked .*needs overwrite=true"):
        run(_compose("tune", [*base, f"out_dir={conf_method}"]))
    with pytest.raises(ValueError, match=r"tuned_name='fastv' is a registered pruner"):
        run(_compose("tune", [*base, "tuned_name=fastv"]))

    summary = run(_compose("tune", base))
    assert Path(summary["path"]) == tmp_path / "res" / "tuned" / "method" / SHIPPED.name
    assert tracked.read_bytes() == SHIPPED.read_bytes() and summary["benchmark"] is None  # shadowed
    with caplog.at_level("WARNING", logger="prunebench.tune"):
        summary = run(_compose("tune", [*base, "overwrite=true"]))
    assert Path(summary["path"]) == tracked
    assert OmegaConf.load(tracked).tuned.calib_samples == 2
    assert f"replacing {tracked} (objective {SHIPPED_OBJECTIVE})" in caplog.text
    assert summary["benchmark"] == f"python -m benchmarks.run method=vflowopt_tuned_eq36 budgets=[{summary['budget']}]"
    assert _tree_bytes(ROOT / "conf" / "method") == real


def test_calibration_settings_defaults_and_sources():
    """mode=tune fills unset settings from CALIB_DEFAULTS; mode=evaluate takes a tuned file's values;
    a config without a tuned record evaluates on the given or default settings."""
    cfg = _compose("tune", ["model=tiny", "calib_samples=4"])
    settings, sources = calibration_settings(cfg, "tune", {})
    assert settings == {"model": "tiny", "task": "shapes", **CALIB_DEFAULTS, "calib_samples": 4}
    assert sources["calib_samples"] == "command line" and sources["seed"] == "default"
    settings, sources = calibration_settings(cfg, "evaluate", {"calib_samples": 4, "seed": 3, "model": "tiny"})
    assert settings["seed"] == 3 and sources["seed"] == "tuned file" and sources["calib_samples"] == "tuned file"
    with pytest.raises(ValueError, match=r"seed=1 differs from the seed=3"):
        calibration_settings(_compose("tune", ["model=tiny", "seed=1"]), "evaluate", {"seed": 3})
    with pytest.raises(ValueError, match="calib_samples must be >= 1, got 0"):
        calibration_settings(_compose("tune", ["calib_samples=0"]), "tune", {})


def test_written_config_is_runner_compatible(calib, tmp_path):
    r = tune(calib, "vflowopt", target=9, n_trials=3, n_initial=3, seed=0)
    path = write_tuned_config(r, tmp_path, {"model": "tiny"})
    conf = OmegaConf.to_container(OmegaConf.load(path))
    assert path.name == "vflowopt_tuned_eq9.yaml" and conf["variant"] == "vflowopt_tuned_eq9"
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

    from mllm_adapters.tiny import build_tiny_llava_next

    model, processor = build_tiny_llava_next(seed=0)
    images = random_images(NEXT_SIZES, 0)
    prompts = [f"USER: <image> {q} ASSISTANT:" for q in QUESTIONS[:3]]
    return build_calibration(model, processor, images, prompts, batch_size=2)  # the first batch is ragged


def _runner_cost(calib, method, budget, params, kind):
    """The runner's figures (`sample_cost` per sample of every batch) at the tuner's mean text length."""
    from benchmarks.flops import sample_cost

    per = []
    with apply_pruner(calib.model, method, budget=budget, **params) as h, torch.no_grad():
        for enc in calib.batches:
            calib.model(**enc)
            per += [sample_cost(calib.model.config, round(calib.n_text), h.token_counts[b])
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
        assert equiv_tokens(TokenCounts(llm_visual=p.token_schedule()), 4, 88) != pytest.approx(r.cost)


def test_next_evaluate_validates_the_budget_like_the_runner():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("tune", overrides=["model=tiny-next", "mode=evaluate", "budget=89", "calib_samples=1",
                                         "num_threads=1"])
    with pytest.raises(ValueError, match=r"budgets: 89 is above the 88 visual tokens of the longest image run"):
        run(cfg)
