"""The papers' summary table (benchmarks.summary): method x task at each level, the average over tasks of
the per-task ratio to unpruned with a paired-bootstrap interval, per-ability columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmarks.summary import mean_ratio_interval, summary_table, write_summary


def _points(specs):
    """Leaderboard-like points from (task, method, budget, equiv, per-sample scores)."""
    rows, scores = [], {}
    for i, (task, method, budget, equiv, s) in enumerate(specs):
        h = f"h{i}"
        s = list(s) * 10  # 10 copies: every bootstrap resample of the references has a right answer
        scores[h] = {f"{task}-{j}": float(v) for j, v in enumerate(s)}
        rows.append({"model": "m", "weights": "w", "n_samples": len(s), "seed": 0, "task": task, "method": method,
                     "variant": method, "budget": budget, "equiv_tokens": equiv, "flops_rel": 0.5,
                     "accuracy": float(np.mean(s)), "config_hash": h})
    return pd.DataFrame(rows), scores


def test_average_of_ratios_and_placement_by_equivalent_tokens():
    ref_a, ref_b = [1, 1, 1, 0], [1, 1, 0, 0]
    points, scores = _points([
        ("shapes", "none", None, 144, ref_a), ("shapes_pope", "none", None, 144, ref_b),
        ("shapes", "fastv", 36, 60, [1, 1, 0, 0]), ("shapes_pope", "fastv", 36, 60, [1, 0, 0, 0]),
        ("shapes", "fastv", 72, 90, [1, 1, 1, 0]), ("shapes_pope", "fastv", 72, 90, [1, 1, 0, 0]),
        ("shapes", "dyvte", "auto", 40.0, [1, 1, 1, 0]),  # chose its own count: placed at 36, one task only
    ])
    df = summary_table(points, scores)
    f36 = df[(df["variant"] == "fastv") & (df["level"] == 36)].iloc[0]
    assert f36["rel_shapes"] == pytest.approx(2 / 3) and f36["rel_shapes_pope"] == pytest.approx(1 / 2)
    assert f36["avg_rel"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert f36["avg_rel_ci95_lo"] <= f36["avg_rel"] <= f36["avg_rel_ci95_hi"]
    assert {"avg_rel_general", "avg_rel_hallucination"} <= set(df.columns)  # two abilities declared
    f72 = df[(df["variant"] == "fastv") & (df["level"] == 72)].iloc[0]
    assert f72["avg_rel"] == pytest.approx(1.0) and f72["avg_rel_ci95_lo"] == pytest.approx(1.0)
    dy = df[df["variant"] == "dyvte"].iloc[0]
    assert dy["level"] == 36 and dy["placed_by"] == "equiv_tokens"
    assert dy["n_tasks"] == 1 and np.isnan(dy["avg_rel"])  # not on every task: no average


def test_interval_is_the_point_without_variation_and_covers_the_ratio():
    x = np.array([1.0, 0.0, 1.0, 1.0] * 10)
    assert mean_ratio_interval([(x, x)]) == pytest.approx((1.0, 1.0))
    lo, hi = mean_ratio_interval([(x * 0 + (np.arange(40) % 2), x)], seed=1)
    assert lo < (20 / 40) / (30 / 40) < hi
    assert mean_ratio_interval([(x, np.zeros(40))]) is None  # an all-wrong reference: undefined


def test_write_summary_writes_csv_markdown_and_latex(tmp_path):
    points, scores = _points([("shapes", "none", None, 144, [1, 1, 1, 0]), ("shapes", "random", 36, 36, [1, 0, 1, 0])])
    paths = write_summary(tmp_path, points, scores)
    assert set(paths) == {"csv", "md", "tex"} and all(p.is_file() for p in paths.values())
    md = paths["md"].read_text()
    assert "| unpruned |" in md and "50.0 (66.7%)" in md
    assert "\\begin{tabular}" in paths["tex"].read_text()
    assert pd.read_csv(paths["csv"])["avg_rel"].iloc[0] == pytest.approx(2 / 3)


def test_published_numbers_sit_beside_matching_runs():
    from benchmarks.summary import published_value

    assert published_value("llava-1.5-7b", "fastv", 64, "lmms-gqa") is not None  # FastV at 64 on GQA is published
    assert published_value("embedded", "fastv", 64, "lmms-gqa") is None  # no published table for this model
    assert published_value("llava-1.5-7b", "fastv", 64, "shapes") is None  # not a published benchmark
    points, scores = _points([("lmms-gqa", "none", None, 576, [1, 1, 1, 0]), ("lmms-gqa", "fastv", 64, 64, [1, 1, 0, 0])])
    points["model"] = "llava-1.5-7b"
    df = summary_table(points, scores)
    assert df["published_lmms-gqa"].iloc[0] == published_value("llava-1.5-7b", "fastv", 64, "lmms-gqa")
