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
import torch
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
    for local_only in (True, False):
        with pytest.raises(FileNotFoundError, match=r"^model 'x': folder not found: .*no-such-model$"):
            load_model({"name": "x", "source": "hub", "path": str(tmp_path / "no-such-model"),
                        "local_files_only": local_only})
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, not a checkpoint folder"):
        load_model({"name": "x", "source": "hub", "path": str(tmp_path / "file")})
    with pytest.raises(ValueError, match="model.source='pip' .* accepted: embedded, hub, tiny"):
        load_model({"name": "x", "source": "pip"})


def test_hub_id_without_network_fails_fast_once_with_what_to_do(tmp_path):
    """No network (the hub endpoint is a closed loopback port) and an empty cache: one clear line in
    seconds, not transformers' retries (~50 s) and a hint to allow downloads that were allowed."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "benchmarks.run", "model=llava-1.5-7b", "budgets=[null]",
                          f"results_dir={tmp_path / 'r'}", "hydra.run.dir=" + str(tmp_path / "h")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    elapsed = time.monotonic() - t0
    assert run.returncode != 0
    lines = [ln for ln in run.stderr.splitlines() if "cannot reach the Hugging Face hub" in ln]
    assert len(lines) == 1, run.stderr[-3000:]
    assert "llava-hf/llava-1.5-7b-hf" in lines[0] and "model.path=<checkpoint folder>" in lines[0]
    assert "local_files_only=false" not in run.stderr
    assert elapsed < 30, elapsed


def test_every_registered_method_has_a_config_with_its_defaults():
    """`method=<name>` composes for every registered pruner (ConfigStore, no YAML to keep in step)."""
    from benchmarks.method_configs import register_method_configs
    from pruners import available_pruners, get_pruner_class

    register_method_configs()  # also the test-only pruners other test modules registered since import
    for name in available_pruners():
        cfg = _cfg([f"method={name}"])
        assert cfg.method.name == name
        params = runner.method_params(cfg.method)
        if (CONF / "method" / f"{name}.yaml").exists():  # a shipped setting (dyvte's routers, gsearch's schedule)
            assert set(params) <= set(get_pruner_class(name).parameters), name
            get_pruner_class(name)(budget=None, **params)  # accepted as given
        else:
            assert params == get_pruner_class(name).defaults


def test_method_configs_cli_help_and_show():
    run = subprocess.run([sys.executable, "-m", "benchmarks.method_configs", "--help"], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0 and "usage: python -m benchmarks.method_configs" in run.stdout
    before = sorted(p.name for p in (CONF / "method").iterdir())
    run = subprocess.run([sys.executable, "-m", "benchmarks.method_configs", "show", "fastv"], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0
    from pruners import get_pruner_class

    assert yaml.safe_load(run.stdout) == {"name": "fastv", "params": get_pruner_class("fastv").defaults}
    assert sorted(p.name for p in (CONF / "method").iterdir()) == before  # --help and show write nothing


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
    # a method whose default chooses its count without a budget and takes one when given (prumerge's
    # mode=auto) runs both in one sweep: `make sweep` needs no per-method budgets
    both = _run(tmp_path, "method=prumerge", "budgets=[9,auto]", "n_samples=2")
    by_budget = {store.read_metrics(p)["budget"]: p for p in both}
    assert sorted(by_budget, key=str) == [9, "auto"]
    assert all(r["relevant_recall"] is None for r in _rows(by_budget[9]))  # only merged tokens reach the LLM
    with pytest.raises(ValueError, match=r"budgets: 'most' is not a positive int, a fraction in \(0, 1\), null or 'auto'"):
        runner.validate_budgets(["most"], N_VIS, "tiny")


# ---- LLaVA-NeXT (anyres) end to end on the tiny NeXT model --------------------------------------
TINY_NEXT = ["model=tiny-next", *TINY[1:]]
NEXT_IN = [88, 52, 88]  # visual tokens per sample: 192 px squares pack into 88, the squeezed one into 52


@pytest.fixture
def next_shapes(monkeypatch):
    """The shapes task with its second sample squeezed to 96 x 192 px (h x w): a 1 x 2 crop grid, 16 + 4 x 9
    = 52 tokens, so a batch is ragged. Squeezing keeps each object at the same fraction of the image,
    so the task's relevant patches (computed from the scene) still hold."""
    import dataclasses

    from benchmarks.tasks import get_task

    task = get_task("shapes")
    orig = task.samples

    def samples(*args, **kwargs):
        out = list(orig(*args, **kwargs))
        if len(out) > 1:
            out[1] = dataclasses.replace(out[1], image=out[1].image.resize((192, 96)))  # PIL: (w, h)
        return out

    monkeypatch.setattr(task, "samples", samples)
    return task


