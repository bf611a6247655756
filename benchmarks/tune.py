"""Flow-guided hyperparameter tuning of any pruner under a compute constraint (VFlowOpt's step 4).

    python -m benchmarks.tune method=vflowopt target_equiv_tokens=36 calib_samples=32 n_trials=60 \
        model=embedded task=shapes
    python -m benchmarks.tune mode=evaluate method=vflowopt_tuned_eq36    # re-check a tuned config

Contract: the objective is the mean cosine, pruned vs unpruned, of the last prompt token's final-norm
hidden state at prefill on ``task.samples(split=calib_split)`` (`objective`, `build_calibration`, also
used by `benchmarks.schedule_search`). The search is optuna (seeded TPE, ``sampler=gp``) over the
method's ``search_space``. The constraint (``target_equiv_tokens`` or ``target_flops_rel``) is SOLVED,
not penalised: each trial takes the largest ``budget`` that meets it, and an infeasible trial scores -1.
The result goes to ``<results_dir>/tuned/method/``; the tracked ``conf/method/`` is written only with
``overwrite=true``. Everything else (per-sample costs, LLaVA-NeXT, name collisions, evaluate mode's
stored calibration): docs/tune.md.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.method_configs import register_method_configs
from mllm_adapters.handle import TokenCounts

log = logging.getLogger("prunebench.tune")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CONF_METHOD = CONF_DIR / "method"  # tracked: written only with overwrite=true
register_method_configs()  # method=<any registered pruner>, before Hydra composes
SAMPLERS = ("tpe", "gp")
INFEASIBLE = -1.0
#: calibration settings, with their tune-mode defaults (conf/tune.yaml leaves them null so that
#: mode=evaluate can tell "not given" from "given": not given = the value stored in the tuned file)
CALIB_DEFAULTS: dict[str, Any] = {"calib_samples": 32, "calib_split": "val", "seed": 0, "batch_size": 8}
#: config groups whose ``name`` the tuned file records and mode=evaluate checks (they cannot be null)
CALIB_GROUPS = ("model", "task")


# ---- calibration ------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Encoded calibration batches of one model and their unpruned reference states."""

    model: Any
    batches: list[dict[str, torch.Tensor]]
    reference: list[torch.Tensor]  # per batch [b, D] final-norm state of the last prompt token
    n_text: float  # mean non-image prompt tokens per sample (for relative FLOPs)
    info: Any  # pruners.base.ModelInfo of the model
    #: single-sample encodings on which token counts are measured, with the fraction of the calibration
    #: set each stands for: the first sample (LLaVA-1.5), one per distinct image size (LLaVA-NeXT)
    probes: list[tuple[dict[str, torch.Tensor], float]] = field(default_factory=list)


def encode(processor: Any, images: Sequence[Any], prompts: Sequence[str], device: Any, dtype: Any) -> dict:
    """Processor outputs on ``device`` (pixel values in the model's dtype), left-padded batch."""
    enc = processor(images=[im.convert("RGB") for im in images], text=list(prompts), padding=True,
                    return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items()}
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(dtype)
    return enc


def last_token_state(model: Any, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, D] fp32 output of the LLM's final norm at the last prompt position (prefill).

    Left padding puts every sample's last prompt token at the last position, pruned or not.
    """
    from benchmarks.models import family_spec

    norm = family_spec(model.config)(model).final_norm()
    out: dict[str, torch.Tensor] = {}
    hook = norm.register_forward_hook(lambda m, a, o: out.__setitem__("h", o[:, -1].float()))
    try:
        with torch.inference_mode():
            model(**enc, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return out["h"]


def model_info(model: Any) -> Any:
    """The adapter's ModelInfo for ``model`` (attaches the keep-all pruner once and removes it)."""
    from mllm_adapters import apply_pruner

    with apply_pruner(model, "none") as h:
        return h.adapter.info


