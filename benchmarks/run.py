"""Benchmark runner: ``python -m benchmarks.run method=fastv model=embedded task=shapes budgets=[null,72,36,18]``.

Runs the cells model x task x method x budget of one Hydra job (``--multirun`` sweeps methods,
models, tasks). Each cell evaluates accuracy on ``n_samples`` batch-evaluated samples, computes
prefill FLOPs from the model config and the token counts the pruner actually produced
(`benchmarks.flops`), measures latency / KV bytes / peak memory on a few single samples
(`benchmarks.metrics`), and writes ``metrics.json``, ``predictions.jsonl`` and its resolved
``config.yaml`` atomically (`benchmarks.store`). Cells already finished (same resolved-config hash)
are skipped, so a killed sweep resumes where it stopped.

``budget=null`` is the unpruned reference: it is stored once per (model, task, samples, seed) as
method ``none``, whatever method asked for it, and every method's ``accuracy_rel`` refers to it.

LLaVA-NeXT (anyres): an image's visual-token count depends on its size, so every per-sample figure
(kept tokens, ``equiv_tokens``, FLOPs, recall) uses that sample's own counts. Budgets are validated
against the longest run any image can have (`LoadedModel.num_visual_tokens`); an image whose own run
is within the budget reaches the LLM whole, as the adapter does (``within_budget`` reports the
fraction of such samples).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from benchmarks import store
from benchmarks.flops import sample_cost
from benchmarks.intervals import paired_bootstrap, paired_scores, ratio_of_means, wilson_interval
from benchmarks.launch import watch_sweep_parent
from benchmarks.method_configs import register_method_configs
from benchmarks.models import LoadedModel, load_model, peek_config, size_dependent, visual_tokens_of
from benchmarks.settings import check_settings

log = logging.getLogger("prunebench.run")

#: Run-level settings that do not change a cell's results and so stay out of its hash.
UNHASHED = ("results_dir", "progress", "device", "num_threads", "leaderboard")

_MODEL_CACHE: dict[str, LoadedModel] = {}
_PINNED_GPU: str | None = None


# ---- configuration ----------------------------------------------------------------------------
def method_params(method_cfg: Any) -> dict[str, Any]:
    """The method's parameters as a plain dict (``method.params`` in the config)."""
    params = method_cfg.get("params") if method_cfg is not None else None
    return dict(OmegaConf.to_container(params, resolve=True)) if isinstance(params, DictConfig) else dict(params or {})


#: Budget value for methods that choose their own token count (e.g. ``recoverable`` with mode=adaptive):
#: the pruner gets ``budget=None`` but, unlike ``null``, the cell is that method's, not the reference.
AUTO = "auto"


def _image_budget(budget: int | float, n_tokens: int) -> int:
    """An image's own budget: an int as given, a fraction of its ``n_tokens`` (`pruners.base.resolve_budget`)."""
    from pruners.base import resolve_budget

    return resolve_budget(budget, n_tokens) if isinstance(budget, float) else int(budget)


def validate_budgets(budgets: Any, n_visual: int, model_name: str,
                     size_dependent: bool = False) -> list[int | float | str | None]:
    """Budgets as a de-duplicated list with ``None`` (the reference) first, then ``"auto"``, then the
    fractions (a float in (0, 1): that share of each image's own visual tokens, rounded half up, at
    least 1), then the token counts; clear errors otherwise.

    ``n_visual`` is the model's visual tokens per image; with ``size_dependent`` (the family's count
    depends on the image's size, LLaVA-NeXT) the longest run any image can have: a budget up to it is accepted, and an image with fewer tokens reaches the LLM whole.
    """
    if budgets is None:
        budgets = [None]
    if isinstance(budgets, (int, str)) or not hasattr(budgets, "__iter__"):
        budgets = [budgets]
    out: list[int | None] = []
    for b in budgets:
        if b is None or (isinstance(b, str) and b.lower() in ("null", "none")):
            b = None
        elif isinstance(b, str) and b.lower() == AUTO:
            b = AUTO
        elif isinstance(b, float) and 0.0 < b < 1.0:
            pass  # a fraction of each image's tokens
        elif isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise ValueError(
                f"budgets: {b!r} is not a positive int, a fraction in (0, 1), null or {AUTO!r}; accepted: null "
                f"(unpruned), {AUTO!r} (the method chooses its token count), 1..{n_visual} tokens per image or a "
                f"fraction 0 < f < 1 of each image's tokens"
            )
        elif b > n_visual and size_dependent:
            raise ValueError(
                f"budgets: {b} is above the {n_visual} visual tokens of the longest image run model "
                f"{model_name!r} can have (an image's count depends on its size, and an image with "
                f"no more tokens than the budget reaches the LLM whole); accepted: null (unpruned) or 1..{n_visual}"
            )
        elif b > n_visual:
            raise ValueError(
                f"budgets: {b} is above the {n_visual} visual tokens per image of model {model_name!r}; "
                f"accepted: null (unpruned) or 1..{n_visual}"
            )
        if b not in out:
            out.append(b)
    return sorted(out, key=lambda x: (-2, 0) if x is None else ((-1, 0) if x == AUTO else
                                                                 ((0, x) if isinstance(x, float) else (1, x))))


