"""Results you can trust: each problem found by probing the runner with faults, reproduced and fixed.

1. stale cells (weights damaged in the middle, code changed) were reused; 2. damaged cells wedged
reruns; 3. variants were merged; 4. no error bars; 5. kept sets were counts. (6, the tuner, is in
test_tune.py; the leaderboard side of 2-4 in test_leaderboard.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from benchmarks import run as runner
from benchmarks import store
from benchmarks.intervals import paired_bootstrap, ratio_of_means, wilson_interval

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
TINY = ["model=tiny", "task=shapes", "batch_size=2", "latency.n_samples=1", "latency.warmup=0",
        "latency.decode_tokens=2", "progress=false"]


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _run(results, *extra: str) -> list[Path]:
    return runner.run(_cfg([*TINY, f"results_dir={results}", *extra]))


def _rows(cell: Path) -> list[dict]:
    return store.read_predictions(cell)


# ---- 1. stale results ----------------------------------------------------------------------------
@pytest.mark.slow
def test_weights_damaged_in_the_middle_get_a_new_cell(tmp_path, monkeypatch):
    """Zeroing 2 MB in the middle of model.safetensors kept the old fingerprint (first and last MiB
    only) and the runner reused the old cell. The full-content digest sees it."""
    from benchmarks.models import EMBEDDED_DIR, weights_fingerprint

    monkeypatch.setenv("PRUNEBENCH_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "embedded"
    shutil.copytree(EMBEDDED_DIR, model)
    args = ["model=embedded", f"model.path={model}", "task=shapes", "budgets=[null]", "n_samples=4",
            "latency.n_samples=0", "progress=false", f"results_dir={tmp_path / 'r'}"]
    before = weights_fingerprint(model)
    (first,) = runner.run(_cfg(args))
    w = model / "model.safetensors"
    data = bytearray(w.read_bytes())
    mid = len(data) // 2
    data[mid - (1 << 20): mid + (1 << 20)] = bytes(2 << 20)
    w.write_bytes(bytes(data))
    assert w.stat().st_size == len(data)
    assert weights_fingerprint(model) != before
    runner._MODEL_CACHE.clear()
    (second,) = runner.run(_cfg(args))
    assert second != first and store.is_finished(second)
    assert store.read_metrics(second)["weights"] == weights_fingerprint(model) != store.read_metrics(first)["weights"]


def test_file_digest_cache_is_keyed_by_size_mtime_and_inode(tmp_path, monkeypatch):
    from benchmarks import models

    monkeypatch.setenv("PRUNEBENCH_CACHE_DIR", str(tmp_path / "cache"))
    models._DIGEST_MEMO.clear()
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    d1 = models.file_digest(f)
    assert json.loads(models.digest_cache_path().read_text())  # cached on disk
    models._DIGEST_MEMO.clear()
    assert models.file_digest(f) == d1  # from the cache file
    f.write_bytes(b"a" * 500 + b"b" + b"a" * 499)  # same size, new content and mtime
    assert models.file_digest(f) != d1
    # The documented blind spot: same size, mtime restored, same inode.
    st = f.stat()
    d2 = models.file_digest(f)
    with open(f, "r+b") as fh:
        fh.write(b"c")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert models.file_digest(f) == d2


def test_code_is_part_of_a_cells_identity(tmp_path, monkeypatch):
    """The hash ignored code: a corrected method or a transformers upgrade reused old cells. Now the
    method's version, the engine version and the lock's digest are in every cell's config."""
    from benchmarks.lockfile import lock_digest
    from mllm_adapters import ENGINE_VERSION
    from pruners import get_pruner_class

    cfg = _cfg([*TINY, "method=fastv"])
    a = runner.cell_config(cfg, 9, "fastv", {"layer": 2, "positions": "original"})
    version = get_pruner_class("fastv").version
    assert a["code"] == {"method_version": version, "engine_version": ENGINE_VERSION, "lock": lock_digest()}
    assert a["code"]["lock"] and len(a["code"]["lock"]) == 16
    monkeypatch.setattr(get_pruner_class("fastv"), "version", version + 1)
    b = runner.cell_config(cfg, 9, "fastv", {"layer": 2, "positions": "original"})
    assert store.config_hash(a) != store.config_hash(b)
    monkeypatch.setattr("mllm_adapters.ENGINE_VERSION", ENGINE_VERSION + 1)
    assert store.config_hash(runner.cell_config(cfg, 9, "fastv", {"layer": 2, "positions": "original"})) \
        != store.config_hash(b)
    other_lock = tmp_path / "requirements.lock"
    other_lock.write_text("torch==2.0.0 --hash=sha256:00\n")
    monkeypatch.setenv("PRUNEBENCH_LOCK", str(other_lock))
    assert runner.cell_config(cfg, 9, "fastv", {})["code"]["lock"] == lock_digest(other_lock) != a["code"]["lock"]


