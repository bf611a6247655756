"""The embedded model's training recipe driver (benchmarks.embedded.recipe): phases run in order into one
folder, a new stage-2 phase continues the previous weights with a fresh optimizer, finished phases are
skipped on a re-run, and bad recipes fail before any training. A tiny recipe (a few steps each) keeps
this to seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.embedded import recipe as R
from benchmarks.embedded import train as T

TINY = """
common: {seed: 0, threads: 1, presence_map: true, stage2_minutes: 0, s1_batch: 2, s2_batch: 2, turns: 2,
         val_n: 6, eval_every: 3, ckpt_every: 1, log_every: 1, bridge_steps: 0}
phases:
  - {name: vision, args: {stage1_steps: 3, contrastive_start: 1, only_stage1: true}}
  - {name: base, args: {stage2_steps: 3}}
  - {name: focus, args: {stage2_steps: 5, s2_lr: 0.001, family_weights: '{"colour": 0, "count": 1}'}}
"""


def _args_lines(run: Path) -> list[dict]:
    return [json.loads(line.split(" args: ", 1)[1]) for line in (run / "train.log").read_text().splitlines()
            if " args: " in line]


@pytest.mark.slow
def test_phases_run_in_order_and_a_rerun_skips_them(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY)
    run = tmp_path / "run"
    assert R.run_recipe(recipe, run) == ["vision", "base", "focus"]
    assert [a["phase"] for a in _args_lines(run)] == ["vision", "base", "focus"]
    st = torch.load(run / "stage2.pt", weights_only=False)
    assert (st["phase"], st["step"], st["warm_from"]) == ("focus", 5, 3)  # focus continued base's step 3
    # The fresh optimizer warmed up again: the last step's rate is the second warm-up step of a new cosine.
    assert st["opt"]["param_groups"][0]["lr"] == pytest.approx(T.lr_at(1, 0.001, 300, 2))
    assert "phase 'focus' starts at stage-2 step 3" in (run / "train.log").read_text()
    assert (run / "best" / "model.safetensors").is_file()

    assert R.run_recipe(recipe, run) == []  # everything finished: nothing runs, nothing is logged
    assert len(_args_lines(run)) == 3


def test_shipped_recipe_is_accepted_by_train():
    phases = R.load_recipe(R.DEFAULT_RECIPE)
    assert phases[0][1].get("only_stage1") and all("stage2_steps" in a for _, a in phases[1:])
    ends = [a["stage2_steps"] for _, a in phases[1:]]
    assert ends == sorted(ends) and len(set(ends)) == len(ends)  # each phase trains on from the previous end
    for name, args in phases:
        T.parse_args(R.phase_argv(name, args, Path("unused")))


def test_bad_recipe_fails_before_training(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY.replace("stage2_steps: 5", "stage2_steps: 5, no_such_flag: 1"))
    with pytest.raises(ValueError, match="recipe phase 'focus'"):
        R.run_recipe(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(FileNotFoundError, match="--recipe"):
        R.run_recipe(tmp_path / "missing.yaml", tmp_path / "run")


def test_refuses_a_folder_of_another_run(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY)
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("a run started by train.py directly\n")
    with pytest.raises(ValueError, match="not started by a recipe"):
        R.run_recipe(recipe, run)


GOLDEN = Path(__file__).parent / "golden" / "embedded_tiny_recipe.json"


def _weight_stats(folder: Path) -> dict[str, list[float]]:
    """Per tensor of the exported best model: (sum, sum of squares) in float64, a fingerprint that any
    change of the training computation moves far beyond float rounding."""
    from safetensors.torch import load_file

    sd = load_file(folder / "model.safetensors")
    return {k: [float(v.double().sum()), float(v.double().square().sum())] for k, v in sorted(sd.items())}


@pytest.mark.slow
def test_tiny_recipe_trains_the_recorded_weights(tmp_path):
    """The training code's refactors keep behaviour: the tiny recipe trains to the weights recorded in
    tests/golden (regenerate with PRUNEBENCH_UPDATE_GOLDEN=1 only for a deliberate change of training)."""
    import os

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY)
    R.run_recipe(recipe, tmp_path / "run")
    stats = _weight_stats(tmp_path / "run" / "best")
    if os.environ.get("PRUNEBENCH_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(stats, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(stats) == sorted(golden)
    for name, (s, sq) in stats.items():
        assert s == pytest.approx(golden[name][0], rel=1e-4, abs=1e-6), name
        assert sq == pytest.approx(golden[name][1], rel=1e-4, abs=1e-6), name