def variant_label(method_cfg: Any, method: str, params: dict[str, Any], defaults: dict[str, Any]) -> str:
    """The method *variant* a cell belongs to (a column of every table; plot lines never mix variants).

    In order: ``method.variant`` if the config sets it; the name of the config Hydra composed for
    the ``method`` group when it is not the method's own (``vflowopt_tuned_eq36``); else the method
    name plus every non-default parameter, ``fastv[layer=3]``.
    """
    explicit = method_cfg.get("variant") if method_cfg is not None else None
    if explicit:
        return str(explicit)
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get("method")
    except Exception:  # noqa: BLE001 - not composed by a Hydra app (tests, the API)
        choice = None
    if choice and choice != method:
        return str(choice)
    changed = {k: v for k, v in sorted(params.items()) if k not in defaults or defaults[k] != v}
    return method if not changed else f"{method}[{','.join(f'{k}={v}' for k, v in changed.items())}]"


def code_identity(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """What code computed a cell: the method's declared ``version``, the adapters' ``ENGINE_VERSION``
    and the locked environment's digest, plus the digests of files the method reads with these
    ``params`` (`Pruner.content_identity`, e.g. dyvte's router weights, as ``files``). Part of the cell
    hash: a behaviour change, an adapter change, an upgrade (`make lock`) or retrained files under the
    same path never reuse old cells."""
    from benchmarks.lockfile import lock_digest
    from mllm_adapters import ENGINE_VERSION
    from pruners import get_pruner_class

    cls = get_pruner_class(method)
    out: dict[str, Any] = {"method_version": int(cls.version), "engine_version": ENGINE_VERSION,
                           "lock": lock_digest()}
    files = cls(budget=None, **(params or {})).content_identity() if params is not None else {}
    if files:
        out["files"] = dict(files)
    return out


def cell_config(
    cfg: DictConfig, budget: int | str | None, method: str, params: dict[str, Any], weights: str | None = None,
    variant: str | None = None, method_seed: int | None = None,
) -> dict[str, Any]:
    """The resolved config of one cell (what its hash covers and what ``config.yaml`` records).
    ``weights``: the loaded model's weights fingerprint (`LoadedModel.weights`), recorded as
    ``model.weights`` so that new weights under the same model name get new cells. ``variant`` (default:
    the method name) and ``method_seed`` (the pruner's seed, default ``seed``) join ``method``; ``code``
    is `code_identity`. The reference cell (budget null) is method ``none`` whatever was asked."""
    base = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(base, dict)
    if weights is not None:
        base["model"]["weights"] = weights
    for key in UNHASHED:
        base.pop(key, None)
    base.pop("budgets", None)
    base.pop("seeds", None)
    base.pop("hydra", None)
    if budget is None:
        method, params, variant, method_seed = "none", {}, None, None
    seed = int(base["seed"]) if method_seed is None else int(method_seed)
    base["method"] = {"name": method, "params": params, "variant": variant or method, "seed": seed}
    base["code"] = code_identity(method, params)
    base["budget"] = budget
    # the diagnostics recorded (docs/benchmarks.md "Diagnostics"): with their version, so cells computed
    # without them (or by an older recorder) are recomputed rather than reused without these fields
    base["diagnostics"] = diagnostics_identity(bool(base.get("diagnostics")))
    return base


def diagnostics_identity(enabled: bool) -> dict[str, Any] | bool:
    """What a cell's config records of the diagnostics: False when off, else their version and the sink
    threshold (`mllm_adapters.engine.diagnostics`)."""
    if not enabled:
        return False
    from mllm_adapters.engine.diagnostics import DIAGNOSTICS_VERSION, SINK_TAU

    return {"version": DIAGNOSTICS_VERSION, "sink_tau": SINK_TAU}


# ---- devices ----------------------------------------------------------------------------------
def _gpu_count_without_init() -> int:
    """Visible GPUs, counted through NVML when possible so CUDA_VISIBLE_DEVICES can still be set."""
    try:
        n = int(torch.cuda._device_count_nvml())
        if n >= 0:
            return n
    except Exception:  # noqa: BLE001 - NVML missing or unusable: fall back to the CUDA runtime
        pass
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: str, job_num: int | None = None) -> str:
    """``auto`` -> a GPU if any (job ``i`` of a parallel sweep pinned to GPU ``i mod n``), else ``cpu``.

    Pinning sets CUDA_VISIBLE_DEVICES to the chosen GPU when CUDA is not initialised yet in this
    process (a fresh joblib worker); a worker that already pinned itself keeps its GPU.
    """
    global _PINNED_GPU
    device = str(device)
    if device == "cpu":
        return "cpu"
    if device != "auto" and not device.startswith("cuda"):
        raise ValueError(f"device={device!r} is not supported; accepted: auto, cpu, cuda, cuda:N")
    if _PINNED_GPU is not None:
        return "cuda:0"
    n = _gpu_count_without_init()
    if n == 0:
        if device == "auto":
            return "cpu"
        raise ValueError(f"device={device!r} but no CUDA GPU is visible; accepted here: auto or cpu")
    if device in ("auto", "cuda") and job_num is not None and n > 1:
        gpu = job_num % n
        if not torch.cuda.is_initialized():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [s for s in visible.split(",") if s.strip()] if visible else [str(i) for i in range(n)]
            _PINNED_GPU = ids[gpu]
            os.environ["CUDA_VISIBLE_DEVICES"] = _PINNED_GPU
            log.info("job %d pinned to GPU %s (CUDA_VISIBLE_DEVICES)", job_num, _PINNED_GPU)
            return "cuda:0"
        return f"cuda:{gpu}"
    return "cuda" if device == "auto" else device