# ---- 2. damaged cells ----------------------------------------------------------------------------
def test_damaged_cells_are_recomputed_not_reused_or_fatal(tmp_path):
    """A truncated metrics.json was skipped forever; a folder missing it failed every rerun with
    'Directory not empty'; an empty reference cell broke every dependent cell."""
    ref, cell = _run(tmp_path, "method=fastv", "budgets=[null,9]", "n_samples=4")
    good = store.read_metrics(cell)
    (cell / "metrics.json").write_text((cell / "metrics.json").read_text()[:50])  # truncated
    (ref / "predictions.jsonl").write_text("")  # an empty reference
    again = _run(tmp_path, "method=fastv", "budgets=[null,9]", "n_samples=4")
    assert again == [ref, cell] and all(store.is_finished(p) for p in again)
    redone = store.read_metrics(cell)
    assert redone["accuracy"] == good["accuracy"] and redone["accuracy_rel"] == pytest.approx(good["accuracy_rel"])
    assert len(list((tmp_path / store.DAMAGED).rglob("metrics.json"))) == 2  # both kept for inspection
    (cell / "metrics.json").unlink()  # a half-present folder
    assert _run(tmp_path, "method=fastv", "budgets=[9]", "n_samples=4") == [cell]
    assert store.is_finished(cell)


@pytest.mark.slow
def test_a_damaged_cell_does_not_abort_a_multirun(tmp_path):
    base = [sys.executable, "-m", "benchmarks.run", "-m", *TINY, "budgets=[null,9]", "n_samples=2",
            f"results_dir={tmp_path / 'r'}", f"hydra.sweep.dir={tmp_path / 'h'}", "method=fastv,random"]
    first = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    cells = store.iter_cells(tmp_path / "r")
    assert len(cells) == 3  # the reference once, then fastv and random
    victim = next(c for c in cells if c.parent.name == "fastv")
    (victim / "metrics.json").write_text("{")
    second = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert store.iter_cells(tmp_path / "r") == cells and not store.unreadable_cells(tmp_path / "r")
    assert str(victim) in second.stdout + second.stderr  # the log names the damaged cell


# ---- 3. variants ---------------------------------------------------------------------------------
def test_variants_are_recorded_and_separate_cells(tmp_path):
    """`vflowopt_tuned_eq36` was stored as plain vflowopt; non-default parameters had no label."""
    (cell,) = _run(tmp_path, "method=fastv", "method.params.layer=1", "budgets=[9]", "n_samples=2")
    assert store.read_metrics(cell)["variant"] == "fastv[layer=1]"
    (plain,) = _run(tmp_path, "method=fastv", "budgets=[9]", "n_samples=2")
    assert store.read_metrics(plain)["variant"] == "fastv" and plain != cell
    cfg = _cfg([*TINY, "method=vflowopt_tuned_eq36"])
    params = runner.method_params(cfg.method)
    assert runner.variant_label(cfg.method, "vflowopt", params, {}) == "vflowopt_tuned_eq36"
    tuned = runner.cell_config(cfg, 9, "vflowopt", params, variant="vflowopt_tuned_eq36")
    untuned = runner.cell_config(cfg, 9, "vflowopt", params, variant="vflowopt")
    assert store.config_hash(tuned) != store.config_hash(untuned)


