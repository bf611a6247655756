"""lmms-eval tasks in prunebench's runner (``task=lmms task.names=[...]``): the offline export of the
shapes task run as an lmms task gives exactly the native shapes cell's predictions and accuracy, and
tasks the runner cannot score offline are refused before the model loads."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from benchmarks import run as runner
from benchmarks import store
from benchmarks.lmms.export_shapes import export

from .test_run import CONF

EMBEDDED = ["model=embedded", "batch_size=8", "latency.n_samples=1", "latency.warmup=0", "latency.decode_tokens=2",
            "progress=false", "diagnostics=false", "method=fastv", "budgets=[null,36]", "n_samples=24"]


def _run(tmp_path, *extra: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*EMBEDDED, f"results_dir={tmp_path / 'results'}", *extra])
    return runner.run(cfg)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_exported_shapes_as_an_lmms_task_equals_the_native_cell(tmp_path):
    export(tmp_path / "lmms", "shapes", n=24)
    native = _run(tmp_path, "task=shapes")
    lmms = _run(tmp_path, "task=lmms", "task.names=[prunebench_shapes]", f"task.include_path={tmp_path / 'lmms'}")
    assert all("lmms-prunebench_shapes" in p.parts for p in lmms)  # its own task in the results
    for a, b in zip(native, lmms, strict=True):
        ma, mb = store.read_metrics(a), store.read_metrics(b)
        assert ma["accuracy"] == mb["accuracy"] and ma["tflops_prefill"] == pytest.approx(mb["tflops_prefill"])
        ra, rb = store.read_predictions(a), store.read_predictions(b)
        assert [r["prediction"] for r in ra] == [r["prediction"] for r in rb]
        assert [r["kept"] for r in ra] == [r["kept"] for r in rb]
        assert mb["task_metrics"] == {"exact_match": pytest.approx(mb["accuracy"])}  # lmms-eval's own aggregation
    # the cells record the lmms task and are reused on a rerun
    again = _run(tmp_path, "task=lmms", "task.names=[prunebench_shapes]", f"task.include_path={tmp_path / 'lmms'}")
    assert again == lmms
    cfg = (lmms[1] / store.CONFIG).read_text()
    assert "lmms-prunebench_shapes" in cfg and "include_path" in cfg


@pytest.mark.parametrize("names, match", [
    ("[]", "needs task.names"),
    ("[no_such_task_xyz]", "is not an lmms-eval task"),
    ("[mmvet]", "API judge"),
    ("[pope_full]", "group"),
    ("[pope]", "offline"),
])
def test_tasks_that_cannot_run_offline_are_refused_early(tmp_path, names, match):
    with pytest.raises(ValueError, match=match):
        _run(tmp_path, "task=lmms", f"task.names={names}")
    assert not (tmp_path / "results" / "cells").exists()  # refused before any cell


def test_pope_task_metrics_in_the_cell(tmp_path):
    (ref, pruned) = _run(tmp_path, "task=shapes_pope", "n_samples=12")
    m = json.loads((pruned / store.METRICS).read_text())
    assert set(m["task_metrics"]) == {"random", "popular", "adversarial", "all"}
    assert m["task_metrics"]["all"]["accuracy"] == pytest.approx(m["accuracy"])
    assert {"precision", "recall", "f1", "yes_ratio"} <= set(m["task_metrics"]["all"])


@pytest.mark.parametrize("method", ["fastv", "divprune"])
def test_multi_image_documents_give_the_model_every_image(tmp_path, method):
    """An lmms task whose documents hold two images (`export(..., images_per_doc=2)`): each sample's prompt
    holds both, ``kept`` has one entry per image, and the predictions equal direct generation on the two
    images with the same pruner, one sample at a time (in-LLM fastv ranks both images' tokens together;
    divprune prunes each image)."""
    import torch

    from benchmarks.models import load_model
    from benchmarks.tasks.lmms import LmmsTask
    from mllm_adapters import apply_pruner

    export(tmp_path / "lmms", "shapes", n=8, images_per_doc=2)
    task = ["task=lmms", "task.names=[prunebench_shapes_2img]", f"task.include_path={tmp_path / 'lmms'}"]
    ref, pruned = _run(tmp_path, *task, f"method={method}", "n_samples=8")
    rows = store.read_predictions(pruned)
    assert len(rows) == 8 and all(len(r["kept"]) == 2 and r["n_kept"] <= 2 * 36 for r in rows)
    assert all(r["visual_in"] == 2 * 144 for r in store.read_predictions(ref))  # both images reach the LLM
    samples = {s.id: s for s in LmmsTask("prunebench_shapes_2img", str(tmp_path / "lmms")).samples(n=8)}
    assert all(len(s.images) == 2 for s in samples.values())
    lm = load_model({"name": "embedded", "source": "embedded", "path": None, "dtype": "float32",
                     "attn_implementation": "sdpa", "prompt_template": None})
    tok = lm.processor.tokenizer
    with apply_pruner(lm.model, method, budget=36, tokenizer=tok) as h:
        for r in rows:
            s = samples[r["id"]]
            x = lm.processor(images=s.images, text=[lm.prompt(s.question, 2)], return_tensors="pt")
            with torch.inference_mode():
                out = lm.model.generate(**x, max_new_tokens=2, do_sample=False)
            pred = tok.batch_decode(out[:, x["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
            assert pred == r["prediction"]
            assert [k.tolist() for k in h.kept_indices] == r["kept"]
