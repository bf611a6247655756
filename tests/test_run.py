"""The benchmark runner end to end on the tiny model: cells, metrics, skip/resume, launchers, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from benchmarks import leaderboard as lb
from benchmarks import run as runner
from benchmarks import store

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
N_VIS = 36  # tiny model: 48 px / 8 px patches
TINY = ["model=tiny", "task=shapes", "batch_size=2", "latency.n_samples=1", "latency.warmup=1",
        "latency.decode_tokens=3", "progress=false"]


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _run(tmp_path, *extra: str):
    cfg = _cfg([*TINY, f"results_dir={tmp_path}", *extra])
    return runner.run(cfg)


def test_cells_metrics_and_skip(tmp_path):
    paths = _run(tmp_path, "method=fastv", "budgets=[9,null]", "n_samples=4")
    assert len(paths) == 2
    ref, pruned = paths  # the unpruned reference runs first, stored as method 'none'
    assert ref.parts[-2] == "none" and pruned.parts[-2] == "fastv"
    for p in paths:
        assert sorted(x.name for x in p.iterdir()) == ["config.yaml", "metrics.json", "predictions.jsonl"]
        assert len((p / "predictions.jsonl").read_text().splitlines()) == 4
        saved = yaml.safe_load((p / "config.yaml").read_text())
        assert saved["config_hash"] == store.read_metrics(p)["config_hash"]
        assert store.config_hash({k: v for k, v in saved.items() if k != "config_hash"}) == saved["config_hash"]
    m_ref, m = store.read_metrics(ref), store.read_metrics(pruned)
    assert m_ref["equiv_tokens"] == N_VIS and m_ref["flops_rel"] == pytest.approx(1.0)
    assert m_ref["accuracy_rel"] == pytest.approx(1.0) or m_ref["accuracy"] == 0
    # FastV at K=2 of 4 layers keeping 9: two layers see 36 visual tokens, two see 9.
    assert m["llm_visual_tokens_per_layer"] == [36, 36, 9, 9] and m["equiv_tokens"] == pytest.approx(22.5)
    assert m["flops_rel"] < 1 and m["tflops_prefill"] < m_ref["tflops_prefill"]
    assert m["overhead_tflops"] > 0 and m_ref["overhead_tflops"] == 0
    f = m["flops_prefill"]
    assert f["total"] == pytest.approx(f["vision"] + f["projector"] + f["llm"] + f["overhead"])
    # KV cache measured from the real cache: layers >= K hold 27 fewer tokens (4 layers, 2 kv heads x 16, fp32).
    assert m_ref["kv_cache_bytes"] - m["kv_cache_bytes"] == pytest.approx(2 * 2 * 2 * 16 * 4 * (36 - 9))
    # ... and the unpruned cache is K and V of every prompt token in every layer (latency sample 0).
    from benchmarks.tasks import get_task
    from mllm_adapters.tiny import build_tiny_llava

    s0 = get_task("shapes").samples(split="eval", n=1, seed=0)[0]
    enc = build_tiny_llava()[1](images=[s0.image], text=[f"USER: <image>\n{s0.question} ASSISTANT:"])
    assert m_ref["kv_cache_bytes"] == 2 * 4 * 2 * 16 * 4 * len(enc["input_ids"][0])
    assert m["params"] == {"layer": 2, "positions": "original"} and m["budget"] == 9
    assert set(m["accuracy_by_family"]) <= set(__import__("benchmarks.tasks", fromlist=["x"]).get_task("shapes").families)
    assert 0 <= m["relevant_recall"] <= 1 and m_ref["relevant_recall"] == pytest.approx(1.0)
    for key in ("prefill_ms", "decode_ms_per_token", "kv_cache_mb", "peak_mem_mb"):
        assert m[key] > 0
    # Rerunning the same command skips both cells (no rewrite).
    before = {p: (p / "metrics.json").stat().st_mtime_ns for p in paths}
    assert _run(tmp_path, "method=fastv", "budgets=[9,null]", "n_samples=4") == paths
    assert {p: (p / "metrics.json").stat().st_mtime_ns for p in paths} == before
    # A method parameter override is a different cell; the reference is shared.
    paths3 = _run(tmp_path, "method=fastv", "budgets=[null,9]", "n_samples=4", "method.params.layer=3")
    assert paths3[0] == ref and paths3[1] != pruned
    assert store.read_metrics(paths3[1])["llm_visual_tokens_per_layer"] == [36, 36, 36, 9]
    # method 'none' with budgets is the reference only (no relabelled copies of it).
    assert _run(tmp_path, "method=none", "budgets=[null,9]", "n_samples=4") == [ref]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["method=fastv", "budgets=[null,37]"], r"budgets: 37 is above the 36 visual tokens .*accepted: null"),
        (["method=fastv", "budgets=[0]"], r"budgets: 0 is not a positive int"),
        (["method=fastv", "task.name=nope"], r"unknown task 'nope'.*shapes"),
        (["method=fastv", "method.name=nope"], r"unknown method 'nope'; known methods: .*fastv"),
        (["method=fastv", "+method.params.k=1"], r"unknown parameter\(s\) \['k'\] for method 'fastv'"),
        (["method=fastv", "device=tpu"], r"device='tpu' is not supported; accepted: auto, cpu"),
    ],
)
def test_clear_errors(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _run(tmp_path, "n_samples=2", *overrides)


def test_unknown_group_option_lists_known_ones():
    for group, known in (("method", "fastv"), ("model", "embedded"), ("task", "shapes")):
        with pytest.raises(MissingConfigException) as err:
            _cfg([f"{group}=nope"])
        assert f"Available options in '{group}'" in str(err.value) and known in str(err.value)


def test_unwritable_results_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"results_dir=.* is not writable"):
        _run(blocker / "results", "n_samples=2")


def test_missing_checkpoints_are_clear_errors(tmp_path):
    from benchmarks.models import load_model

    with pytest.raises(FileNotFoundError, match="embedded model is missing"):
        load_model({"name": "embedded", "source": "embedded", "path": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"cannot load checkpoint .*no-such-model.*model.path"):
        load_model({"name": "x", "source": "hub", "path": str(tmp_path / "no-such-model"), "local_files_only": True})
    with pytest.raises(ValueError, match="model.source='pip' .* accepted: embedded, hub, tiny"):
        load_model({"name": "x", "source": "pip"})


def test_every_registered_method_has_a_config_with_its_defaults():
    from pruners import available_pruners, get_pruner_class

    for name in available_pruners():
        if name.startswith("_"):
            continue  # test-only pruners registered by other test modules
        path = CONF / "method" / f"{name}.yaml"
        assert path.is_file(), f"conf/method/{name}.yaml missing: run `python -m benchmarks.method_configs`"
        conf = yaml.safe_load(path.read_text())
        assert conf["name"] == name and (conf["params"] or {}) == get_pruner_class(name).defaults


def test_joblib_job_pins_a_gpu(monkeypatch):
    """Job i of a parallel sweep runs on GPU i mod n (simulated GPU count; no CUDA initialised)."""
    monkeypatch.setattr(runner, "_gpu_count_without_init", lambda: 4)
    monkeypatch.setattr(runner.torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(runner, "_PINNED_GPU", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert runner.resolve_device("auto", job_num=5) == "cuda:0"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert runner.resolve_device("auto", job_num=6) == "cuda:0"  # a reused worker keeps its GPU
    monkeypatch.setattr(runner, "_PINNED_GPU", None)
    monkeypatch.setattr(runner, "_gpu_count_without_init", lambda: 0)
    assert runner.resolve_device("auto", job_num=1) == "cpu"
    with pytest.raises(ValueError, match="no CUDA GPU"):
        runner.resolve_device("cuda")


# ---- real subprocesses: kill-and-resume, joblib launcher ----------------------------------------
SWEEP = [sys.executable, "-m", "benchmarks.run", "--multirun", "method=fastv,random", *TINY,
         "budgets=[null,18,9]", "n_samples=6", "num_threads=1"]


def _cell_state(results: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(results)): ((p / "metrics.json").stat().st_mtime_ns, (p / "metrics.json").read_text())
            for p in store.iter_cells(results)}


def _check_complete(results: Path) -> None:
    cells = store.iter_cells(results)
    methods = sorted(store.read_metrics(c)["method"] for c in cells)
    assert methods == ["fastv", "fastv", "none", "random", "random"]
    for c in cells:
        rows = [json.loads(line) for line in (c / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    assert not list(results.rglob(f"{store.TMP_PREFIX}*"))
    board = lb.leaderboard(results)
    assert len(board) == 5 and board["config_hash"].is_unique


def test_killed_sweep_resumes_without_loss_or_duplicates(tmp_path):
    results = tmp_path / "results"
    cmd = [*SWEEP, f"results_dir={results}", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not store.iter_cells(results) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"sweep ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # mid-sweep: the next cell is being computed
    proc.wait()
    survived = _cell_state(results)
    assert 1 <= len(survived) < 5
    for c in store.iter_cells(results):  # whatever survived is complete
        assert len((c / "predictions.jsonl").read_text().splitlines()) == 6
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _cell_state(results)
    assert {k: after[k] for k in survived} == survived  # finished cells were skipped, not redone
    assert "skip finished cell" in done.stderr + done.stdout or not survived
    _check_complete(results)


def test_joblib_launcher_two_jobs_on_cpu(tmp_path):
    results = tmp_path / "results"
    cmd = [*SWEEP, "hydra/launcher=local", "hydra.launcher.n_jobs=2", f"results_dir={results}",
           f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr
    _check_complete(results)
    out = lb.write_all(results)
    assert pd.read_csv(out["leaderboard"]).shape[0] == 5 and out["plots"][0].is_file()


def test_every_registered_task_has_a_config():
    from benchmarks.tasks import available_tasks

    for name in available_tasks():
        path = CONF / "task" / f"{name}.yaml"
        assert path.is_file(), f"conf/task/{name}.yaml missing (name: {name}, split: eval)"
        assert yaml.safe_load(path.read_text())["name"] == name


def test_weights_fingerprint_follows_the_weights(tmp_path):
    """A retrained checkpoint in the same folder gets a new fingerprint (so new result cells); copying
    the folder or rewriting its card does not."""
    import shutil

    from benchmarks.models import EMBEDDED_DIR, weights_fingerprint

    a = tmp_path / "a"
    shutil.copytree(EMBEDDED_DIR, a)
    fp = weights_fingerprint(a)
    assert fp == weights_fingerprint(EMBEDDED_DIR)
    (a / "README.md").write_text("a new card")
    (a / "eval_results.json").write_text("{}")
    assert weights_fingerprint(a) == fp
    w = a / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF  # one byte of the last tensor
    w.write_bytes(bytes(data))
    assert weights_fingerprint(a) != fp


def test_auto_budget_runs_a_method_that_chooses_its_own_count(tmp_path):
    """budgets=[auto]: the method's own cell with budget=None passed to the pruner (recoverable
    adaptive), not the unpruned reference; refused for methods where None means keep-all."""
    ref, auto = _run(tmp_path, "method=recoverable", "method.params.mode=adaptive", "budgets=[auto,null]",
                     "n_samples=4")
    assert ref.parts[-2] == "none" and auto.parts[-2] == "recoverable" and auto.name.startswith("bauto-")
    m = store.read_metrics(auto)
    assert m["budget"] == "auto" and m["params"]["mode"] == "adaptive" and m["equiv_tokens"] < N_VIS
    board = lb.leaderboard(tmp_path)
    assert board.loc[board["method"] == "recoverable", "budget"].isna().all()
    with pytest.raises(ValueError, match=r"'auto' is for methods that choose their own token count"):
        _run(tmp_path, "method=fastv", "budgets=[auto]", "n_samples=4")
    with pytest.raises(ValueError, match=r"chooses its own token count; accepted: null and 'auto', got \[9\]"):
        _run(tmp_path, "method=recoverable", "method.params.mode=adaptive", "budgets=[9]", "n_samples=4")
    with pytest.raises(ValueError, match=r"budgets: 'most' is not a positive int, null or 'auto'"):
        runner.validate_budgets(["most"], N_VIS, "tiny")