# ---- 4. error bars -------------------------------------------------------------------------------
def test_every_accuracy_has_its_interval(tmp_path):
    ref, cell = _run(tmp_path, "method=random", "budgets=[null,6]", "n_samples=8")
    for c in (ref, cell):
        m, rows = store.read_metrics(c), _rows(c)
        assert m["accuracy_ci95"] == pytest.approx(list(wilson_interval([r["score"] for r in rows])))
        lo, hi = m["accuracy_ci95"]
        assert lo <= m["accuracy"] <= hi
    m = store.read_metrics(cell)
    ours = [r["score"] for r in sorted(_rows(cell), key=lambda r: r["id"])]
    theirs = [r["score"] for r in sorted(_rows(ref), key=lambda r: r["id"])]
    want = paired_bootstrap(ours, theirs, ratio_of_means, seed=0)
    assert (m["accuracy_rel_ci95"] is None) == (want is None)
    if want is not None:
        assert m["accuracy_rel_ci95"] == pytest.approx(list(want))
        assert want[0] <= m["accuracy_rel"] <= want[1]


def test_seeds_run_a_seeded_method_once_per_seed(tmp_path, capsys):
    cells = _run(tmp_path, "method=random", "budgets=[null,6]", "n_samples=4", "seeds=[0,1,2]")
    assert len(cells) == 4 and [c.name.split("-")[1] for c in cells[1:]] == ["s0", "s1", "s2"]
    kept = {store.read_metrics(c)["method_seed"]: [r["kept"] for r in _rows(c)] for c in cells[1:]}
    assert len({json.dumps(v) for v in kept.values()}) == 3  # three different draws
    out = capsys.readouterr().out
    assert "4 cell(s) of this run" in out and out.count("random") == 3
    assert len(_run(tmp_path, "method=fastv", "budgets=[6]", "n_samples=4", "seeds=[0,1,2]")) == 1
    with pytest.raises(ValueError, match=r"seeds=\[0, 0\] repeats a seed"):
        _run(tmp_path, "method=random", "budgets=[6]", "seeds=[0,0]")
    with pytest.raises(ValueError, match=r"seeds='x' is not supported; accepted: null or a non-empty list of ints"):
        _run(tmp_path, "method=random", "budgets=[6]", "seeds=x")


# ---- 5. kept sets --------------------------------------------------------------------------------
def test_predictions_store_the_kept_positions(tmp_path):
    """`kept` was a count although the docs said positions."""
    from benchmarks.models import load_model
    from mllm_adapters import apply_pruner

    cfg = _cfg([*TINY, "method=random"])
    (_, cell) = _run(tmp_path, "method=random", "budgets=[null,6]", "n_samples=2", "batch_size=1")
    lm = load_model(dict(cfg.model))
    task = __import__("benchmarks.tasks", fromlist=["get_task"]).get_task("shapes")
    samples = task.samples(split="eval", n=2, seed=0)
    rows = _rows(cell)
    with apply_pruner(lm.model, "random", budget=6, seed=0) as handle:
        for s, row in zip(samples, rows):
            enc = runner._inputs(lm, [s])
            lm.model(**enc)
            assert row["kept"] == [handle.kept_indices[0].tolist()] and row["n_kept"] == 6
    (_, fast) = _run(tmp_path, "method=pdrop", "budgets=[null,6]", "n_samples=2")
    for row in _rows(fast):
        layers = sorted(row["kept_by_layer"], key=int)
        assert layers and row["kept"] == row["kept_by_layer"][layers[-1]]
        for a, b in zip(layers, layers[1:]):  # each pruning layer keeps a subset of the previous one
            assert set(row["kept_by_layer"][b][0]) <= set(row["kept_by_layer"][a][0])
