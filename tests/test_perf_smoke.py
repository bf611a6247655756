"""`make perf`'s model part runs end to end on the tiny configs (no timing is asserted: figures only
mean something in `make perf` itself, interleaved and repeated)."""

from __future__ import annotations

import pytest

from benchmarks.perf.model import model_perf


@pytest.mark.parametrize("model", ["tiny", "tiny-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_model_perf_runs_on_tiny_configs(model):
    result = model_perf(model=model, methods=("fastv", "random"), repeats=1, verbose=False)
    rows = result["rows"]
    assert {r["method"] for r in rows} == {"fastv", "random"} and len(rows) == 2 * len(result["budgets"])
    for r in rows:
        assert r["flops_bound"] > 1.0  # pruning lowers the analytic prefill FLOPs
        assert r["llm_visual_tokens"] and min(r["llm_visual_tokens"]) <= r["budget"]