def _run_next(tmp_path, *extra: str):
    return runner.run(_cfg([*TINY_NEXT, f"results_dir={tmp_path}", *extra]))


def _rows(cell: Path) -> list[dict]:
    return [json.loads(line) for line in (cell / "predictions.jsonl").read_text().splitlines()]


def test_tiny_next_sweep_counts_each_image(tmp_path, next_shapes):
    """none / random / fastv on 3 samples of the tiny LLaVA-NeXT: per-sample visual tokens, kept counts,
    FLOPs (every tile through the ViT) and recall, the leaderboard rows, and clear budget errors."""
    from benchmarks.flops import prefill_flops, reference_counts
    from mllm_adapters.handle import TokenCounts
    from mllm_adapters.tiny import build_tiny_llava_next

    cells = {}
    for method in ("none", "random", "fastv"):
        for p in _run_next(tmp_path, f"method={method}", "budgets=[null,40,60]", "n_samples=3"):
            cells[(p.parts[-2], store.read_metrics(p)["budget"])] = p
    assert sorted(cells, key=str) == sorted([("none", None), ("random", 40), ("random", 60), ("fastv", 40),
                                             ("fastv", 60)], key=str)
    ref = store.read_metrics(cells[("none", None)])
    assert ref["model"] == "tiny-next" and ref["flops_rel"] == pytest.approx(1.0)
    assert ref["visual_tokens_in"] == pytest.approx(sum(NEXT_IN) / 3) and ref["within_budget"] is None
    assert ref["relevant_recall"] == pytest.approx(1.0) and ref["equiv_tokens"] == pytest.approx(sum(NEXT_IN) / 3)
    ref_rows = _rows(cells[("none", None)])
    assert [r["visual_in"] for r in ref_rows] == NEXT_IN and [r["n_kept"] for r in ref_rows] == NEXT_IN
    assert [r["kept"] for r in ref_rows] == [[list(range(n))] for n in NEXT_IN]  # positions, per image
    # Each row's FLOPs are its own image's: tiles through the ViT, its packed run in the LLM.
    model, processor = build_tiny_llava_next()
    samples = next_shapes.samples(split="eval", n=3, seed=0)
    for r, s, tiles, n_in in zip(ref_rows, samples, [5, 3, 5], NEXT_IN):
        enc = processor(images=[s.image], text=[f"USER: <image>\n{s.question} ASSISTANT:"], return_tensors="pt")
        n_text = int(enc["attention_mask"].sum()) - n_in
        want = prefill_flops(model.config, n_text, reference_counts(model.config, TokenCounts(views=tiles, visual_in=n_in)))
        assert r["tflops_prefill"] == pytest.approx(want.total / 1e12)
    for method, budget in ((m, b) for m in ("random", "fastv") for b in (40, 60)):
        m = store.read_metrics(cells[(method, budget)])
        rows = _rows(cells[(method, budget)])
        # An image with no more tokens than the budget reaches the LLM whole (the adapter's rule).
        assert [r["n_kept"] for r in rows] == [min(budget, n) for n in NEXT_IN], (method, budget)
        assert [len(r["kept"][0]) for r in rows] == [min(budget, n) for n in NEXT_IN], (method, budget)
        assert m["within_budget"] == pytest.approx(sum(n <= budget for n in NEXT_IN) / 3)
        assert m["visual_tokens_in"] == pytest.approx(sum(NEXT_IN) / 3)
        assert 0 <= m["relevant_recall"] <= 1 and 0 < m["flops_rel"] < 1
        kept_mean = sum(min(budget, n) for n in NEXT_IN) / 3
        if method == "random":  # pre-LLM: every decoder layer sees the kept tokens
            assert m["llm_visual_tokens_per_layer"] == pytest.approx([kept_mean] * 4)
            assert m["equiv_tokens"] == pytest.approx(kept_mean)
        else:  # FastV at K=2: two layers see each image's whole run
            assert m["llm_visual_tokens_per_layer"] == pytest.approx([sum(NEXT_IN) / 3] * 2 + [kept_mean] * 2)
    assert store.read_metrics(cells[("random", 40)])["flops_rel"] < store.read_metrics(cells[("random", 60)])["flops_rel"]
    board = lb.leaderboard(tmp_path)
    assert len(board) == 5 and set(board["model"]) == {"tiny-next"} and board["config_hash"].is_unique
    assert board["method"].tolist() == ["fastv", "fastv", "none", "random", "random"]
    assert board["budget"].tolist()[:2] == [60, 40] and pd.isna(board["budget"][2])
    assert board["visual_tokens_in"].tolist() == pytest.approx([sum(NEXT_IN) / 3] * 5)
    assert board.loc[board["method"] == "none", "flops_rel"].item() == pytest.approx(1.0)
    assert (board.loc[board["method"] != "none", "flops_rel"] < 1).all()
    # Budgets are checked against the longest run any image can have (88 here).
    with pytest.raises(ValueError, match=r"budgets: 89 is above the 88 visual tokens of the longest image run"):
        _run_next(tmp_path, "method=random", "budgets=[null,89]", "n_samples=3")


