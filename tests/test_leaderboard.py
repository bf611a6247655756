"""Leaderboard aggregation: columns, accuracy_rel, Pareto frontier, AUC at equal compute, the PNG."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from benchmarks import leaderboard as lb
from benchmarks import store


def _cell(root, method, budget, accuracy, flops_rel, model="tiny", task="shapes", n=8, seed=0, weights=None):
    ccfg = {"model": model, "task": task, "method": method, "budget": budget, "n": n, "seed": seed, "weights": weights}
    digest = store.config_hash(ccfg)
    metrics = {
        "model": model, "task": task, "method": method, "budget": budget, "params": {"layer": 2},
        "seed": seed, "n_samples": n, "accuracy": accuracy, "accuracy_rel": None, "equiv_tokens": 36.0 * flops_rel,
        "tflops_prefill": 2.0 * flops_rel, "flops_rel": flops_rel, "prefill_ms": 1.0, "decode_ms_per_token": 0.5,
        "kv_cache_mb": 0.1, "peak_mem_mb": 100.0, "config_hash": digest, "relevant_recall": 0.5,
        "vision_tflops": 0.1, "llm_tflops": 1.8 * flops_rel, "projector_tflops": 0.01, "overhead_tflops": 0.0,
        "accuracy_by_family": {"colour": accuracy, "count": accuracy / 2}, "weights": weights,
    }
    store.write_cell(store.cell_dir(root, model, task, method, budget, digest),
                     {"metrics.json": json.dumps(metrics), "config.yaml": "{}\n", "predictions.jsonl": ""})


@pytest.fixture
def results(tmp_path):
    _cell(tmp_path, "none", None, 0.80, 1.0)
    # method a: strong at low compute; method b: needs more compute for the same accuracy
    _cell(tmp_path, "a", 18, 0.78, 0.6)
    _cell(tmp_path, "a", 9, 0.70, 0.4)
    _cell(tmp_path, "b", 18, 0.60, 0.5)
    _cell(tmp_path, "b", 9, 0.40, 0.2)
    return tmp_path


def test_columns_order_and_relative_accuracy(results):
    df = lb.leaderboard(results)
    assert list(df.columns[: len(lb.COLUMNS)]) == lb.COLUMNS
    assert {"accuracy_colour", "accuracy_count", "relevant_recall"} <= set(df.columns)
    assert len(df) == 5 and df["config_hash"].is_unique
    row = df[(df["method"] == "a") & (df["budget"] == 9)].iloc[0]
    assert row["accuracy_rel"] == pytest.approx(0.70 / 0.80)
    assert df[df["method"] == "none"]["accuracy_rel"].iloc[0] == pytest.approx(1.0)
    assert json.loads(row["params"]) == {"layer": 2}


def test_pareto_front_keeps_only_undominated_points():
    flops = np.array([1.0, 0.6, 0.5, 0.4, 0.2])
    acc = np.array([0.8, 0.78, 0.6, 0.7, 0.4])
    assert sorted(lb.pareto_front(flops, acc).tolist()) == [0, 1, 3, 4]  # (0.5, 0.6) is beaten by (0.4, 0.7)


def test_auc_over_common_range_ranks_at_equal_compute(results):
    auc = lb.auc_table(lb.leaderboard(results)).set_index("method")
    # common range: from max(min flops_rel) = max(0.4, 0.2) = 0.4 to 1.0
    assert auc["flops_rel_lo"].unique().tolist() == [pytest.approx(0.4)]
    # method a: piecewise linear through (0.4, .70), (0.6, .78), (1, .80): exact trapezoid mean
    a = (0.2 * (0.70 + 0.78) / 2 + 0.4 * (0.78 + 0.80) / 2) / 0.6
    # method b on [0.4, 1]: (0.4, interp .2->.5 = .5333), (0.5, .60), (1, .80)
    y04 = 0.40 + (0.60 - 0.40) * (0.4 - 0.2) / 0.3
    b = (0.1 * (y04 + 0.60) / 2 + 0.5 * (0.60 + 0.80) / 2) / 0.6
    assert auc.loc["a", "auc_accuracy"] == pytest.approx(a, abs=1e-12)
    assert auc.loc["b", "auc_accuracy"] == pytest.approx(b, abs=1e-12)
    assert auc.loc["a", "rank"] == 1 and auc.loc["b", "rank"] == 2
    # accuracy at fixed compute, interpolated on each method's own curve; NaN where it does not reach
    assert auc.loc["a", "acc_at_flops_0.50"] == pytest.approx(0.74)
    assert auc.loc["b", "acc_at_flops_0.50"] == pytest.approx(0.60)
    assert auc.loc["b", "acc_at_flops_0.25"] == pytest.approx(0.40 + 0.2 * 0.05 / 0.3)
    assert np.isnan(auc.loc["a", "acc_at_flops_0.25"])


def test_write_all_writes_csv_auc_and_png(results, capsys):
    lb.main([f"results_dir={results}"])
    board = pd.read_csv(results / "leaderboard.csv")
    assert list(board.columns[: len(lb.COLUMNS)]) == lb.COLUMNS and len(board) == 5
    assert (results / "auc.csv").is_file()
    png = results / "plots" / "pareto_tiny_shapes.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "leaderboard.csv" in capsys.readouterr().out


def test_empty_results_and_bad_arguments_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished cells"):
        lb.write_all(tmp_path)
    with pytest.raises(SystemExit, match="accepted: results_dir"):
        lb.main(["result_dir=x"])


def test_only_the_newest_weights_of_a_model_are_ranked(tmp_path, caplog):
    """Cells of a retrained checkpoint under the same model name replace, not join, the old ones."""
    import os
    import time

    _cell(tmp_path, "none", None, 0.50, 1.0, weights="old")
    _cell(tmp_path, "a", 18, 0.40, 0.6, weights="old")
    _cell(tmp_path, "b", 18, 0.45, 0.5, weights="old")
    for cell in store.iter_cells(tmp_path):  # written earlier
        t = time.time() - 3600
        os.utime(cell / store.METRICS, (t, t))
    _cell(tmp_path, "none", None, 0.90, 1.0, weights="new")
    _cell(tmp_path, "a", 18, 0.85, 0.6, weights="new")
    with caplog.at_level("WARNING"):
        board = lb.leaderboard(tmp_path)
    assert set(board["weights"]) == {"new"} and len(board) == 2
    assert board.loc[board["method"] == "a", "accuracy_rel"].item() == pytest.approx(0.85 / 0.90)
    assert "3 cell(s) of older weights set aside" in caplog.text
