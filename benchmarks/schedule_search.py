"""G-Search (Zhao et al., CVPR 2025, arXiv 2412.00556): find, shallow to deep, the least number of
visual tokens each decoder layer needs without a fidelity drop on calibration data; writes a `gsearch`
method config holding the schedule. Doc: docs/methods/gsearch.md "The search".

    python -m benchmarks.schedule_search model=embedded task=shapes min_fidelity=0.99
    python -m benchmarks.schedule_search model=embedded name=gsearch overwrite=true   # the shipped file

Arguments are ``key=value``: this script's settings (`SETTINGS`), anything else is a Hydra override of
``conf/tune.yaml`` (``model=``, ``task=``). Calibration and objective are the tuner's
(`benchmarks.tune.build_calibration`, `benchmarks.tune.objective`). Contract of `g_search`: layers
before ``first_layer`` keep all N; each later layer's count is found by bisection, and the chosen
count was measured to pass ``objective >= min_fidelity`` while count - 1 was measured to fail, both
with the deeper layers held at the candidate. Deterministic; every objective is cached by schedule.
Output: ``<results_dir>/tuned/method/<name>.yaml`` (tracked ``conf/method/`` only with ``overwrite=true``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.tune import (
    CALIB_DEFAULTS,
    CONF_DIR,
    Calibration,
    build_calibration,
    objective,
    output_dir,
    selection,
    write_method_yaml,
)

log = logging.getLogger("prunebench.schedule_search")

#: this script's settings and their defaults (everything else on the command line is a Hydra override)
SETTINGS: dict[str, Any] = {
    "min_fidelity": 0.99, "first_layer": 2, **CALIB_DEFAULTS, "device": "auto", "num_threads": None,
    "results_dir": "results", "out_dir": None, "overwrite": False, "name": None, "progress": True,
}
OBJECTIVE_DEFINITION = ("mean cosine similarity, pruned vs unpruned, of the last prompt token's final-norm "
                        "hidden state at prefill, on the calibration set")


@dataclass
class SearchResult:
    counts: list[int]  # visual tokens entering each decoder layer (counts[0] = N)
    fractions: list[float]  # counts / N: the gsearch schedule
    objective: float  # of the final schedule
    equiv_tokens: float
    min_fidelity: float
    n_evaluations: int
    #: per layer l >= 1: {candidate count: objective} of every schedule evaluated for that layer
    trace: list[dict[int, float]] = field(default_factory=list)
    first_layer: int = 1


def schedule_of(counts: Sequence[int], n: int) -> list[float]:
    """Per-layer counts as `gsearch` keep fractions (c / n; `pruners._ratio_schedule.fraction_count`
    gives the counts back exactly)."""
    return [c / n for c in counts]


def g_search(calib: Calibration, min_fidelity: float = 0.99, seed: int = 0, first_layer: int = 2,
             progress: Callable[[str], None] | None = None) -> SearchResult:
    """Greedy shallow-to-deep search of the smallest count per layer from ``first_layer`` on (layers
    before it keep every token; see the module docstring)."""
    if not (isinstance(min_fidelity, (int, float)) and not isinstance(min_fidelity, bool) and -1 <= min_fidelity <= 1):
        raise ValueError(f"min_fidelity must be a number in [-1, 1] (a cosine similarity), got {min_fidelity!r}")
    n, n_layers = calib.info.num_visual_tokens, calib.info.llm_num_layers
    if n_layers < 2:
        raise ValueError(f"G-Search needs at least 2 decoder layers (layer 0 sees every token), got {n_layers}")
    if isinstance(first_layer, bool) or not isinstance(first_layer, int) or not 1 <= first_layer <= n_layers - 1:
        raise ValueError(f"first_layer must be an int in 1..{n_layers - 1} (the first decoder layer searched; "
                         f"its tokens are ranked by the previous layer's attention), got {first_layer!r}")
    cache: dict[tuple[int, ...], float] = {}

    def evaluate(counts: tuple[int, ...]) -> float:
        if counts not in cache:
            params = {"schedule": schedule_of(counts, n), "found_on": None}
            cache[counts] = objective(calib, "gsearch", None, params, seed)
        return cache[counts]

    counts = [n] * n_layers
    trace: list[dict[int, float]] = []
    for layer in range(first_layer, n_layers):
        seen: dict[int, float] = {}

        def passes(c: int, layer: int = layer, seen: dict[int, float] = seen) -> bool:
            value = evaluate(tuple(counts[:layer] + [c] * (n_layers - layer)))
            seen[c] = value
            return value >= min_fidelity

        lo, hi = 0, counts[layer - 1]  # hi passes: the schedule accepted so far (or the unpruned model)
        while lo < hi:
            mid = (lo + hi) // 2
            if passes(mid):
                hi = mid
            else:
                lo = mid + 1
        for j in range(layer, n_layers):
            counts[j] = hi
        trace.append(dict(sorted(seen.items())))
        if progress:
            progress(f"layer {layer}: {hi} of {n} tokens (evaluated {dict(sorted(seen.items()))})")
    final = tuple(counts)
    value = cache[final] if final in cache else evaluate(final)
    return SearchResult(counts=list(counts), fractions=schedule_of(counts, n), objective=float(value),
                        equiv_tokens=sum(counts) / n_layers, min_fidelity=float(min_fidelity),
                        n_evaluations=len(cache), trace=trace, first_layer=first_layer)


# ---- output -----------------------------------------------------------------------------------------
def write_schedule_config(result: SearchResult, out_dir: Path, name: str, found_on: str | None,
                          searched: dict[str, Any], run_args: str = "", note: str | None = None) -> Path:
    """Write ``<out_dir>/<name>.yaml``: a runner-compatible gsearch config plus its ``searched:`` record."""

    body = {
        "name": "gsearch",
        "variant": name,
        "params": {"schedule": result.fractions, "depth_scaled": False, "found_on": found_on,
                   "positions": "original"},
        "searched": {
            "counts": result.counts,
            "equiv_tokens": result.equiv_tokens,
            "objective": result.objective,
            "min_fidelity": result.min_fidelity,
            "first_layer": result.first_layer,
            "criterion": "per layer, shallow to deep: the smallest count (deeper layers held at it) with "
                         "objective >= min_fidelity; bisection",
            "objective_definition": OBJECTIVE_DEFINITION,
            "n_evaluations": result.n_evaluations,
            **searched,
            "trace": [{"layer": i + result.first_layer, "count": result.counts[i + result.first_layer], "evaluated": t}
                      for i, t in enumerate(result.trace)],
        },
    }
    more = f" {run_args}" if run_args else ""
    header = (
        f"# gsearch schedule found by benchmarks.schedule_search (G-Search) on {searched.get('model')}: "
        f"objective {result.objective:.5f} >= min_fidelity {result.min_fidelity:g}, "
        f"{result.equiv_tokens:g} equivalent tokens.\n"
        + (f"# NOTE: {note}\n" if note else
           f"# Benchmark it: python -m benchmarks.run method={name} budgets=[null,auto,36]{more}\n")
    )
    return write_method_yaml(Path(out_dir), name, header, body)


# ---- command line -----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """(this script's settings, the Hydra overrides): every argument must be ``key=value``."""
    import yaml

    settings = dict(SETTINGS)
    overrides: list[str] = []
    for arg in argv:
        if "=" not in arg:
            raise ValueError(f"arguments are key=value (settings: {', '.join(SETTINGS)}; or Hydra overrides "
                             f"such as model=embedded), got {arg!r}")
        key, value = arg.split("=", 1)
        if key in SETTINGS:
            settings[key] = yaml.safe_load(value) if value != "" else None
        else:
            overrides.append(arg)
    for key in ("calib_samples", "batch_size", "seed", "first_layer"):
        v = settings[key]
        if isinstance(v, bool) or not isinstance(v, int) or (key != "seed" and v < 1):
            raise ValueError(f"{key} must be {'an int' if key == 'seed' else 'a positive int'}, got {v!r}")
    mf = settings["min_fidelity"]
    if isinstance(mf, bool) or not isinstance(mf, (int, float)) or not -1 <= mf <= 1:
        raise ValueError(f"min_fidelity must be a number in [-1, 1] (a cosine similarity), got {mf!r}")
    if not isinstance(settings["overwrite"], bool):
        raise ValueError(f"overwrite must be true or false, got {settings['overwrite']!r}")
    name = settings["name"]
    if name is not None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)):
            raise ValueError(f"name must be letters, digits, '_' or '-' (a Hydra option name), got {name!r}")
    return settings, overrides