def test_tiny_next_flowcut_cell_flops_match_the_flop_counter(tmp_path, next_shapes):
    """A FlowCut cell on the tiny LLaVA-NeXT: each row's prefill FLOPs (its tiles' own ViT counts, pruner
    overhead included; batch_size=1 so the overhead is the row's own) equal FlopCounterMode on a real
    forward of that sample. Budget 45 splits evenly over each image's tiles (5 x 9 of 80 view patches,
    3 x 15 of 48), so no tile is padded and the count is exact."""
    from torch.utils.flop_counter import FlopCounterMode

    from mllm_adapters import apply_pruner
    from mllm_adapters.tiny import build_tiny_llava_next

    (cell,) = [p for p in _run_next(tmp_path, "method=flowcut", "budgets=[45]", "n_samples=3", "batch_size=1")]
    rows = _rows(cell)
    assert [r["n_kept"] for r in rows] == [45, 45, 45] and [r["visual_in"] for r in rows] == NEXT_IN
    assert [len(r["kept"][0]) for r in rows] == [45, 45, 45]
    m = store.read_metrics(cell)
    assert 0 < m["flops_rel"] < 1 and m["vision_tflops"] > 0 and m["overhead_tflops"] > 0
    model, processor = build_tiny_llava_next()
    samples = next_shapes.samples(split="eval", n=3, seed=0)
    for r, s in zip(rows, samples):
        enc = processor(images=[s.image], text=[f"USER: <image>\n{s.question} ASSISTANT:"], return_tensors="pt")
        with apply_pruner(model, "flowcut", budget=45) as h, torch.inference_mode():
            h.count_overhead_flops = True
            with FlopCounterMode(display=False) as counter:
                model(**enc, logits_to_keep=1)
        assert r["tflops_prefill"] * 1e12 == pytest.approx(counter.get_total_flops(), rel=1e-9)


# ---- Qwen2-VL / Qwen2.5-VL end to end on the tiny models ------------------------------------------
QWEN_IN = [36, 32, 36]  # merged units per sample: 192 px squares -> 96 x 96 px = 6 x 6 units; the squeezed one 64 x 128 px = 4 x 8


@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_tiny_qwen_sweep_counts_each_image(tmp_path, next_shapes, model):
    """none / random / fastv on 3 samples (one squeezed to 96 x 192 px: a ragged batch) of the tiny Qwen
    models: per-sample units, kept counts, FLOPs equal to the spec's (the tower in full, the merger on
    what reaches the LLM), recall on each image's own unit grid."""
    cells = {}
    for method in ("none", "random", "fastv"):
        for p in runner.run(_cfg([f"model={model}", *TINY[1:], f"results_dir={tmp_path}", f"method={method}",
                                  "budgets=[null,8,20]", "n_samples=3"])):
            cells[(p.parts[-2], store.read_metrics(p)["budget"])] = p
    assert set(cells) == {("none", None), ("random", 8), ("random", 20), ("fastv", 8), ("fastv", 20)}
    ref_rows = _rows(cells[("none", None)])
    assert [r["visual_in"] for r in ref_rows] == QWEN_IN and [r["n_kept"] for r in ref_rows] == QWEN_IN
    assert [r["kept"] for r in ref_rows] == [[list(range(n))] for n in QWEN_IN]
    assert all(r["relevant_recall"] in (None, 1.0) for r in ref_rows)
    for method, budget in ((m, b) for m in ("random", "fastv") for b in (8, 20)):
        rows = _rows(cells[(method, budget)])
        assert [r["n_kept"] for r in rows] == [min(budget, n) for n in QWEN_IN], (method, budget)
        assert [len(r["kept"][0]) for r in rows] == [min(budget, n) for n in QWEN_IN]
        m = store.read_metrics(cells[(method, budget)])
        assert 0 < m["flops_rel"] < 1.0
        assert m["image_processor"]["size"] == {"longest_edge": 96 * 96, "shortest_edge": 32 * 32}  # its pixels
        assert all(r["relevant_recall"] is None or 0.0 <= r["relevant_recall"] <= 1.0 for r in rows)
        # each row's FLOPs are its own image's: fewer units reaching the LLM cost less than unpruned
        assert all(r["tflops_prefill"] < ref["tflops_prefill"] for r, ref, n in zip(rows, ref_rows, QWEN_IN)
                   if min(budget, n) < n)
