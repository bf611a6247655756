"""The leaderboard's CSV hygiene (benchmarks.csv_schema) and figures (benchmarks.plots), on fake cells."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pandas as pd
import pytest

from benchmarks import csv_schema, plots
from benchmarks import leaderboard as lb
from benchmarks.palette import method_colour
from tests.test_leaderboard import _cell

matplotlib.use("Agg")


@pytest.fixture
def crowded(tmp_path):
    """An unpruned reference and three methods, two of them in the top accuracy band; ``a`` has a
    second variant."""
    _cell(tmp_path, "none", None, 0.90, 1.0, n=40)
    for method, accs in (("a", (0.88, 0.86)), ("b", (0.87, 0.84)), ("c", (0.55, 0.30))):
        for budget, acc, rel in zip((18, 9), accs, (0.6, 0.4), strict=True):
            _cell(tmp_path, method, budget, acc, rel, n=40, prefill_ms=10 * rel + (method == "b"))
    _cell(tmp_path, "a", 18, 0.80, 0.55, n=40, variant="a_alt", params={"layer": 3})
    return tmp_path


def test_csvs_are_rounded_typed_and_described(crowded):
    out = lb.write_all(crowded)
    board = pd.read_csv(out["leaderboard"])
    assert list(board.columns[: len(lb.COLUMNS)]) == lb.COLUMNS
    exact = out["table"]
    # rounding per unit: fractions to 4 decimals, TFLOPs to 6 significant digits
    for col, decimals in (("accuracy_rel", 4), ("accuracy_ci95_lo", 4), ("flops_rel", 4)):
        assert np.allclose(board[col], exact[col].round(decimals), equal_nan=True)
        assert (board[col].dropna().map(lambda v: len(repr(v).split(".")[-1])) <= decimals).all()
    assert (board["tflops_prefill"] - exact["tflops_prefill"]).abs().max() <= 1e-6 * exact["tflops_prefill"].max()
    auc = pd.read_csv(out["auc"])
    assert pd.api.types.is_integer_dtype(auc["rank"]) and sorted(auc["rank"]) == list(range(1, len(auc) + 1))
    # no permanently empty column: acc_at_flops_0.25 is below every curve here, so it is not written
    assert "acc_at_flops_0.25" not in auc and "acc_at_flops_0.50" in auc
    assert not auc.drop(columns="weights").isna().all().any() and out["auc_table"]["acc_at_flops_0.25"].isna().all()
    schema = json.loads((crowded / csv_schema.SCHEMA).read_text())
    assert set(schema) == {"leaderboard.csv", "cells.csv", "auc.csv"}
    for name, cols in schema.items():
        written = pd.read_csv(crowded / name, nrows=0).columns.tolist()
        assert [c["name"] for c in cols] == written
        assert [c["name"] for c in cols if not c["description"]] == []  # every column described
    units = {c["name"]: c for c in schema["leaderboard.csv"]}
    assert units["tflops_prefill"]["unit"] == "TFLOPs" and units["prefill_ms"]["unit"] == "ms"
    assert units["accuracy_colour"]["description"].endswith("family colour")


def test_tidy_keeps_contract_columns_and_fractional_budgets():
    df = pd.DataFrame({"budget": [0.5, 0.25], "accuracy": [0.123456, np.nan], "relevant_recall": [np.nan, np.nan],
                       "n_samples": [10.0, 20.0], "tflops_prefill": [1.23456789e-4, 2.0]})
    out = csv_schema.tidy(df, keep=["accuracy"])
    assert "relevant_recall" not in out and "accuracy" in out
    assert out["budget"].tolist() == [0.5, 0.25]  # fractions of a budget are not truncated to integers
    assert str(out["n_samples"].dtype) == "Int64" and out["accuracy"].iloc[0] == 0.1235
    assert out["tflops_prefill"].iloc[0] == pytest.approx(1.23457e-4, rel=0, abs=1e-12)



def test_colours_fixed_per_method_and_markers_per_variant(crowded, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    board = lb.leaderboard(crowded)
    drawn = []
    real = Axes.errorbar

    def spy(self, x, y, yerr=None, **kw):
        drawn.append((self, kw.get("label"), kw["color"], kw["marker"]))
        return real(self, x, y, yerr=yerr, **kw)

    monkeypatch.setattr(Axes, "errorbar", spy)
    plots.plot_pareto(board, "tiny", "shapes", tmp_path / "all.png")
    main = [d for d in drawn if d[0] is drawn[0][0]]
    assert {label for _, label, _, _ in main} == {"a", "a_alt", "b", "c"}
    by_label = {label: (colour, marker) for _, label, colour, marker in main}
    for label, method in (("a", "a"), ("a_alt", "a"), ("b", "b"), ("c", "c")):
        assert by_label[label] == (method_colour(method), plots.variant_marker(label))
    # the same colour when other methods are left out of the plot
    drawn.clear()
    plots.plot_pareto(board[board["method"].isin(["none", "b"])], "tiny", "shapes", tmp_path / "b.png")
    assert {(label, colour) for _, label, colour, _ in drawn if label} == {("b", method_colour("b"))}
    assert plots.variant_marker("a_alt") == plots.variant_marker("a_alt") in plots.MARKERS


def test_axes_zoom_and_secondary_tflops(crowded, tmp_path):
    import matplotlib.pyplot as plt

    board = lb.leaderboard(crowded)
    figures = []
    real_close = plt.close
    plt.close = lambda fig=None: figures.append(fig)  # keep the figure to look at it
    try:
        plots.plot_pareto(board, "tiny", "shapes", tmp_path / "p.png")
    finally:
        plt.close = real_close
    (fig,) = figures
    main, zoom = fig.axes[0], fig.axes[1] if len(fig.axes) > 1 else None
    assert "relative" in main.get_xlabel()
    secondary = [c for ax in fig.axes for c in ax.child_axes if "TFLOPs" in c.get_xlabel()]
    assert len(secondary) == 2  # one per panel
    ref_tflops = float(board.loc[lb.is_reference(board), "tflops_prefill"].iloc[0])
    assert f"{ref_tflops:.3g}" in secondary[0].get_xlabel()
    zooms = [ax for ax in fig.axes if ax.get_title().startswith("top band")]
    assert len(zooms) == 1 and zoom is not None
    lo, hi = zooms[0].get_ylim()
    assert lo == pytest.approx(plots.ZOOM_REL * 0.90) and hi > 0.90
    real_close(fig)


def test_every_figure_kind_is_written_and_latency_needs_measurements(crowded, tmp_path):
    board = lb.leaderboard(crowded)
    written = plots.write_plots(board, tmp_path)
    assert sorted(p.name for p in written) == ["latency_tiny_shapes.png", "pareto_tiny_shapes.png",
                                               "tokens_tiny_shapes.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
    unmeasured = board.assign(prefill_ms=np.nan)
    assert [p.name for p in plots.write_plots(unmeasured, tmp_path / "u")] == ["pareto_tiny_shapes.png",
                                                                               "tokens_tiny_shapes.png"]
    with pytest.raises(ValueError, match="x='speed'.*accepted: flops, tokens, latency"):
        plots.plot(board, "tiny", "shapes", tmp_path / "x.png", x="speed")
