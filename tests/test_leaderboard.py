"""Leaderboard aggregation: columns, accuracy_rel, Pareto frontier, AUC at equal compute, the PNG."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from benchmarks import leaderboard as lb
from benchmarks import store


def _cell(root, method, budget, accuracy, flops_rel, model="tiny", task="shapes", n=8, seed=0, weights=None,
          scores=None, params=None, **fields):
    """Write one fake cell; ``scores``: its per-sample 0/1 scores (default: the first round(accuracy * n)
    samples right), ``fields``: extra or overriding metrics.json fields (``variant``, ``method_seed``, ...)."""
    params = {"layer": 2} if params is None else params
    ccfg = {"model": model, "task": task, "method": method, "budget": budget, "n": n, "seed": seed, "weights": weights,
            "params": params, **{k: v for k, v in fields.items() if k in ("variant", "method_seed")}}
    digest = store.config_hash(ccfg)
    metrics = {
        "model": model, "task": task, "method": method, "budget": budget, "params": params,
        "seed": seed, "n_samples": n, "accuracy": accuracy, "accuracy_rel": None, "equiv_tokens": 36.0 * flops_rel,
        "tflops_prefill": 2.0 * flops_rel, "flops_rel": flops_rel, "prefill_ms": 1.0, "decode_ms_per_token": 0.5,
        "kv_cache_mb": 0.1, "peak_mem_mb": 100.0, "config_hash": digest, "relevant_recall": 0.5,
        "vision_tflops": 0.1, "llm_tflops": 1.8 * flops_rel, "projector_tflops": 0.01, "overhead_tflops": 0.0,
        "accuracy_by_family": {"colour": accuracy, "count": accuracy / 2}, "weights": weights, **fields,
    }
    if scores is None:
        scores = [1.0] * round(accuracy * n) + [0.0] * (n - round(accuracy * n))
    assert len(scores) == n
    rows = "".join(json.dumps({"id": f"s{i}", "score": float(v)}) + "\n" for i, v in enumerate(scores))
    path = store.cell_dir(root, model, task, fields.get("variant", method), budget, digest)
    store.write_cell(path, {"metrics.json": json.dumps(metrics), "config.yaml": "{}\n", "predictions.jsonl": rows})
    return path


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


def _rng_scores(n, p, seed):
    return np.random.default_rng(seed).binomial(1, p, n).astype(float).tolist()


def test_unreadable_cells_are_named_and_everything_else_is_written(results, caplog, capsys):
    """A truncated metrics.json and a folder missing its files are each named; the rest is aggregated."""
    truncated = _cell(results, "c", 18, 0.5, 0.5)
    text = (truncated / store.METRICS).read_text()
    (truncated / store.METRICS).write_text(text[: len(text) // 2])
    bare = results / store.CELLS / "tiny" / "shapes" / "c" / "b9-0123456789ab"
    bare.mkdir(parents=True)
    (bare / store.CONFIG).write_text("{}\n")
    with caplog.at_level("WARNING"):
        out = lb.write_all(results)
    reasons = dict(out["unreadable"])
    assert set(reasons) == {truncated, bare}
    assert reasons[truncated].startswith("metrics.json does not parse")
    assert reasons[bare] == "missing predictions.jsonl, metrics.json"
    assert str(truncated) in caplog.text and str(bare) in caplog.text
    assert len(pd.read_csv(out["leaderboard"])) == 5 and "c" not in set(out["table"]["method"])
    assert out["plots"][0].is_file() and (results / "auc.csv").is_file()
    lb.main([f"results_dir={results}"])
    assert f"unreadable cell, left out: {bare}" in capsys.readouterr().out


def test_only_unreadable_cells_name_them_in_the_error(tmp_path):
    bare = tmp_path / store.CELLS / "tiny" / "shapes" / "a" / "b9-0123456789ab"
    bare.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no finished cells .*1 unreadable: .*b9-0123456789ab"):
        lb.write_all(tmp_path)


@pytest.fixture
def mixed(tmp_path):
    """A tuned configuration stored under the same method, and a second sample set (n=16)."""
    _cell(tmp_path, "none", None, 0.80, 1.0)
    _cell(tmp_path, "none", None, 0.50, 1.0, n=16)
    _cell(tmp_path, "vflowopt", 18, 0.75, 0.5, variant="vflowopt")
    _cell(tmp_path, "vflowopt", 9, 0.625, 0.3, variant="vflowopt")
    _cell(tmp_path, "vflowopt", 18, 0.875, 0.5, variant="vflowopt_tuned_eq36", params={"layer": 3})
    _cell(tmp_path, "vflowopt", 9, 0.75, 0.3, variant="vflowopt_tuned_eq36", params={"layer": 3})
    _cell(tmp_path, "vflowopt", 18, 0.375, 0.5, n=16, variant="vflowopt")
    return tmp_path


def test_variants_and_sample_sets_are_never_mixed(mixed):
    """Before: one "vflowopt" line through 5 points at 2 budgets (a zig-zag), AUC over both sample sets
    and the n=16 cell relative to the n=8 reference. Now: a line, an AUC row and a reference each."""
    board = lb.leaderboard(mixed)
    assert {"variant", "n_samples"} <= set(board.columns) and len(board) == 7
    n16 = board[(board["method"] == "vflowopt") & (board["n_samples"] == 16)].iloc[0]
    assert n16["accuracy_rel"] == pytest.approx(0.375 / 0.50)  # its own sample set's reference
    tuned = board[board["variant"] == "vflowopt_tuned_eq36"].set_index("budget")
    assert tuned.loc[9, "accuracy_rel"] == pytest.approx(0.75 / 0.80)

    curves = lb.method_curves(board)
    assert {(k.variant, k.n_samples) for k in curves} == {
        ("vflowopt", 8), ("vflowopt_tuned_eq36", 8), ("vflowopt", 16)}
    for key, c in curves.items():
        assert set(c["n_samples"]) == {key.n_samples}
        assert set(c.loc[c["method"] != "none", "variant"]) == {key.variant}
        assert lb.is_reference(c).sum() == 1 and c["budget"].dropna().is_unique
        assert c["flops_rel"].is_monotonic_increasing
    assert set(lb.line_labels(curves).values()) == {"vflowopt (n=8)", "vflowopt_tuned_eq36 (n=8)", "vflowopt (n=16)"}

    auc = lb.auc_table(board).set_index(["variant", "n_samples"])
    assert len(auc) == 3 and auc["method"].eq("vflowopt").all()
    assert auc.loc[("vflowopt_tuned_eq36", 8), "rank"] == 1 and auc.loc[("vflowopt", 8), "rank"] == 2
    assert auc.loc[("vflowopt", 16), "rank"] == 1  # ranked within its own sample set only
    assert auc.loc[("vflowopt", 8), "flops_rel_lo"] == pytest.approx(0.3)
    assert auc.loc[("vflowopt", 16), "flops_rel_lo"] == pytest.approx(0.5)
    # the n=16 line: (0.5, .375) to (1, .5), a mean of .4375; never averaged with the n=8 cells
    assert auc.loc[("vflowopt", 16), "auc_accuracy"] == pytest.approx((0.375 + 0.5) / 2)


def test_one_line_label_when_one_sample_set(results):
    labels = lb.line_labels(lb.method_curves(lb.leaderboard(results)))
    assert sorted(labels.values()) == ["a", "b"]


def test_accuracy_intervals_from_metrics_or_predictions_and_drawn_as_error_bars(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from benchmarks import intervals, plots

    ref_scores, old_scores = _rng_scores(20, 0.8, 1), _rng_scores(20, 0.6, 2)
    _cell(tmp_path, "none", None, np.mean(ref_scores), 1.0, n=20, seed=3, scores=ref_scores)
    _cell(tmp_path, "a", 18, 0.7, 0.6, n=20, seed=3, accuracy_ci95=[0.5, 0.85], accuracy_rel_ci95=[0.6, 1.05])
    _cell(tmp_path, "old", 18, np.mean(old_scores), 0.5, n=20, seed=3, scores=old_scores)  # lacks both
    board = lb.leaderboard(tmp_path).set_index("method")
    assert board.loc["a", ["accuracy_ci95_lo", "accuracy_ci95_hi"]].tolist() == [0.5, 0.85]
    assert board.loc["a", ["accuracy_rel_ci95_lo", "accuracy_rel_ci95_hi"]].tolist() == [0.6, 1.05]
    assert board.loc["old", ["accuracy_ci95_lo", "accuracy_ci95_hi"]].tolist() == pytest.approx(
        intervals.wilson_interval(old_scores))
    ids = [f"s{i}" for i in range(20)]  # paired over the shared ids, in sorted order
    a, b = intervals.paired_scores(dict(zip(ids, old_scores, strict=True)), dict(zip(ids, ref_scores, strict=True)))
    direct = intervals.paired_bootstrap(a, b, intervals.ratio_of_means, seed=3)
    assert board.loc["old", ["accuracy_rel_ci95_lo", "accuracy_rel_ci95_hi"]].tolist() == pytest.approx(direct)

    drawn = []
    real = Axes.errorbar

    def spy(self, x, y, yerr=None, **kw):
        drawn.append((self, np.asarray(y, float), np.asarray(yerr, float)))
        return real(self, x, y, yerr=yerr, **kw)

    monkeypatch.setattr(Axes, "errorbar", spy)
    plots.plot_pareto(board.reset_index(), "tiny", "shapes", tmp_path / "p.png")
    drawn = [(y, yerr) for ax, y, yerr in drawn if ax is drawn[0][0]]  # the main panel (a zoom repeats lines)
    assert len(drawn) == 2  # a line per variant
    for y, yerr in drawn:
        assert yerr.shape == (2, len(y)) and (yerr >= 0).all()
    y, yerr = next(d for d in drawn if 0.7 in d[0])
    i = list(y).index(0.7)
    assert yerr[:, i] == pytest.approx([0.7 - 0.5, 0.85 - 0.7])


def test_delta_vs_best_is_a_paired_bootstrap_over_the_same_samples(tmp_path):
    from benchmarks import intervals

    ref, x, y = _rng_scores(30, 0.9, 3), _rng_scores(30, 0.5, 4), _rng_scores(30, 0.75, 5)
    _cell(tmp_path, "none", None, np.mean(ref), 1.0, n=30, seed=7, scores=ref)
    _cell(tmp_path, "x", 18, np.mean(x), 0.5, n=30, seed=7, scores=x)
    best = _cell(tmp_path, "y", 18, np.mean(y), 0.5, n=30, seed=7, scores=y)
    _cell(tmp_path, "y", 9, 0.1, 0.3, n=30, seed=7)  # another budget: its own comparison
    rows = (best / store.PREDICTIONS).read_text().splitlines()
    (best / store.PREDICTIONS).write_text("\n".join(reversed(rows)) + "\n")  # matched by id, not by line
    board = lb.leaderboard(tmp_path).set_index(["method", "budget"])
    assert np.mean(y) > np.mean(x)
    assert board.loc[("x", 18), "delta_vs_best"] == pytest.approx(np.mean(x) - np.mean(y))
    ids = [f"s{i}" for i in range(30)]
    a, b = intervals.paired_scores(dict(zip(ids, x, strict=True)), dict(zip(ids, y, strict=True)))
    direct = intervals.paired_bootstrap(a, b, intervals.difference_of_means, seed=7)
    assert board.loc[("x", 18), ["delta_vs_best_ci95_lo", "delta_vs_best_ci95_hi"]].tolist() == pytest.approx(direct)
    assert direct[1] < 0 or direct[0] < 0  # a real interval, not the point
    assert board.loc[("y", 18), ["delta_vs_best", "delta_vs_best_ci95_lo", "delta_vs_best_ci95_hi"]].tolist() == [0, 0, 0]
    assert board.loc[("y", 9), "delta_vs_best"] == 0  # alone at its budget


def test_seeds_are_averaged_into_one_point_and_kept_per_cell(tmp_path):
    from benchmarks import intervals

    s0, s1 = [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]
    _cell(tmp_path, "none", None, 0.8, 1.0)
    for seed, s in ((0, s0), (1, s1)):
        _cell(tmp_path, "random", 18, np.mean(s), 0.5, scores=s, variant="random", method_seed=seed)
    fastv = [1, 1, 1, 0, 1, 1, 1, 1]
    _cell(tmp_path, "fastv", 18, np.mean(fastv), 0.5, scores=fastv, variant="fastv")
    out = lb.write_all(tmp_path)
    board = out["table"].set_index("variant")
    r = board.loc["random"]
    assert len(board) == 3 and r["n_seeds"] == 2 and r["accuracy"] == pytest.approx(0.625)
    assert r["accuracy_std"] == pytest.approx(np.std([0.5, 0.75], ddof=1))
    assert r["accuracy_rel"] == pytest.approx(0.625 / 0.8)
    lo = np.mean([intervals.wilson_interval(s0)[0], intervals.wilson_interval(s1)[0]])
    assert r["accuracy_ci95_lo"] == pytest.approx(lo)
    assert board.loc["fastv", "n_seeds"] == 1 and np.isnan(board.loc["fastv", "accuracy_std"])
    # the difference to the best (fastv) pairs each sample's mean score over the seeds
    ids = [f"s{i}" for i in range(8)]
    mean = (np.array(s0) + np.array(s1)) / 2
    a, b = intervals.paired_scores(dict(zip(ids, mean, strict=True)), dict(zip(ids, fastv, strict=True)))
    direct = intervals.paired_bootstrap(a, b, intervals.difference_of_means, seed=0)
    assert r["delta_vs_best"] == pytest.approx(0.625 - 0.875)
    assert [r["delta_vs_best_ci95_lo"], r["delta_vs_best_ci95_hi"]] == pytest.approx(direct)

    cells = pd.read_csv(out["cells"])
    assert list(cells.columns[: len(lb.CELL_COLUMNS)]) == lb.CELL_COLUMNS
    assert sorted(cells.loc[cells["variant"] == "random", "method_seed"]) == [0, 1] and len(cells) == 4
    assert set(r["config_hash"].split(",")) == set(cells.loc[cells["variant"] == "random", "config_hash"])
    curves = lb.method_curves(out["table"])
    line = next(c for k, c in curves.items() if k.variant == "random")
    assert len(line) == 2  # one point at budget 18 plus the reference
    assert lb.line_labels(curves)[next(k for k in curves if k.variant == "random")] == "random (2 seeds)"
    auc = out["auc_table"].set_index("variant")
    assert auc.loc["random", "n_points"] == 2


def test_one_variant_with_two_parameter_sets_is_not_averaged_and_warns(tmp_path, caplog):
    """Cells of an older runner (no ``variant``) with different params share the method's label:
    they stay two points (never averaged as seeds) and a warning says how to tell them apart."""
    _cell(tmp_path, "none", None, 0.8, 1.0)
    _cell(tmp_path, "vflowopt", 18, 0.5, 0.5, params={"layer": 2})
    _cell(tmp_path, "vflowopt", 18, 0.75, 0.5, params={"layer": 3})
    with caplog.at_level("WARNING"):
        board = lb.leaderboard(tmp_path)
    assert (board["variant"] == "vflowopt").sum() == 2 and (board["n_seeds"] == 1).all()
    assert "has 2 parameter sets at budget 18" in caplog.text
