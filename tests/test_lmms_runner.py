"""lmms-eval tasks in prunebench's runner (``task=lmms task.names=[...]``): the offline export of the
shapes task run as an lmms task gives exactly the native shapes cell's predictions and accuracy, and
tasks the runner cannot score offline are refused before the model loads."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from benchmarks import run as runner
from benchmarks import store
from benchmarks.lmms.export_shapes import export

from .test_run import CONF

EMBEDDED = ["model=embedded", "batch_size=8", "latency.n_samples=1", "latency.warmup=0", "latency.decode_tokens=2",
            "progress=false", "diagnostics=false", "method=fastv", "budgets=[null,36]", "n_samples=24"]


def _run(tmp_path, *extra: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*EMBEDDED, f"results_dir={tmp_path / 'results'}", *extra])
    return runner.run(cfg)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_exported_shapes_as_an_lmms_task_equals_the_native_cell(tmp_path):
    export(tmp_path / "lmms", "shapes", n=24)
    native = _run(tmp_path, "task=shapes")
    lmms = _run(tmp_path, "task=lmms", "task.names=[prunebench_shapes]", f"task.include_path={tmp_path / 'lmms'}")
    assert all("lmms-prunebench_shapes" in p.parts for p in lmms)  # its own task in the results
    for a, b in zip(native, lmms, strict=True):
        ma, mb = store.read_metrics(a), store.read_metrics(b)
        assert ma["accuracy"] == mb["accuracy"] and ma["tflops_prefill"] == pytest.approx(mb["tflops_prefill"])
        ra, rb = store.read_predictions(a), store.read_predictions(b)
        assert [r["prediction"] for r in ra] == [r["prediction"] for r in rb]
        assert [r["kept"] for r in ra] == [r["kept"] for r in rb]
        assert mb["task_metrics"] == {"exact_match": pytest.approx(mb["accuracy"])}  # lmms-eval's own aggregation
    # the cells record the lmms task and are reused on a rerun
    again = _run(tmp_path, "task=lmms", "task.names=[prunebench_shapes]", f"task.include_path={tmp_path / 'lmms'}")
    assert again == lmms
    cfg = (lmms[1] / store.CONFIG).read_text()
    assert "lmms-prunebench_shapes" in cfg and "include_path" in cfg


@pytest.mark.parametrize("names, match", [
    ("[]", "needs task.names"),
    ("[no_such_task_xyz]", "is not an lmms-eval task"),
    ("[mmvet]", "API judge"),
    ("[pope_full]", "group"),
    ("[pope]", "offline"),
])
def test_tasks_that_cannot_run_offline_are_refused_early(tmp_path, names, match):
    with pytest.raises(ValueError, match=match):
        _run(tmp_path, "task=lmms", f"task.names={names}")
    assert not (tmp_path / "results" / "cells").exists()  # refused before any cell


def test_pope_task_metrics_in_the_cell(tmp_path):
    (ref, pruned) = _run(tmp_path, "task=shapes_pope", "n_samples=12")
    m = json.loads((pruned / store.METRICS).read_text())
    assert set(m["task_metrics"]) == {"random", "popular", "adversarial", "all"}
    assert m["task_metrics"]["all"]["accuracy"] == pytest.approx(m["accuracy"])
    assert {"precision", "recall", "f1", "yes_ratio"} <= set(m["task_metrics"]["all"])
