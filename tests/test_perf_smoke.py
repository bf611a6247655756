"""`make perf`'s model part runs end to end on the tiny configs (no timing is asserted: figures only
mean something in `make perf` itself, interleaved and repeated)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from benchmarks.perf.model import model_perf

#: every tiny runner config (``source: tiny`` in conf/model/): a new family's tiny config is covered as added
TINY_MODELS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "model").glob("*.yaml")
                     if (yaml.safe_load(p.read_text()) or {}).get("source") == "tiny")


def test_every_family_has_a_tiny_config():
    """The perf smoke test reaches each family through its tiny runner config."""
    import mllm_adapters
    from mllm_adapters.registry import family_of_class

    root = Path(__file__).parents[1] / "conf" / "model"
    covered = {family_of_class(yaml.safe_load((root / f"{m}.yaml").read_text()).get("model_class")
                               or "LlavaForConditionalGeneration").name for m in TINY_MODELS}
    assert covered == set(mllm_adapters.available_families())


@pytest.mark.parametrize("model", TINY_MODELS)
def test_model_perf_runs_on_tiny_configs(model):
    result = model_perf(model=model, methods=("fastv", "random"), repeats=1, verbose=False)
    rows = result["rows"]
    assert {r["method"] for r in rows} == {"fastv", "random"} and len(rows) == 2 * len(result["budgets"])
    for r in rows:
        assert r["flops_bound"] > 1.0  # pruning lowers the analytic prefill FLOPs
        assert r["llm_visual_tokens"] and min(r["llm_visual_tokens"]) <= r["budget"]


def test_scoring_perf_three_ways_agree():
    """`make perf`'s scoring part on a narrow layer: our scoring row equals the eager map's row, the
    memory table has its goal columns."""
    from benchmarks.perf.scoring import scoring_perf

    result = scoring_perf(sizes=(48,), repeats=1, verbose=False, shape=(256, 4, 512))
    (row,) = result["three_way"]
    assert row["N"] == 48 and row["max_abs_diff_vs_map_row"] < 1e-5
    (mem,) = result["scoring_memory"]
    assert {"cached_over_op", "uncached_extra_keys", "cached_of_layer"} <= set(mem)
    assert mem["op_peak_mb"] > 0 and mem["cached_peak_mb"] > 0


def test_vision_scoring_perf_cls_row_equals_map_row():
    """The vision side: the CLS row via the engine's path equals the row of the eager attention map."""
    from benchmarks.perf.scoring import vision_scoring_perf

    result = vision_scoring_perf(views=(1,), repeats=1, verbose=False)
    (row,) = result["rows"]
    assert row["views"] == 1 and row["max_abs_diff_vs_map_row"] < 1e-5
    assert row["eager_maps_peak_mb"] > 0 and row["cls_row_peak_mb"] > 0


def test_model_perf_all_methods_lists_refusals():
    """``--methods all``: every registered method is timed or listed with the reason it refuses."""
    from pruners import available_pruners, get_pruner_class

    # the repository's methods (other tests register throw-away pruners in this process)
    every = [m for m in available_pruners() if m != "none" and get_pruner_class(m).__module__.startswith("pruners.")]
    result = model_perf(model="tiny", methods=every, budgets=[8], repeats=1, verbose=False)
    timed = {r["method"] for r in result["rows"]}
    assert timed | set(result["refused"]) == set(every) and not timed & set(result["refused"])
    assert "weights" in result["refused"].get("dyvte", "")  # no routers for this model: says which parameter
