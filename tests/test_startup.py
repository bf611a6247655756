"""Start-up (issue 22): light imports, the leaderboard in the runner's process, pruner FLOPs counted once
per input shape of a cell (no timing assertions)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from benchmarks import run as runner
from benchmarks import store

from .test_run import ROOT, TINY, _cfg  # the runner's tiny settings, shared


def test_importing_the_runner_leaves_out_the_heavy_modules():
    """``import benchmarks.run`` (what ``--help`` pays) imports no pandas, matplotlib, transformers or
    lmms-eval, and still registers the method configs in Hydra's ConfigStore."""
    code = ("import json, sys, benchmarks.run\n"
            "from hydra.core.config_store import ConfigStore\n"
            "print(json.dumps({'loaded': [m for m in ('pandas', 'matplotlib', 'transformers', 'lmms_eval')"
            " if m in sys.modules], 'methods': ConfigStore.instance().list('method')}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    assert {"fastv.yaml", "none.yaml", "sparsevlm.yaml"} <= set(got["methods"])


def test_leaderboard_true_writes_it_in_the_runners_process(tmp_path, capsys):
    paths = runner.run(_cfg([*TINY, f"results_dir={tmp_path}", "method=fastv", "budgets=[null,9]", "n_samples=2",
                             "leaderboard=true"]))
    assert len(paths) == 2
    for name in ("leaderboard.csv", "cells.csv", "auc.csv", "plots/pareto_tiny_shapes.png"):
        assert (tmp_path / name).is_file(), name
    assert f"wrote {tmp_path / 'leaderboard.csv'}" in capsys.readouterr().out
    # the setting is not part of a cell: the same cells, without the leaderboard, are reused
    (tmp_path / "leaderboard.csv").unlink()
    assert runner.run(_cfg([*TINY, f"results_dir={tmp_path}", "method=fastv", "budgets=[null,9]",
                            "n_samples=2"])) == paths
    assert not (tmp_path / "leaderboard.csv").exists()


def test_leaderboard_is_left_to_the_sweep_step_under_multirun(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_job_num", lambda: 0)  # a --multirun job
    runner.write_leaderboard(tmp_path)
    assert not (tmp_path / "leaderboard.csv").exists()


def test_leaderboard_setting_is_checked():
    from benchmarks.settings import check_settings

    assert check_settings(_cfg(["model=tiny"])).leaderboard is False
    assert check_settings(_cfg(["model=tiny", "leaderboard=true"])).leaderboard is True
    with pytest.raises(ValueError, match=r"leaderboard='yes' is not supported; accepted: true .* or false"):
        check_settings(_cfg(["model=tiny", "leaderboard=yes"]))


@pytest.mark.parametrize("method, budget", [("fastv", 9), ("visionzip", 9), ("sparsevlm", 9)])
def test_overhead_counted_once_per_shape_equals_counting_every_batch(monkeypatch, method, budget):
    """Three batches of the same two samples (equal shapes): counting the first one only gives the same
    per-sample overhead, the same row FLOPs and the same metrics as counting every batch."""
    from benchmarks.tasks import get_task
    from pruners import get_pruner_class

    cfg = _cfg([*TINY, f"method={method}", "n_samples=2", "latency.n_samples=0"])
    lm = runner.get_model(cfg.model, "cpu")
    task = get_task("shapes")
    samples = task.samples(split="eval", n=2, seed=0) * 3
    params = dict(get_pruner_class(method)(budget=None, **runner.method_params(cfg.method)).params)
    ccfg = runner.cell_config(cfg, budget, method, params, lm.weights)
    once, rows_once = runner.run_cell(lm, task, samples, ccfg, progress=False)
    keys = itertools.count()
    monkeypatch.setattr(runner, "_shape_key", lambda enc, batch: next(keys))  # every batch counted, as before
    every, rows_every = runner.run_cell(lm, task, samples, ccfg, progress=False)
    assert once["overhead_flops_from"] == "first batch of each input shape: 1 of 3 batches (2 of 6 samples) counted"
    assert every["overhead_flops_from"] == "first batch of each input shape: 3 of 3 batches (6 of 6 samples) counted"
    assert once["overhead_tflops"] > 0
    assert once["flops_prefill"] == every["flops_prefill"]
    assert [r["tflops_prefill"] for r in rows_once] == [r["tflops_prefill"] for r in rows_every]
    skip = {"overhead_flops_from", "wall_s"}
    assert {k: v for k, v in once.items() if k not in skip} == {k: v for k, v in every.items() if k not in skip}


def test_shape_key_tells_apart_batches_of_other_shapes_or_image_sizes():
    import torch
    from PIL import Image

    class S:  # the Sample fields the key reads: every image of the sample
        def __init__(self, h, w, *extra):
            self.image = Image.new("RGB", (w, h))
            self.images = [self.image, *(Image.new("RGB", (ew, eh)) for eh, ew in extra)]

    enc = {"input_ids": torch.zeros(2, 7, dtype=torch.long), "pixel_values": torch.zeros(2, 3, 8, 8)}
    longer = {**enc, "input_ids": torch.zeros(2, 8, dtype=torch.long)}
    assert runner._shape_key(enc, [S(8, 8), S(8, 8)]) == runner._shape_key(dict(enc), [S(8, 8), S(8, 8)])
    assert runner._shape_key(enc, [S(8, 8), S(8, 8)]) != runner._shape_key(longer, [S(8, 8), S(8, 8)])
    assert runner._shape_key(enc, [S(8, 8), S(8, 8)]) != runner._shape_key(enc, [S(8, 8), S(4, 8)])
    assert runner._shape_key(enc, [S(8, 8), S(8, 8)]) != runner._shape_key(enc, [S(8, 8), S(8, 8, (4, 8))])


def test_cells_written_with_the_count_say_how_it_was_obtained(tmp_path):
    (cell,) = runner.run(_cfg([*TINY, f"results_dir={tmp_path}", "method=fastv", "budgets=[9]", "n_samples=4"]))
    m = store.read_metrics(cell)
    assert m["overhead_flops_from"].startswith("first batch of each input shape: ")
    assert m["overhead_flops_from"].endswith(" of 2 batches (2 of 4 samples) counted") or \
        m["overhead_flops_from"].endswith(" of 2 batches (4 of 4 samples) counted")