def _job_num() -> int | None:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return int(hc.job.num) if hc.mode == RunMode.MULTIRUN else None
    except Exception:  # noqa: BLE001 - not running under Hydra
        return None


def get_model(model_cfg: Any, device: str) -> LoadedModel:
    """Load (once per process and config) the model of ``model_cfg``."""
    container = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else model_cfg
    key = json.dumps([container, device], sort_keys=True, default=str)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_model(container, device)
    return _MODEL_CACHE[key]


# ---- one cell ---------------------------------------------------------------------------------
def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _inputs(lm: LoadedModel, samples: list[Any]) -> dict[str, torch.Tensor]:
    proc = lm.processor
    enc = proc(
        images=[im.convert("RGB") for s in samples for im in s.images],  # every image of each sample, in order
        text=[lm.prompt(s.question, len(s.images)) for s in samples],
        padding=True,
        return_tensors="pt",
    )
    enc = {k: v.to(lm.device) for k, v in enc.items()}
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(lm.model.dtype)
    return enc


def _shape_key(enc: dict[str, torch.Tensor], batch: list[Any]) -> tuple:
    """What a batch's pruner FLOPs depend on besides its content: its tensors' shapes and its images' sizes
    (LLaVA-NeXT's tiles and Qwen's grids follow them). Batches with equal keys share one FLOP count."""
    return (tuple((k, tuple(v.shape)) for k, v in sorted(enc.items())),
            tuple(tuple((im.height, im.width) for im in s.images) for s in batch))