def run(argv: Sequence[str]) -> dict[str, Any]:
    """Search a schedule and write it; returns a summary dict. Arguments are checked before the model loads."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from benchmarks.models import load_model
    from benchmarks.tasks import get_task
    from pruners.gsearch import model_identity

    settings, overrides = parse_args(argv)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="tune", overrides=overrides)
    model_name, task_name = str(cfg.model.name), str(cfg.task.name)
    name = str(settings["name"] or f"gsearch_{model_name}".replace(".", "p"))
    out_dir = output_dir(OmegaConf.create({k: settings[k] for k in ("out_dir", "overwrite", "results_dir")}))
    if settings["num_threads"]:
        torch.set_num_threads(int(settings["num_threads"]))
    device = settings["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    lm = load_model(cfg.model, device)
    task = get_task(task_name)
    samples = task.samples(split=settings["calib_split"], n=settings["calib_samples"], seed=settings["seed"])
    calib = build_calibration(lm.model, lm.processor, [s.image for s in samples],
                              [lm.prompt(s.question) for s in samples], settings["batch_size"])
    progress = print if settings["progress"] else None
    result = g_search(calib, float(settings["min_fidelity"]), settings["seed"], settings["first_layer"], progress)
    seconds = time.perf_counter() - t0
    searched = {"model": model_name, "task": task_name, **{k: settings[k] for k in CALIB_DEFAULTS},
                "seconds": round(seconds, 1),
                "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    found_on = model_identity(calib.info)
    run_args, warning = selection(out_dir / f"{name}.yaml")
    path = write_schedule_config(result, out_dir, name, found_on, searched, run_args, warning)
    if warning:
        log.warning("%s", warning)
    summary = {"path": str(path), "counts": result.counts, "schedule": result.fractions,
               "objective": result.objective, "equiv_tokens": result.equiv_tokens, "found_on": found_on,
               "n_evaluations": result.n_evaluations, "seconds": round(seconds, 1)}
    print(summary)
    return summary


def _main() -> None:
    import warnings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=r"provider=hydra\.searchpath in main, path=.*tuned is not available")
    run(sys.argv[1:])


if __name__ == "__main__":
    _main()