def build_calibration(model: Any, processor: Any, images: Sequence[Any], prompts: Sequence[str],
                      batch_size: int = 8) -> Calibration:
    """Encode the calibration set and compute the unpruned reference states."""
    if not images or len(images) != len(prompts):
        raise ValueError(f"calibration needs as many images as prompts (>= 1), got {len(images)} and {len(prompts)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, dtype = next(model.parameters()).device, model.dtype
    batches, refs, n_text = [], [], []
    image_id = int(model.config.image_token_id)
    for i in range(0, len(images), batch_size):
        enc = encode(processor, images[i : i + batch_size], prompts[i : i + batch_size], device, dtype)
        batches.append(enc)
        refs.append(last_token_state(model, enc))
        n_text += ((enc["attention_mask"].sum(1)) - (enc["input_ids"] == image_id).sum(1)).tolist()
    return Calibration(model, batches, refs, sum(n_text) / len(n_text), model_info(model), count_probes(model, batches))


def count_probes(model: Any, batches: list[dict[str, torch.Tensor]]) -> list[tuple[dict[str, torch.Tensor], float]]:
    """Samples to measure token counts on, with weights summing to 1 (see `Calibration.probes`)."""
    from benchmarks.models import size_dependent

    one = [{k: v[i : i + 1] for k, v in enc.items()} for enc in batches for i in range(len(enc["input_ids"]))]
    if not size_dependent(model.config):
        return [(one[0], 1.0)]
    # Samples whose integer image metadata (the processor's image sizes or patch grids) coincide get the
    # same token counts: one probe per such group, weighted by its share of the calibration set.
    def key(enc: dict[str, torch.Tensor]) -> tuple:
        return tuple((k, tuple(v.flatten().tolist())) for k, v in sorted(enc.items())
                     if k not in ("input_ids", "attention_mask") and not torch.is_floating_point(v))

    by_size: dict[tuple, list[dict[str, torch.Tensor]]] = {}
    for enc in one:
        by_size.setdefault(key(enc), []).append(enc)
    return [(encs[0], len(encs) / len(one)) for encs in by_size.values()]


# ---- objective and constraint -------------------------------------------------------------------
def objective(calib: Calibration, method: str, budget: int | None, params: dict[str, Any], seed: int = 0) -> float:
    """Mean cosine similarity (pruned vs unpruned) of the last prompt token's final state."""
    from mllm_adapters import apply_pruner

    sims = []
    with apply_pruner(calib.model, method, budget=budget, seed=seed, **params):
        for enc, ref in zip(calib.batches, calib.reference):
            sims.append(torch.nn.functional.cosine_similarity(last_token_state(calib.model, enc), ref, dim=-1))
    return float(torch.cat(sims).mean())


def reference_vision_counts(info: Any) -> list[int]:
    """Tokens entering each ViT layer the engine runs when the vision stage does not prune."""
    return [info.num_visual_tokens + int(info.has_cls)] * (info.vision_feature_layer + 1)


def token_counts(calib: Calibration, method: str, budget: int, params: dict[str, Any], seed: int = 0
                 ) -> list[TokenCounts] | None:
    """Per-layer token counts of ``method`` at ``budget`` (`TokenCounts`), one sample's
    per `Calibration.probes` entry, or None if the pruner rejects the combination (ValueError). Pure
    when the pruner is a ``ProgressiveSchedule`` and the model is not anyres."""
    from mllm_adapters import apply_pruner
    from pruners import get_pruner_class
    from pruners._schedule import ProgressiveSchedule

    cls = get_pruner_class(method)
    try:
        pruner = cls(budget=budget, seed=seed, **params)
        pruner.attach(calib.info)
    except ValueError:
        return None
    from benchmarks.models import size_dependent

    if isinstance(pruner, ProgressiveSchedule) and not size_dependent(calib.model.config):
        vision = reference_vision_counts(calib.info)
        return [TokenCounts(visual_in=calib.info.num_visual_tokens, vision=[vision], reference_vision=[vision],
                            llm_visual=list(pruner.token_schedule()))] * len(calib.probes)
    out = []
    try:
        with apply_pruner(calib.model, method, budget=budget, seed=seed, **params) as h, torch.inference_mode():
            for enc, _ in calib.probes:
                calib.model(**enc, use_cache=False, logits_to_keep=1)
                out.append(h.token_counts[0])
    except ValueError:
        return None
    return out


def cost(calib: Calibration, counts: TokenCounts | list[TokenCounts], kind: str) -> float:
    """``equiv_tokens`` or ``flops_rel`` (vision + projector + LLM prefill vs the same samples unpruned)
    of ``counts``: one sample's (or a handle's, read for its sample 0), or a list aligned with
    `Calibration.probes` (their weighted mean; FLOPs as a ratio of the weighted sums, as the runner's
    cell ``flops_rel``)."""
    from benchmarks.flops import sample_cost

    many = isinstance(counts, (list, tuple))
    weights = [w for _, w in calib.probes] if many else [1.0]
    per = [sample_cost(calib.model.config, round(calib.n_text), c, calib.info.num_visual_tokens)
           for c in (counts if many else [counts])]
    if len(per) != len(weights):
        raise ValueError(f"{len(per)} token counts for {len(weights)} calibration probes")
    if kind == "equiv_tokens":
        return sum(w * c.equiv_tokens for w, c in zip(weights, per)) / sum(weights)
    return sum(w * c.flops.total for w, c in zip(weights, per)) / sum(w * c.reference for w, c in zip(weights, per))


def solve_budget(calib: Calibration, method: str, params: dict[str, Any], kind: str, target: float,
                 seed: int = 0) -> tuple[int, float] | None:
    """Largest budget whose cost is <= target (bisection; cost assumed non-decreasing in the budget).

    Returns (budget, cost) or None when no budget is feasible.
    """

    def feasible(b: int) -> float | None:
        counts = token_counts(calib, method, b, params, seed)
        if counts is None:
            return None
        c = cost(calib, counts, kind)
        return c if c <= target + 1e-9 else None

    c1 = feasible(1)
    if c1 is None:
        return None
    # the runner's budget range: 1 .. the model's visual tokens (LLaVA-NeXT: its longest image run)
    lo, hi, best = 1, calib.info.num_visual_tokens, (1, c1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        c = feasible(mid)
        if c is None:
            hi = mid - 1
        else:
            lo, best = mid, (mid, c)
    return best


# ---- search -------------------------------------------------------------------------------------
def resolve_space(cls: Any, overrides: dict[str, Any] | None = None) -> dict[str, tuple]:
    """The method's ``search_space`` with ``overrides`` applied ({param: [type, lo, hi] | [categorical,
    [choices]] | None to drop}); checks every entry."""
    space = dict(cls.search_space)
    for k, v in (overrides or {}).items():
        if v is None:
            space.pop(k, None)
        else:
            space[k] = tuple(v)
    if not space:
        raise ValueError(
            f"method {cls.name!r} declares no search_space; give one with space.<param>=[float, lo, hi]"
        )
    for k, spec in space.items():
        kind = spec[0] if spec else None
        if kind in ("int", "float"):
            if len(spec) not in (3, 4) or not spec[1] < spec[2] or (len(spec) == 4 and spec[3] != "log"):
                raise ValueError(f"space.{k} must be [{kind}, low, high] (low < high) or [{kind}, low, high, log], got {list(spec)}")
        elif kind == "categorical":
            if len(spec) != 2 or not list(spec[1]):
                raise ValueError(f"space.{k} must be [categorical, [choices...]], got {list(spec)}")
        else:
            raise ValueError(f"space.{k}: type must be one of int, float, categorical; got {kind!r}")
    return space


def suggest(trial: Any, space: dict[str, tuple]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, spec in space.items():
        if spec[0] == "float":
            out[k] = trial.suggest_float(k, float(spec[1]), float(spec[2]), log=len(spec) == 4)
        elif spec[0] == "int":
            out[k] = trial.suggest_int(k, int(spec[1]), int(spec[2]), log=len(spec) == 4)
        else:
            out[k] = trial.suggest_categorical(k, list(spec[1]))
    return out


def make_sampler(name: str, seed: int, n_initial: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_initial)
    if name == "gp":
        try:
            import scipy  # noqa: F401  (optuna's GPSampler needs it)
        except ImportError as e:
            raise ValueError("sampler=gp needs scipy (pip install scipy); or use sampler=tpe") from e
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_initial)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")


@dataclass
class TuneResult:
    method: str
    params: dict[str, Any]  # the full parameters of the best trial (as the pruner stores them)
    searched: dict[str, Any]  # the best trial's values of the search-space dimensions
    budget: int
    cost: float
    objective: float
    initial_best: float  # best objective among the initial (random) points
    kind: str
    target: float
    n_trials: int
    n_initial: int
    n_feasible: int
    history: list[dict[str, Any]] = field(default_factory=list)


def tune(
    calib: Calibration,
    method: str,
    *,
    target: float,
    kind: str = "equiv_tokens",
    base_params: dict[str, Any] | None = None,
    space: dict[str, Any] | None = None,
    n_trials: int = 60,
    n_initial: int = 10,
    sampler: str = "tpe",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Maximise `objective` over the search space with the budget solved for the constraint."""
    import optuna

    from pruners import get_pruner_class

    if kind not in ("equiv_tokens", "flops_rel"):
        raise ValueError(f"constraint kind must be 'equiv_tokens' or 'flops_rel', got {kind!r}")
    if not (isinstance(target, (int, float)) and target > 0):
        raise ValueError(f"the constraint target must be a positive number, got {target!r}")
    if n_trials < 1 or n_initial < 1:
        raise ValueError(f"n_trials and n_initial must be >= 1, got {n_trials} and {n_initial}")
    cls = get_pruner_class(method)
    sp = resolve_space(cls, space)
    base = dict(base_params or {})
    history: list[dict[str, Any]] = []

    def run_trial(trial: Any) -> float:
        params = {**base, **suggest(trial, sp)}
        solved = solve_budget(calib, method, params, kind, target, seed)
        rec: dict[str, Any] = {"number": trial.number, "params": {k: params[k] for k in sp}}
        if solved is None:
            trial.set_user_attr("feasible", False)
            value = INFEASIBLE
        else:
            budget, c = solved
            value = objective(calib, method, budget, params, seed)
            trial.set_user_attr("feasible", True)
            trial.set_user_attr("budget", budget)
            trial.set_user_attr("cost", c)
            rec.update(budget=budget, cost=c)
        rec["objective"] = value
        history.append(rec)
        if progress:
            progress(f"trial {trial.number:3d}: objective {value:.5f} budget {rec.get('budget')} "
                     f"{kind} {rec.get('cost', float('nan')):.4g} {rec['params']}")
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(sampler, seed, n_initial))
    study.optimize(run_trial, n_trials=n_trials)
    feasible = [t for t in study.trials if t.user_attrs.get("feasible")]
    if not feasible:
        raise ValueError(
            f"no trial of {method!r} met {kind} <= {target}: even budget=1 is above it for every sampled "
            f"parameter set; raise the target or widen the search space"
        )
    best = max(feasible, key=lambda t: t.value)
    initial = [t.value for t in study.trials[:n_initial]]
    params = dict(cls(budget=None, seed=seed, **{**base, **best.params}).params)
    return TuneResult(
        method=method, params=params, searched=dict(best.params), budget=int(best.user_attrs["budget"]), cost=float(best.user_attrs["cost"]),
        objective=float(best.value), initial_best=float(max(initial)), kind=kind, target=float(target),
        n_trials=n_trials, n_initial=min(n_initial, n_trials), n_feasible=len(feasible), history=history,
    )


# ---- output -------------------------------------------------------------------------------------
def target_tag(kind: str, target: float) -> str:
    """File-name tag of a target: eq36, flops0p25 (no dots: Hydra option names)."""
    num = f"{target:g}".replace(".", "p")
    return f"eq{num}" if kind == "equiv_tokens" else f"flops{num}"


def write_tuned_config(result: TuneResult, out_dir: Path, extra: dict[str, Any] | None = None, *,
                       name: str | None = None, run_args: str = "", note: str | None = None) -> Path:
    """Write ``<out_dir>/<name>.yaml`` (runner-compatible: name + variant + params, plus ``tuned``).

    ``name`` defaults to ``<method>_tuned_<tag>``; ``run_args`` (e.g. a ``hydra.searchpath=[...]``
    override, see `selection`) is appended to the commands in the file's header; ``note`` (why
    ``method=<name>`` does not select this file, see `selection`) replaces those commands, which would
    be wrong. Written atomically, replacing a file of that name: callers decide whether that is allowed
    (`output_dir`).
    """

    name = name or f"{result.method}_tuned_{target_tag(result.kind, result.target)}"
    body = {
        "name": result.method,
        "variant": name,  # the runner's label for its cells (as Hydra's method choice would be)
        "params": result.params,
        "tuned": {
            "budget": result.budget,
            "searched": result.searched,
            "target": {result.kind: result.target},
            result.kind: result.cost,
            "objective": result.objective,
            "objective_initial_best": result.initial_best,
            "objective_definition": "mean cosine similarity, pruned vs unpruned, of the last prompt token's "
                                    "final-norm hidden state at prefill, on the calibration set",
            "n_trials": result.n_trials,
            "n_initial": result.n_initial,
            "n_feasible": result.n_feasible,
            **(extra or {}),
        },
    }
    more = f" {run_args}" if run_args else ""
    header = (
        f"# {result.method} tuned by benchmarks.tune for {result.kind} <= {result.target:g} "
        f"(objective {result.objective:.5f}; best initial point {result.initial_best:.5f}).\n"
        + (f"# NOTE: {note}\n" if note else
           f"# Benchmark it: python -m benchmarks.run method={name} budgets=[{result.budget}]{more}\n"
           f"# Re-check the objective: python -m benchmarks.tune mode=evaluate method={name}{more}\n")
    )
    return write_method_yaml(Path(out_dir), name, header, body)


def write_method_yaml(out_dir: Path, name: str, header: str, body: dict[str, Any]) -> Path:
    """``out_dir/<name>.yaml``: the ``header`` comment lines, then ``body`` as YAML, written atomically
    (a temporary file renamed into place). Shared by the tuner and `benchmarks.schedule_search`."""
    from omegaconf import OmegaConf

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + OmegaConf.to_yaml(OmegaConf.create(body)))
    tmp.replace(path)
    return path


# ---- where tuned configs go, and how Hydra finds them ---------------------------------------------
def tuned_config_name(cfg: Any, method: str, kind: str, target: float) -> str:
    """``tuned_name`` or ``<method>_tuned_<tag>``: the file stem, i.e. what ``method=`` selects.

    A registered pruner's name is refused: the file would replace the registry's config of that pruner
    (the search path comes before the ConfigStore), silently changing what ``method=<pruner>`` means.
    """
    import re

    from pruners import available_pruners

    name = cfg.get("tuned_name") or f"{method}_tuned_{target_tag(kind, target)}"
    name = str(name)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"tuned_name must be letters, digits, '_' or '-' (a Hydra option name), got {name!r}")
    if name in available_pruners():
        raise ValueError(f"tuned_name={name!r} is a registered pruner; a tuned config needs its own name "
                         f"(default <method>_tuned_<target>)")
    return name


def _inside(path: Path, root: Path) -> bool:
    path, root = Path(path).resolve(), Path(root).resolve()
    return path == root or root in path.parents


def output_dir(cfg: Any) -> Path:
    """Directory the tuned config goes to: ``out_dir``, else ``conf/method`` with ``overwrite=true``, else
    ``<results_dir>/tuned/method``. Writing into the tracked ``conf/method`` needs ``overwrite=true``
    (whichever way it is named), so a tune run cannot replace a shipped config by accident."""
    overwrite = bool(cfg.get("overwrite", False))
    if cfg.get("out_dir"):
        out = Path(str(cfg.out_dir))
    elif overwrite:
        out = CONF_METHOD
    else:
        out = Path(str(cfg.get("results_dir") or "results")) / "tuned" / "method"
    if _inside(out, CONF_METHOD) and not overwrite:
        raise ValueError(f"out_dir={out} is inside the tracked {CONF_METHOD}; writing there needs overwrite=true "
                         f"(default: <results_dir>/tuned/method, out_dir=null)")
    return out


def search_roots(config_name: str = "config") -> list[Path]:
    """Directories ``conf/<config_name>.yaml``'s ``hydra.searchpath`` adds, as Hydra 1.3 reads them.

    Hydra takes ``hydra.searchpath`` from the primary config file before applying command-line overrides:
    an interpolation such as ``${results_dir}`` resolves against the file's own value, and a relative path
    is relative to the working directory. Only ``file://`` entries are returned (resolved).
    """
    from omegaconf import OmegaConf

    conf = OmegaConf.load(CONF_DIR / f"{config_name}.yaml")
    entries = OmegaConf.select(conf, "hydra.searchpath") or []
    return [Path(str(e)[len("file://"):]).resolve() for e in entries if str(e).startswith("file://")]


def selection(path: Path) -> tuple[str, str | None]:
    """How ``method=<path.stem>`` reaches ``path`` in benchmarks.run (and benchmarks.tune) from the working
    directory: (extra command-line arguments, "" if none are needed; a warning, or None).

    ``conf/method`` comes first on Hydra's search path, so a file of the same name there shadows ``path``;
    a ``<dir>/method`` directory not on ``hydra.searchpath`` needs ``hydra.searchpath=[file://<dir>]``.
    """
    path = Path(path).resolve()
    tracked = CONF_METHOD.resolve() / path.name
    if path.parent == CONF_METHOD.resolve():
        return "", None
    if tracked.exists():
        return "", (f"{tracked} (tracked) has the same name and comes first on Hydra's search path: "
                    f"method={path.stem} still composes the tracked file, not {path}. Compare them, then "
                    f"replace the tracked one with overwrite=true, or tune under another tuned_name=")
    if path.parent.name != "method":
        return "", (f"{path} is not in a 'method' directory, so method={path.stem} cannot select it; "
                    f"write it with out_dir=<dir>/method (or the default out_dir=null)")
    root = path.parent.parent
    if all(root in search_roots(c) for c in ("config", "tune")):
        return "", None
    return f"hydra.searchpath=[file://{root}]", None


def _objective_of(path: Path) -> Any:
    """The ``tuned.objective`` recorded in an existing config file (None if unreadable)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(OmegaConf.load(path), "tuned.objective")
    except Exception:  # noqa: BLE001  (a corrupt or foreign file: just no objective to report)
        return None


# ---- calibration settings -------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    """Whether two setting values are equal (``32`` and ``"32"`` are: YAML vs command line)."""
    return str(a) == str(b)


def calibration_settings(cfg: Any, mode: str, tuned: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The calibration settings to use, and where each value came from ("command line", "tuned file",
    "default").

    mode=tune: the config's value, else `CALIB_DEFAULTS`. mode=evaluate: the value stored in the tuned
    file's ``tuned:`` block when it has one, else the config's, else the default; a config value that
    differs from the stored one is a ValueError naming the setting and both values: the re-checked
    objective would silently not be comparable with the reported one. ``model`` and ``task`` (config
    groups, never null) are checked against the stored names the same way.
    """
    tuned = tuned or {}
    settings: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for group in CALIB_GROUPS:
        given, stored = str(cfg[group].name), tuned.get(group)
        if mode == "evaluate" and stored is not None and not _same(given, stored):
            raise ValueError(f"mode=evaluate: {group}={given} differs from the {group} the tuned file was "
                             f"calibrated with (tuned.{group}={stored}); pass {group}={stored}")
        settings[group] = given
        sources[group] = "tuned file (checked)" if mode == "evaluate" and stored is not None else "config"
    for key, default in CALIB_DEFAULTS.items():
        given = cfg.get(key)
        stored = tuned.get(key) if mode == "evaluate" else None
        if stored is not None:
            if given is not None and not _same(given, stored):
                raise ValueError(
                    f"mode=evaluate: {key}={given} differs from the {key}={stored} stored in the tuned file "
                    f"(tuned.{key}), so the objective would not be comparable with the reported one; drop "
                    f"{key}= to use the stored value (to evaluate these parameters on other calibration "
                    f"data, drop the record instead: method.tuned=null budget=<tokens> {key}={given})")
            value, source = stored, "tuned file"
        elif given is not None:
            value, source = given, "command line"
        else:
            value, source = default, "default"
        settings[key] = type(default)(value)
        sources[key] = source
    if settings["calib_samples"] < 1:
        raise ValueError(f"calib_samples must be >= 1, got {settings['calib_samples']}")
    if settings["batch_size"] < 1:
        raise ValueError(f"batch_size must be >= 1, got {settings['batch_size']}")
    return settings, sources


# ---- Hydra entry point ----------------------------------------------------------------------------
def _constraint(cfg: Any) -> tuple[str, float]:
    eq, fr = cfg.get("target_equiv_tokens"), cfg.get("target_flops_rel")
    if (eq is None) == (fr is None):
        raise ValueError("give exactly one of target_equiv_tokens=<tokens> or target_flops_rel=<fraction>")
    return ("equiv_tokens", float(eq)) if eq is not None else ("flops_rel", float(fr))


def run(cfg: Any) -> dict[str, Any]:
    """Tune (``mode=tune``) or re-evaluate a config (``mode=evaluate``); returns a summary dict.

    Everything that can be checked without the model (mode, calibration settings, output path) is
    checked before it is loaded.
    """
    from omegaconf import OmegaConf

    from benchmarks.models import load_model
    from benchmarks.run import AUTO, validate_budgets
    from benchmarks.tasks import get_task
    from pruners import get_pruner_class

    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    mode = str(cfg.get("mode", "tune"))
    if mode not in ("tune", "evaluate"):
        raise ValueError(f"mode must be 'tune' or 'evaluate', got {mode!r}")
    method = str(cfg.method.name)
    params = OmegaConf.to_container(cfg.method.get("params") or {}, resolve=True)
    tuned = cfg.method.get("tuned") or {}
    calib_cfg, sources = calibration_settings(cfg, mode, tuned)
    seed = calib_cfg["seed"]
    if mode == "tune":
        kind, target = _constraint(cfg)
        name = tuned_config_name(cfg, method, kind, target)
        out_dir = output_dir(cfg)
    device = "cuda" if str(cfg.device) == "auto" and torch.cuda.is_available() else (
        "cpu" if str(cfg.device) == "auto" else str(cfg.device))
    lm = load_model(cfg.model, device)
    budget = None
    if mode == "evaluate":  # checked like the runner's budgets, before the calibration set is encoded
        raw = cfg.get("budget") if cfg.get("budget") is not None else tuned.get("budget")
        (budget,) = validate_budgets([raw], lm.num_visual_tokens, lm.name, size_dependent=lm.size_dependent)
        if budget == AUTO:
            raise ValueError(f"mode=evaluate needs budget=<tokens> or null, got {AUTO!r}")
    task = get_task(str(cfg.task.name))
    split = calib_cfg["calib_split"]
    samples = task.samples(split=split, n=calib_cfg["calib_samples"], seed=seed)
    calib = build_calibration(lm.model, lm.processor, [s.image for s in samples],
                              [lm.prompt(s.question) for s in samples], calib_cfg["batch_size"])
    used = ", ".join(f"{k}={v} ({sources[k]})" for k, v in calib_cfg.items())
    if mode == "evaluate":
        value = objective(calib, method, None if budget is None else int(budget), params, seed)
        counts = token_counts(calib, method, int(budget), params, seed) if budget is not None else None
        summary = {"method": method, "budget": budget, "objective": value,
                   "reported": tuned.get("objective"),
                   "equiv_tokens": cost(calib, counts, "equiv_tokens") if counts else None,
                   "flops_rel": cost(calib, counts, "flops_rel") if counts else None,
                   "calibration": calib_cfg, "calibration_source": sources}
        log.info("evaluate: calibration %s", used)
        log.info("evaluate: %s", summary)
        print(summary)
        return summary
    space = OmegaConf.to_container(cfg.space, resolve=True) if cfg.get("space") else None
    result = tune(calib, method, target=target, kind=kind, base_params=params, space=space,
                  n_trials=int(cfg.n_trials), n_initial=int(cfg.n_initial), sampler=str(cfg.sampler),
                  seed=seed, progress=print if cfg.get("progress", True) else None)
    extra = {**calib_cfg, "sampler": str(cfg.sampler),
             "search_space": {k: list(v) for k, v in resolve_space(get_pruner_class(method), space).items()},
             "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    path = out_dir / f"{name}.yaml"
    if path.exists():
        log.warning("replacing %s (objective %s) with the new result (objective %.5f)%s", path,
                    _objective_of(path), result.objective, " [overwrite=true]" if cfg.get("overwrite") else "")
    run_args, warning = selection(path)
    path = write_tuned_config(result, out_dir, extra, name=name, run_args=run_args, note=warning)
    log.info("tune: wrote %s; calibration %s", path, used)
    if warning:
        log.warning("%s", warning)
    command = f"python -m benchmarks.run method={name} budgets=[{result.budget}]" + (f" {run_args}" if run_args else "")
    summary = {"path": str(path), "objective": result.objective, "objective_initial_best": result.initial_best,
               "budget": result.budget, kind: result.cost, "searched": result.searched,
               "calibration": calib_cfg, "benchmark": None if warning else command}
    print(summary)
    return summary


def _main() -> None:
    import warnings

    import hydra

    # no <results_dir>/tuned yet (nothing tuned): an empty search-path entry, not a problem worth a warning
    warnings.filterwarnings("ignore", message=r"provider=hydra\.searchpath in main, path=.*tuned is not available")

    @hydra.main(config_path="../conf", config_name="tune", version_base="1.3")
    def main(cfg: Any) -> None:
        run(cfg)

    main()


if __name__ == "__main__":
    _main()
