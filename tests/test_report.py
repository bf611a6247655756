"""The static HTML report (benchmarks.report) without a browser: what the page holds (the browser test,
tests/browser/, checks it in Chromium)."""

from __future__ import annotations

import re

import pytest

from benchmarks import report, store
from tests.test_leaderboard import _cell


@pytest.fixture
def results(tmp_path):
    _cell(tmp_path, "none", None, 0.8, 1.0)
    _cell(tmp_path, "a", 18, 0.75, 0.6)
    _cell(tmp_path, "b", 18, 0.5, 0.5)
    return tmp_path


def test_page_holds_every_cell_plot_config_and_the_environment(results):
    out = report.build(results)
    page = out.index.read_text()
    cells = list(store.cell_folders(results))
    assert out.rows == len(cells) == 3
    # the table's data: one row per cell, each linking to its config, which the page holds
    anchors = re.findall(r'<details id="cfg-([0-9a-f]+)">', page)
    assert len(anchors) == 3 and all(f"#cfg-{h}" in page for h in anchors)
    assert {p.name for p in out.plots} == {"pareto_tiny_shapes.png", "tokens_tiny_shapes.png",
                                           "latency_tiny_shapes.png"}
    for p in out.plots:
        assert p.parent.parent == out.index.parent and f'src="plots/{p.name}"' in page
    # offline: the DataTables bundle is inlined, nothing is fetched from the network
    assert "injectModule" in page and not re.search(r'(src|href)="https?://', page)
    import torch

    assert f"<td>{torch.__version__}</td>" in page and "transformers" in page and "MIT License" in page
    assert "run <code>make overlays</code> first" in page and out.overlays == []
    for name in ("leaderboard.csv", "cells.csv", "auc.csv", "schema.json"):
        assert (out.index.parent / name).is_file()


def test_a_rebuild_drops_figures_of_cells_that_are_gone(results):
    first = report.build(results)
    stale = first.index.parent / "plots" / "pareto_old_task.png"
    stale.write_bytes(b"x")
    again = report.build(results)
    assert not stale.exists() and again.rows == first.rows


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit, match="accepted: results_dir=DIR, out=DIR, overlays=DIR"):
        report.main(["result_dir=x"])
