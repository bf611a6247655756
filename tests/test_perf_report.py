"""The README's performance block is exactly what the kept `make perf` run renders (no hand-edited figure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.perf.report import KEPT, current_block, render, replace_block

ROOT = Path(__file__).resolve().parents[1]


def test_readme_perf_block_is_rendered_from_the_kept_run():
    report = json.loads(KEPT.read_text())
    assert report.get("commit"), "the kept run records the commit it measured"
    for part in ("model", "scoring", "vision_scoring", "batch", "attention_memory"):
        assert part in report, f"the kept run lacks the {part!r} part: rerun `make perf` with every part"
    assert current_block((ROOT / "README.md").read_text()) == render(report).strip()


def test_replace_block_needs_the_markers():
    with pytest.raises(ValueError, match="perf:begin"):
        replace_block("no markers here", "x")
    text = "a\n<!-- perf:begin -->\nold\n<!-- perf:end -->\nb"
    assert current_block(replace_block(text, "new table")) == "new table"
