"""Every runner setting checked at configuration time, before any model is loaded.

`check_settings(cfg)` is the runner's first step (`benchmarks.run.run`): a bad setting fails in
milliseconds with a ValueError naming it and what is accepted, instead of after the model loads
(``batch_size=0``: ``range() arg 3 must not be zero``), or not at all (``budgets=[]`` exiting 0 having
done nothing, ``num_threads=0`` silently meaning the torch default, ``latency.n_samples=-1`` writing a
cell without latency fields, ``results_dir=`` writing into the current folder). Budgets are checked
against the model's visual-token count read from its config (`benchmarks.models.peek_config`: no
weights are loaded).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from benchmarks.models import check_model_fields

DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


@dataclass(frozen=True)
class Latency:
    """``latency.*``: timed single-sample runs (0 = no latency fields), warm-up runs, tokens generated."""

    n_samples: int
    warmup: int
    decode_tokens: int


@dataclass(frozen=True)
class RunSettings:
    """The run-level settings of one runner job, checked."""

    batch_size: int
    n_samples: int | None
    latency: Latency
    results_dir: str
    num_threads: int | None
    device: str
    budgets: list[Any]
    seeds: list[int] | None
    diagnostics: bool = False
    leaderboard: bool = False


def _int(name: str, value: Any, low: int, accepted: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is not supported; accepted: {accepted}")
    return int(value)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_seeds(seeds: Any) -> list[int] | None:
    """``seeds``: null (the pruner gets ``seed``) or a non-empty list of distinct ints."""
    seeds = _plain(seeds)
    if seeds is None:
        return None
    if (not isinstance(seeds, (list, tuple)) or not seeds
            or any(isinstance(x, bool) or not isinstance(x, int) for x in seeds)):
        raise ValueError(f"seeds={seeds!r} is not supported; accepted: null or a non-empty list of ints, e.g. [0,1,2]")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={list(seeds)} repeats a seed; accepted: distinct ints")
    return [int(x) for x in seeds]


def check_model_config(model_cfg: Any) -> None:
    """``model.source``, ``model.dtype`` and ``model.path`` (`benchmarks.models.check_model_fields`) and
    ``model.model_class`` are ones prunebench can run."""
    from mllm_adapters import SUPPORTED_MODEL_CLASSES

    m = dict(_plain(model_cfg) or {})
    check_model_fields(m)
    model_class = m.get("model_class")
    if model_class is not None and model_class not in SUPPORTED_MODEL_CLASSES:
        raise ValueError(f"model.model_class={model_class!r} for model {m.get('name', '?')!r} is not supported; "
                         f"accepted: {', '.join(SUPPORTED_MODEL_CLASSES)} (or null for LlavaForConditionalGeneration)")


def check_settings(cfg: Any) -> RunSettings:
    """Check every run-level setting of a runner config; a ValueError naming the first bad one."""
    batch_size = _int("batch_size", cfg.get("batch_size"), 1, "an integer >= 1 (samples per generate call)")
    n_samples = _int("n_samples", cfg.get("n_samples"), 1, "null (the task's whole split) or an integer >= 1",
                     allow_none=True)
    lat = _plain(cfg.get("latency"))
    if not isinstance(lat, dict):
        raise ValueError(f"latency={lat!r} is not supported; accepted: a mapping with n_samples, warmup, decode_tokens")
    unknown = sorted(set(lat) - {"n_samples", "warmup", "decode_tokens"})
    if unknown:
        raise ValueError(f"latency.{unknown[0]} is not a setting; accepted: latency.n_samples, latency.warmup, "
                         "latency.decode_tokens")
    latency = Latency(
        n_samples=_int("latency.n_samples", lat.get("n_samples"), 0,
                       "an integer >= 0 (timed single-sample runs; 0 = measure no latency)"),
        warmup=_int("latency.warmup", lat.get("warmup"), 0, "an integer >= 0 (untimed warm-up runs)"),
        decode_tokens=_int("latency.decode_tokens", lat.get("decode_tokens"), 2,
                           "an integer >= 2 (the first token is the prefill, the rest are decode steps)"),
    )
    results_dir = cfg.get("results_dir")
    if not isinstance(results_dir, str) or not results_dir.strip():
        raise ValueError(f"results_dir={results_dir!r} is not supported; accepted: a non-empty folder path "
                         "(default: results)")
    num_threads = _int("num_threads", cfg.get("num_threads"), 1,
                       "null (torch's default) or an integer >= 1 (torch CPU threads)", allow_none=True)
    device = cfg.get("device")
    if not isinstance(device, str) or not DEVICE.match(device):
        raise ValueError(f"device={device!r} is not supported; accepted: auto, cpu, cuda, cuda:N")
    budgets = _plain(cfg.get("budgets"))
    if budgets is None:
        budgets = [None]
    if not isinstance(budgets, (list, tuple)):
        budgets = [budgets]
    if not budgets:
        raise ValueError("budgets=[] runs nothing; accepted: a non-empty list of null (unpruned), 'auto' "
                         "or visual-token counts, e.g. budgets=[null,72,36,18]")
    diagnostics = cfg.get("diagnostics", False)
    if not isinstance(diagnostics, bool):
        raise ValueError(f"diagnostics={diagnostics!r} is not supported; accepted: true (record the attention-share "
                         "and attention-sink diagnostics of every cell) or false")
    leaderboard = cfg.get("leaderboard", False)
    if not isinstance(leaderboard, bool):
        raise ValueError(f"leaderboard={leaderboard!r} is not supported; accepted: true (write the leaderboard of "
                         "results_dir at the end of the run) or false")
    check_model_config(cfg.get("model"))
    return RunSettings(diagnostics=diagnostics, leaderboard=leaderboard, batch_size=batch_size, n_samples=n_samples, latency=latency, results_dir=results_dir,
                       num_threads=num_threads, device=device, budgets=list(budgets),
                       seeds=check_seeds(cfg.get("seeds")))
