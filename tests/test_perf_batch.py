"""`make perf`'s batch part runs end to end on tiny sizes, and batching does not change a sample's
prediction (no timing is asserted: figures only mean something in `make perf` itself)."""

from __future__ import annotations

from benchmarks.perf.batch import batch_perf


def test_batch_perf_structure_and_batch_invariance():
    result = batch_perf(batch_sizes=(1, 2), n_samples=4, methods=("none", "fastv"), repeats=1, warmup=0,
                        verbose=False)
    rows = result["rows"]
    assert [(r["method"], r["batch_size"]) for r in rows] == [("none", 1), ("none", 2), ("fastv", 1), ("fastv", 2)]
    for r in rows:
        assert r["n_samples"] == 4
        assert r["samples_per_s"] > 0 and r["samples_per_cpu_s"] > 0
        assert r["inputs_ms"] > 0 and r["generate_ms"] > 0
        assert 0.0 <= r["pad_fraction"] < 1.0
        assert r["same_predictions_as_smallest"] is True
    assert all(r["pad_fraction"] == 0.0 for r in rows if r["batch_size"] == 1)
    for method, by_bs in result["predictions"].items():
        assert len(by_bs[1]) == 4 and by_bs[2] == by_bs[1], method
