"""Batch throughput of the runner's evaluation loop on the embedded model (``--parts batch``).

The model loads as the runner loads it (`benchmarks.models.load_model` on ``conf/model/<model>.yaml``),
the pruner is attached as `benchmarks.run.run_cell` attaches it, and each batch of the ``shapes``
task's eval samples goes through the runner's own input building (`benchmarks.run._inputs`: the
processor on the batch, ``padding=True``) and ``model.generate(..., max_new_tokens=task.max_new_tokens,
do_sample=False)``. Per method and batch size, over ``repeats`` passes over the same ``n_samples``
(interleaved: every pass runs every configuration, in a rotated order, so load from other processes on
a shared machine hits all of them alike), medians of:

- ``samples_per_s`` (wall clock) and ``samples_per_cpu_s`` (process CPU time, robust to other
  processes on the cores) of the whole loop (inputs + generate + decode);
- the split: ``inputs_ms`` (processor / input building) and ``generate_ms`` per sample, wall;
- ``pad_fraction``: padded positions / all positions of the batches' ``input_ids`` (zero at batch 1);
- ``sys_ms`` (system CPU time) and ``page_faults`` (minor faults) per sample: the cost of glibc handing
  large activation buffers back to the OS and faulting them in again (see `tune_malloc`);
- ``same_predictions_as_smallest``: every sample's prediction equals its prediction at the smallest
  batch size.

``predictions`` (per method and batch size, in sample order) are returned too, so a caller can check
that batching does not change a sample's answer.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.allocator import tune_malloc
from benchmarks.perf.table import print_table

CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"

def _model_cfg(model: str, attn_implementation: str | None) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(CONF_MODEL / f"{model}.yaml"), resolve=True)
    assert isinstance(cfg, dict)
    if attn_implementation is not None:
        cfg["attn_implementation"] = attn_implementation
    return cfg


def _one_pass(lm: Any, samples: list[Any], batch_size: int, max_new_tokens: int) -> dict[str, Any]:
    """One pass of the runner's loop over ``samples`` in batches of ``batch_size``: times and predictions."""
    from benchmarks.run import _batches, _inputs

    model, tok = lm.model, lm.processor.tokenizer
    t_in = t_gen = 0.0
    padded = total = 0
    preds: list[str] = []
    r0 = _rusage()
    w0, c0 = time.perf_counter(), time.process_time()
    for batch in _batches(samples, batch_size):
        t0 = time.perf_counter()
        enc = _inputs(lm, batch)
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        t2 = time.perf_counter()
        preds += [p.strip() for p in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
        t_in, t_gen = t_in + (t1 - t0), t_gen + (t2 - t1)
        mask = enc["attention_mask"]
        total += mask.numel()
        padded += int(mask.numel() - mask.sum())
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    r1 = _rusage()
    return {"wall": wall, "cpu": cpu, "inputs": t_in, "generate": t_gen, "padded": padded, "total": total,
            "sys": r1[0] - r0[0], "faults": r1[1] - r0[1], "predictions": preds}


def _rusage() -> tuple[float, int]:
    """(system CPU seconds, minor page faults) of this process so far; zeros where unavailable."""
    try:
        import resource
    except ImportError:  # not Unix
        return 0.0, 0
    r = resource.getrusage(resource.RUSAGE_SELF)
    return float(r.ru_stime), int(r.ru_minflt)


def batch_perf(
    batch_sizes: tuple[int, ...] = (1, 4, 16),
    n_samples: int = 64,
    methods: tuple[str, ...] = ("none", "fastv"),
    budget: int = 36,
    repeats: int = 3,
    warmup: int = 1,
    model: str = "embedded",
    attn_implementation: str | None = None,
    threads: int | None = None,
    malloc_tuned: bool = False,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Samples per second of the runner's generate loop at each batch size (see the module docstring).

    ``methods``: pruners to attach (``none`` = unpruned, budget null; the others at ``budget`` visual
    tokens per image). ``attn_implementation``: overrides the model config's (None: the config's).
    ``threads``: torch CPU threads (None: leave as set, e.g. by ``python -m benchmarks.perf --threads``).
    ``warmup`` untimed passes per configuration precede the ``repeats`` timed ones. ``malloc_tuned``:
    call `tune_malloc` first (process-wide; compare runs in separate processes).
    Returns ``{"rows": [...], "predictions": {method: {batch_size: [str, ...]}}, ...}``; one row per
    method and batch size.
    """
    from benchmarks.models import load_model
    from benchmarks.tasks import get_task
    from mllm_adapters import apply_pruner

    if threads is not None:
        torch.set_num_threads(int(threads))
    tuned = tune_malloc() if malloc_tuned else False
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes}")
    mcfg = _model_cfg(model, attn_implementation)
    lm = load_model(mcfg, "cpu")
    task = get_task("shapes")
    samples = task.samples(split="eval", n=int(n_samples), seed=seed)
    tok = lm.processor.tokenizer
    configs = [(m, b) for m in methods for b in batch_sizes]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {c: [] for c in configs}
    preds: dict[str, dict[int, list[str]]] = {m: {} for m in methods}

    def run(method: str, bs: int) -> dict[str, Any]:
        handle = apply_pruner(lm.model, method, budget=None if method == "none" else budget, seed=seed,
                              tokenizer=tok)
        try:
            return _one_pass(lm, samples, bs, int(task.max_new_tokens))
        finally:
            handle.remove()

    for m, b in configs:
        for _ in range(warmup):
            run(m, b)
    for r in range(repeats):
        k = r % len(configs)
        for m, b in configs[k:] + configs[:k]:  # rotated: no configuration always runs first or last
            res = run(m, b)
            runs[(m, b)].append(res)
            preds[m].setdefault(b, res["predictions"])
    n = len(samples)
    rows = []
    for m, b in configs:
        rs = runs[(m, b)]
        med = {k: statistics.median(x[k] for x in rs) for k in ("wall", "cpu", "inputs", "generate", "sys", "faults")}
        rows.append({
            "method": m, "budget": None if m == "none" else budget, "batch_size": b, "n_samples": n,
            "samples_per_s": n / med["wall"], "samples_per_cpu_s": n / med["cpu"],
            "inputs_ms": 1e3 * med["inputs"] / n, "generate_ms": 1e3 * med["generate"] / n,
            "inputs_share": med["inputs"] / med["wall"],
            "sys_ms": 1e3 * med["sys"] / n, "page_faults": med["faults"] / n,
            "pad_fraction": rs[0]["padded"] / rs[0]["total"] if rs[0]["total"] else 0.0,
            "same_predictions_as_smallest": (preds[m][b] == preds[m][min(batch_sizes)]),
        })
    for m in methods:  # throughput relative to the smallest batch size, per CPU second
        base = next(r for r in rows if r["method"] == m and r["batch_size"] == min(batch_sizes))
        for r in rows:
            if r["method"] == m:
                r["cpu_speedup_vs_smallest"] = r["samples_per_cpu_s"] / base["samples_per_cpu_s"]
    result = {
        "model": model, "attn_implementation": lm.model.config.text_config._attn_implementation,
        "threads": torch.get_num_threads(), "malloc_tuned": tuned, "n_samples": n, "repeats": repeats, "budget": budget,
        "batch_sizes": list(batch_sizes), "methods": list(methods), "rows": rows, "predictions": preds,
    }
    if verbose:
        print(f"## batch throughput: {model} (attention {result['attn_implementation']}), shapes task, "
              f"{n} samples, generate max_new_tokens={task.max_new_tokens}, {result['threads']} thread(s), "
              f"malloc tuned: {tuned}, medians of {repeats}\n")
        print_table(rows, ["method", "budget", "batch_size", "samples_per_s", "samples_per_cpu_s",
                           "cpu_speedup_vs_smallest", "inputs_ms", "generate_ms", "inputs_share", "sys_ms",
                           "page_faults", "pad_fraction",
                           "same_predictions_as_smallest"])
    return result