def run_cell(
    lm: LoadedModel, task: Any, samples: list[Any], ccfg: dict[str, Any], progress: bool = True
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate one cell; returns (metrics, prediction rows). Does not write anything.

    The pruner's own FLOPs (``overhead``) are counted with ``FlopCounterMode`` on the first batch of each
    input shape (`_shape_key`) only, and that batch's per-sample count is used for every batch of that
    shape: counting every batch cost about 45% of a SparseVLM cell's CPU time (docs/flops.md "Pruner overhead").
    ``overhead_flops_from`` in the metrics says how many batches and samples were counted.
    """
    from benchmarks.metrics import attention_summary, diagnostics_row, measure_runtime, relevant_recall
    from mllm_adapters import apply_pruner

    method, params, budget = ccfg["method"]["name"], ccfg["method"]["params"], ccfg["budget"]
    model, tok = lm.model, lm.processor.tokenizer
    cfg_model = model.config
    n_layers = int(cfg_model.text_config.num_hidden_layers)
    image_token_id = int(cfg_model.image_token_id)
    t0 = time.perf_counter()
    handle = apply_pruner(model, method, budget=None if budget == AUTO else budget,
                          seed=int(ccfg["method"]["seed"]), tokenizer=tok, **params)
    diag_cfg = ccfg.get("diagnostics")
    if diag_cfg:  # observes the prefill only (the same outputs); off again for the runtime measurement
        handle.record_diagnostics = True
        handle.sink_tau = float(diag_cfg.get("sink_tau", handle.sink_tau))
        handle.diagnostics_sinks = budget is None  # sinks are found in the unpruned reference only
    rows: list[dict[str, Any]] = []
    flops_parts: dict[str, float] = defaultdict(float)
    ref_total = 0.0
    equiv: list[float] = []
    layer_sum: list[float] = [0.0] * n_layers
    visual_in: list[int] = []
    overhead_by_shape: dict[tuple, float] = {}  # per input shape: the counted batch's pruner FLOPs per sample
    counted_samples = n_batches = 0
    try:
        bar = tqdm(_batches(samples, int(ccfg["batch_size"])), desc=f"{method} b={budget}", leave=False,
                   disable=not progress, unit="batch")
        for batch in bar:
            enc = _inputs(lm, batch)
            shape = _shape_key(enc, batch)
            count = handle.count_overhead_flops = shape not in overhead_by_shape
            n_batches += 1
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=int(task.max_new_tokens), do_sample=False)
            new = out[:, enc["input_ids"].shape[1] :]
            preds = [task.clean_prediction(p) for p in tok.batch_decode(new, skip_special_tokens=True)]
            counts = list(handle.token_counts)  # [B] TokenCounts
            kept = list(handle.kept_indices)
            kept_by_layer = {layer: list(rows_k) for layer, rows_k in handle.kept_by_layer.items()}
            diag = handle.diagnostics if diag_cfg else None
            if count:  # the batch's pruner FLOPs, split evenly
                overhead_by_shape[shape] = handle.overhead_flops / len(batch)
                counted_samples += len(batch)
            overhead = overhead_by_shape[shape]
            # per image (batch order, a sample's images in turn): (h, w) px as the processor saw them, and its
            # own token grid (Qwen) or None; handle.kept_indices is per image too
            sizes = [(im.height, im.width) for s in batch for im in s.images]
            grids = lm.image_grids(enc, len(sizes))
            first_image = [0]
            for s in batch[:-1]:
                first_image.append(first_image[-1] + len(s.images))
            for b, (s, pred) in enumerate(zip(batch, preds)):
                images_b = range(first_image[b], first_image[b] + len(s.images))
                n_text = int(enc["attention_mask"][b].sum()) - int((enc["input_ids"][b] == image_token_id).sum())
                # This sample's own counts (ragged in-ViT pruning, LLaVA-NeXT's image-dependent runs).
                c = sample_cost(cfg_model, n_text, counts[b] if b < len(counts) else None, lm.num_visual_tokens,
                                overhead=overhead)
                f, n_in, e = c.flops, c.visual_in, c.equiv_tokens
                for k, v in f.as_dict().items():
                    flops_parts[k] += v
                ref_total += c.reference
                score = float(task.score(pred, s))
                kept_b = [kept[j] for j in images_b] if images_b.stop <= len(kept) else None  # per image
                k_b = kept_b[0] if kept_b is not None else None  # the first image's: what recall is about
                j0 = images_b.start
                grid_b, cover_b = lm.recall_cover(sizes[j0], grids[j0])
                rec = relevant_recall(k_b, list(s.relevant_patches(grid_b)), cover_b)
                c_b = counts[b] if b < len(counts) else None
                if k_b is not None and k_b.numel() == 0 and c_b is not None and c_b.merged:
                    rec = None  # only merged tokens reach the LLM (pooling, prumerge): recall is not defined
                visual_in.append(n_in)
                equiv.append(e)
                for i, v in enumerate(c.counts.llm_visual or [n_in] * n_layers):
                    layer_sum[i] += v
                row = {
                    "id": s.id, "family": s.family, "question": s.question, "answer": s.answer,
                    "prediction": pred.strip(), "score": score, "relevant_recall": rec,
                    # per image of the sample the kept positions (None: every token kept)
                    "kept": None if kept_b is None else [k.tolist() for k in kept_b],
                    "n_kept": None if kept_b is None else sum(int(k.numel()) for k in kept_b),
                    "visual_in": n_in, "equiv_tokens": e, "tflops_prefill": f.total / 1e12,
                }
                if kept_by_layer:  # in-LLM methods: the kept set entering each pruning layer
                    row["kept_by_layer"] = {str(layer): [ks[j].tolist() for j in images_b]
                                            for layer, ks in sorted(kept_by_layer.items())}
                if diag is not None and b < len(diag.samples):
                    row.update(diagnostics_row(diag.samples[b], with_sinks=budget is None))
                    # visual tokens entering the last decoder layer (merged ones included): the sink shares' base
                    row["llm_visual_last"] = int((c.counts.llm_visual or [n_in] * n_layers)[-1])
                rows.append(row)
        handle.count_overhead_flops = False
        handle.record_diagnostics = False  # latency / memory are measured without the recorder
        lat = ccfg["latency"]
        n_lat = min(int(lat["n_samples"]), len(samples))
        warm = int(lat["warmup"])
        runtime = measure_runtime(
            model, lambda i: _inputs(lm, [samples[i % len(samples)]]), n_lat, warm, int(lat["decode_tokens"])
        ) if n_lat > 0 else {}
        describe = handle.pruner.describe()
        info = dict(handle.info)
    finally:
        handle.remove()
    n = len(rows)
    by_family: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by_family[r["family"]].append(r["score"])
    recalls = [r["relevant_recall"] for r in rows if r["relevant_recall"] is not None]
    flops = {k: v / n for k, v in flops_parts.items()}
    metrics: dict[str, Any] = {
        "model": ccfg["model"]["name"],
        "task": ccfg["task"]["name"],
        "method": method,
        "variant": ccfg["method"]["variant"],
        "budget": budget,
        "params": {k: v for k, v in describe.items() if k not in ("method", "budget", "seed")},
        "seed": ccfg["seed"],
        "method_seed": ccfg["method"]["seed"],
        "n_samples": n,
        "accuracy": sum(r["score"] for r in rows) / n,
        "accuracy_ci95": list(wilson_interval([r["score"] for r in rows])),
        "accuracy_by_family": {f: sum(v) / len(v) for f, v in sorted(by_family.items())},
        "accuracy_rel": None,
        "accuracy_rel_ci95": None,
        "equiv_tokens": sum(equiv) / n,
        "llm_visual_tokens_per_layer": [v / n for v in layer_sum],
        # per-sample unpruned visual tokens: LLaVA-1.5's fixed count, LLaVA-NeXT's mean over the samples
        "visual_tokens_in": visual_in[0] if len(set(visual_in)) == 1 else sum(visual_in) / n,
        "within_budget": (None if isinstance(budget, bool) or not isinstance(budget, (int, float))
                          else sum(1 for v in visual_in if v <= _image_budget(budget, v)) / n),
        "flops_prefill": flops,
        "tflops_prefill": flops["total"] / 1e12,
        "vision_tflops": flops["vision"] / 1e12,
        "projector_tflops": flops["projector"] / 1e12,
        "llm_tflops": flops["llm"] / 1e12,
        "overhead_tflops": flops["overhead"] / 1e12,
        "overhead_flops_from": (f"first batch of each input shape: {len(overhead_by_shape)} of {n_batches} "
                                f"batches ({counted_samples} of {n} samples) counted"),
        "flops_rel": flops["total"] / (ref_total / n),
        # the task's own figures beyond accuracy (POPE's F1 per setting, an lmms-eval task's aggregations)
        "task_metrics": task.aggregate(rows),
        "relevant_recall": sum(recalls) / len(recalls) if recalls else None,
        **runtime,
        "diagnostics": diag_cfg or False,
        **(attention_summary(rows, n_layers) if diag_cfg else {}),
        "pruner_info": info,
        "device": str(lm.device),
        "num_threads": torch.get_num_threads(),
        "dtype": str(model.dtype).replace("torch.", ""),
        "wall_s": time.perf_counter() - t0,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "transformers": __import__("transformers").__version__},
    }
    return metrics, rows


# ---- the job ----------------------------------------------------------------------------------
def run(cfg: DictConfig) -> list[Path]:
    """Run every cell of this job; returns the cell directories (finished or skipped)."""
    from benchmarks.tasks import tasks_for
    from pruners import get_pruner_class

    settings = check_settings(cfg)  # every run-level setting, before anything heavy
    watch_sweep_parent()  # a sweep worker exits when its parent is killed
    if settings.num_threads is not None:
        torch.set_num_threads(settings.num_threads)
    from benchmarks.allocator import tune_malloc

    tune_malloc()  # large batches keep their activation buffers (no page faults per forward; README "Performance")
    results_dir = store.check_writable(settings.results_dir)
    store.clean_stale_tmp(results_dir)
    method = str(cfg.method.name)
    params = method_params(cfg.method)
    # Unknown method or parameters fail here, before the model loads; the hash covers every default.
    cls = get_pruner_class(method)
    probe = cls(budget=None, seed=int(cfg.seed), **params)
    params = dict(probe.params)
    variant = variant_label(cfg.method, method, params, {**cls.defaults, **cls.fixed_params})
    seeds = settings.seeds
    if seeds is not None and not cls.uses_seed:
        log.info("seeds=%s: %r does not depend on its seed; it runs once (seed=%s)", seeds, method, cfg.seed)
    method_seeds: list[int | None] = list(seeds) if seeds is not None and cls.uses_seed else [None]
    # Every task the config names (task=lmms task.names=[...] expands to several), checked before the model loads.
    bound = tasks_for(OmegaConf.to_container(cfg.task, resolve=True))
    device = resolve_device(settings.device, _job_num())
    # Budgets against the model's config (config.json only): before the weights load.
    model_config = peek_config(cfg.model)
    budgets = validate_budgets(settings.budgets, visual_tokens_of(model_config), str(cfg.model.name),
                               size_dependent=size_dependent(model_config))
    counts = [b for b in budgets if b not in (None, AUTO)]
    if AUTO in budgets and not probe.chooses_budget:
        raise ValueError(f"budgets: {AUTO!r} is for methods that choose their own token count (e.g. recoverable "
                         f"with method.params.mode=adaptive); {method!r} with these params does not")
    if probe.chooses_budget and counts:  # may still take counts (prumerge's mode=auto: fixed with a budget)
        try:
            takes_counts = not cls(budget=counts[0], seed=int(cfg.seed), **params).chooses_budget
        except ValueError:
            takes_counts = False
        if not takes_counts:
            raise ValueError(f"budgets: {method!r} with these params chooses its own token count; accepted: null "
                             f"and {AUTO!r}, got {counts}")
    if method == "none" and budgets != [None]:
        log.info("method 'none' keeps every token: only its budget=null cell is run (asked: %s)", budgets)
        budgets = [None]
    lm = get_model(cfg.model, device)
    paths: list[Path] = []
    for task, task_cfg in bound:
        tcfg = cfg.copy()
        with open_dict(tcfg):
            tcfg.task = OmegaConf.create(task_cfg)  # what this task's cells record (lmms: one name each)
        paths += _run_task(tcfg, task, lm, budgets, method, params, variant, method_seeds, results_dir)
    print_summary(paths)
    if settings.leaderboard:
        write_leaderboard(results_dir)
    return paths


def _run_task(cfg: DictConfig, task: Any, lm: LoadedModel, budgets: list[Any], method: str, params: dict[str, Any],
              variant: str, method_seeds: list[int | None], results_dir: Path) -> list[Path]:
    """The cells of one task (``cfg.task`` is its recorded config): the finished ones skipped, the others
    computed and written; returns every cell directory."""
    todo = []
    for budget in budgets:
        for mseed in ([None] if budget is None else method_seeds):
            ccfg = cell_config(cfg, budget, method, params, lm.weights, variant=variant, method_seed=mseed)
            digest = store.config_hash(ccfg)
            path = store.cell_dir(results_dir, ccfg["model"]["name"], ccfg["task"]["name"],
                                  "none" if budget is None else method, budget, digest, seed=mseed)
            todo.append((budget, ccfg, digest, path))
    # A damaged or half-written cell is moved aside (results_dir/damaged/) and computed again.
    pending = [t for t in todo if not store.reusable(t[3])]
    for _, _, _, path in todo:
        if all(path != t[3] for t in pending):
            log.info("skip finished cell %s", path)
    if pending:
        split = str(cfg.task.get("split", "eval"))
        samples = task.samples(split=split, n=cfg.n_samples, seed=int(cfg.seed))
        if not samples:
            raise ValueError(f"task {task.name!r} split {split!r} returned no samples (n_samples={cfg.n_samples})")
        progress = bool(cfg.get("progress", True))
        for _budget, ccfg, digest, path in tqdm(pending, desc=f"{lm.name}/{task.name}/{variant}", unit="cell",
                                                disable=not progress):
            if store.reusable(path):  # a parallel job finished it meanwhile
                log.info("skip finished cell %s", path)
                continue
            metrics, rows = run_cell(lm, task, samples, ccfg, progress)
            metrics["config_hash"] = digest
            metrics["weights"] = lm.weights
            metrics["image_processor"] = lm.image_processor_settings
            reference = _reference_cell(results_dir, cfg, lm.weights) if ccfg["budget"] is not None else None
            add_relative(metrics, rows, reference)
            if ccfg.get("diagnostics"):
                add_diagnostics(metrics, rows, reference, lm.model.config)
            files = {
                store.CONFIG: OmegaConf.to_yaml(OmegaConf.create({**ccfg, "config_hash": digest})),
                store.PREDICTIONS: "".join(json.dumps(r) + "\n" for r in rows),
                store.METRICS: json.dumps(metrics, indent=2) + "\n",
            }
            if store.write_cell(path, files):
                log.info("wrote cell %s (accuracy %.3f, %.4g TFLOPs)", path, metrics["accuracy"],
                         metrics["tflops_prefill"])
            else:
                log.info("cell %s was finished by another job; kept that copy", path)
    return [t[3] for t in todo]


def write_leaderboard(results_dir: Path) -> None:
    """``leaderboard=true``: the leaderboard of ``results_dir`` (`benchmarks.leaderboard.report`), in this
    process. A ``--multirun`` job leaves it to ``python -m benchmarks.leaderboard`` after the sweep
    (its jobs may run in other processes, and each would rewrite it)."""
    if _job_num() is not None:
        log.info("leaderboard=true is not applied to --multirun jobs: run `python -m benchmarks.leaderboard "
                 "results_dir=%s` after the sweep", results_dir)
        return
    from benchmarks.leaderboard import report

    print()
    report(results_dir)


def add_relative(metrics: dict[str, Any], rows: list[dict[str, Any]], reference: Path | None) -> None:
    """``accuracy_rel`` (accuracy / unpruned accuracy) and its paired-bootstrap 95% interval over the
    samples both cells scored; a reference cell is its own reference (1.0). ``reference`` None and not
    the reference itself: both stay None (no reference cell yet)."""
    if metrics["budget"] is None:
        ref_rows = rows
    elif reference is None:
        return
    else:
        ref_rows = store.read_predictions(reference)
    ours, ref = paired_scores({r["id"]: r["score"] for r in rows}, {r["id"]: r["score"] for r in ref_rows})
    if not ours or sum(ref) == 0:
        return
    metrics["accuracy_rel"] = metrics["accuracy"] / (sum(ref) / len(ref))
    ci = paired_bootstrap(ours, ref, ratio_of_means, seed=int(metrics["seed"]))
    metrics["accuracy_rel_ci95"] = None if ci is None else list(ci)


def add_diagnostics(metrics: dict[str, Any], rows: list[dict[str, Any]], reference: Path | None,
                    model_config: Any = None) -> None:
    """The diagnostics "before" and the sink shares (docs/benchmarks.md "Diagnostics").

    Before: the unpruned reference cell's attention summaries (``attn_visual_share_before``,
    ``mdi_before`` and their ``_per_layer``), the reference cell's own for itself. Sinks: found in the
    reference (`find_sinks`: ``sink_dims`` and per sample ``sinks``, written into its rows); every cell
    then gets per sample ``sink_share_of_kept`` and ``sinks_kept`` (its final kept tokens, row["kept"],
    against the reference's sinks of the same sample id) and their means over the samples that have
    sinks; both None with ``sink_reason`` when there are none to count."""
    from benchmarks.metrics import find_sinks, sink_shares

    tau = float((metrics.get("diagnostics") or {}).get("sink_tau", 20.0))
    text = getattr(model_config, "text_config", model_config)
    hidden = getattr(text, "hidden_size", None)
    if metrics["budget"] is None:
        ref_metrics, ref_rows = metrics, rows
        dims, sinks, reason = find_sinks(rows, tau, hidden)
        metrics["sink_dims"] = dims
        for r, s in zip(rows, sinks):
            r["sinks"] = s
    elif reference is None:
        ref_metrics, ref_rows = {}, []
        dims, reason = [], "no unpruned reference cell (method none, budget null) of these samples yet"
    else:
        ref_metrics, ref_rows = store.read_metrics(reference), store.read_predictions(reference)
        dims = ref_metrics.get("sink_dims") or []
        reason = ref_metrics.get("sink_reason")
        if "sink_dims" not in ref_metrics:
            reason = "the reference cell has no sink statistics"
    for key in ("attn_visual_share", "mdi"):
        metrics[f"{key}_before"] = ref_metrics.get(key)
        metrics[f"{key}_per_layer_before"] = ref_metrics.get(f"{key}_per_layer")
    metrics["sink_dims"] = dims
    metrics["sink_tau"] = tau
    ref_sinks = {r["id"]: r.get("sinks") or [] for r in ref_rows}
    share, kept_frac = [], []
    for r in rows:
        k = r.get("kept")
        a, b = sink_shares(None if k is None else k[0], r.get("llm_visual_last"), ref_sinks.get(r["id"], []))
        r["sink_share_of_kept"], r["sinks_kept"] = a, b
        if b is not None:
            share.append(a)
            kept_frac.append(b)
    metrics["sink_samples"] = len(kept_frac)
    metrics["sink_share_of_kept"] = sum(v for v in share if v is not None) / len(share) if share else None
    metrics["sinks_kept"] = sum(kept_frac) / len(kept_frac) if kept_frac else None
    if reason is None and not kept_frac:
        reason = "no sample of this cell has a sink in the reference (none matched by sample id)"
    metrics["sink_reason"] = None if kept_frac else reason


def print_summary(paths: list[Path]) -> None:
    """A compact table of this run's cells: variant, budget, accuracy with its 95% interval, FLOPs
    relative to unpruned and the prefill speed-up (unpruned prefill time / this cell's)."""
    import pandas as pd

    rows = [store.read_metrics(p) for p in paths if store.is_finished(p)]
    if not rows:
        return
    ref_ms = next((m.get("prefill_ms") for m in rows if m["budget"] is None), None)
    table = pd.DataFrame([{
        "variant": m.get("variant", m["method"]),
        "budget": "null" if m["budget"] is None else m["budget"],
        "seed": m.get("method_seed", m["seed"]),
        "n": m["n_samples"],
        "accuracy": f"{m['accuracy']:.3f} [{m['accuracy_ci95'][0]:.3f}, {m['accuracy_ci95'][1]:.3f}]"
                    if m.get("accuracy_ci95") else f"{m['accuracy']:.3f}",
        "flops_rel": round(float(m["flops_rel"]), 3),
        "speedup": (round(ref_ms / m["prefill_ms"], 2) if ref_ms and m.get("prefill_ms") else None),
    } for m in rows])
    print(f"\nprunebench: {len(rows)} cell(s) of this run (accuracy with its 95% Wilson interval)")
    print(table.to_string(index=False))


def _reference_cell(results_dir: Path, cfg: DictConfig, weights: str | None) -> Path | None:
    """The finished unpruned reference cell of this model, task, samples and seed, if there is one."""
    ccfg = cell_config(cfg, None, "none", {}, weights)
    digest = store.config_hash(ccfg)
    path = store.cell_dir(results_dir, ccfg["model"]["name"], ccfg["task"]["name"], "none", None, digest)
    return path if store.reusable(path) else None


register_method_configs()  # method=<any registered pruner>, before Hydra composes


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (see the module docstring)."""
    run(cfg)


if __name__ == "__main__":
    main()
