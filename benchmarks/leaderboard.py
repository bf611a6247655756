"""Aggregate finished cells: ``python -m benchmarks.leaderboard results_dir=results``.

Writes, under ``results_dir``:
- ``cells.csv``: one row per cell (each ``method_seed`` its own row), columns `CELL_COLUMNS` first;
- ``leaderboard.csv``: one row per *point*, the cells that differ only by ``method_seed`` averaged
  (``accuracy`` is their mean, ``accuracy_std`` the sample std over seeds, ``n_seeds`` their count),
  columns `COLUMNS` first, with 95% intervals and ``delta_vs_best`` (a paired bootstrap against the
  best variant at the same budget on the same samples);
- ``plots/{pareto,tokens,latency}_<model>_<task>.png``: accuracy vs relative prefill FLOPs (TFLOPs on
  top), vs equivalent visual tokens and vs measured prefill latency (`benchmarks.plots`);
- ``schema.json``: the unit and meaning of every CSV column (`benchmarks.csv_schema`; the CSVs are
  rounded per unit, the tables returned here are not);
- ``summary.csv`` / ``.md`` / ``.tex``: the papers' method x task table per token level (`benchmarks.summary`);
- ``auc.csv``: per (model, task, weights, n_samples, seed, variant) the area under accuracy vs FLOPs
  fraction over the FLOPs range every variant of that sample set covers, divided by its width (a mean
  accuracy): variants ranked at equal compute rather than at equal nominal budget; plus the accuracy
  at fixed FLOPs fractions.

A *sample set* is (model, task, weights, n_samples, seed): only cells scored on the same samples are
compared. Lines, AUC rows and deltas never mix variants or sample sets, and ``accuracy_rel`` is
recomputed here from the unpruned reference cell (method ``none``, budget null) of the same sample set.
Cell folders that cannot be read are named in a warning each and returned by `write_all` (key
``unreadable``); everything else is still aggregated.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from benchmarks import intervals, store

log = logging.getLogger(__name__)

#: leaderboard.csv (one row per point: cells that differ only by method_seed, averaged), in this order.
COLUMNS = [
    "model", "task", "method", "variant", "budget", "equiv_tokens", "accuracy", "accuracy_ci95_lo",
    "accuracy_ci95_hi", "accuracy_std", "n_seeds", "accuracy_rel", "accuracy_rel_ci95_lo", "accuracy_rel_ci95_hi",
    "delta_vs_best", "delta_vs_best_ci95_lo", "delta_vs_best_ci95_hi", "tflops_prefill", "flops_rel", "prefill_ms",
    "decode_ms_per_token", "kv_cache_mb", "peak_mem_mb", "n_samples", "seed", "params", "weights", "config_hash",
]
#: the per-cell diagnostics (docs/benchmarks.md "Diagnostics"): the last prompt token's visual attention
#: share and Modality Dominance Index (layer means) of this cell and of the unpruned reference ("_before"),
#: the share of the kept visual tokens that are attention sinks and the share of the sinks kept
DIAGNOSTIC_COLUMNS = ["attn_visual_share", "attn_visual_share_before", "mdi", "mdi_before", "sink_share_of_kept",
                      "sinks_kept"]
EXTRAS = ["relevant_recall", "vision_tflops", "llm_tflops", "projector_tflops", "overhead_tflops",
          "visual_tokens_in", "within_budget", *DIAGNOSTIC_COLUMNS]
#: text columns after `EXTRAS` (not averaged: a point keeps its first seed's): why the sink shares are empty
TEXT_EXTRAS = ["sink_reason"]
#: cells.csv (one row per cell), in this order; ``cell`` is the folder relative to results_dir.
CELL_COLUMNS = [c for c in COLUMNS if c not in ("accuracy_std", "n_seeds") and not c.startswith("delta_")]
CELL_COLUMNS.insert(CELL_COLUMNS.index("seed") + 1, "method_seed")
CELL_COLUMNS.append("cell")


class LineKey(NamedTuple):
    """What one plot line (and one auc.csv row) is: a variant on one sample set."""

    model: str
    task: str
    weights: Any
    n_samples: int
    seed: Any
    method: str
    variant: str


#: A sample set: cells with equal values here were scored on the same samples.
SAMPLE_KEYS = list(LineKey._fields[:5])
REF_KEYS = SAMPLE_KEYS  # the unpruned reference of a cell is the one of its sample set
LINE_KEYS = list(LineKey._fields)
#: Cells with equal values here differ only by method_seed and are averaged into one point.
#: ``params`` is part of it so that two configurations sharing a variant label are never averaged.
POINT_KEYS = [*LINE_KEYS, "params", "_budget_key"]
#: Per-cell figures averaged over the seeds of a point (accuracy families are added as found).
MEAN_COLUMNS = ["equiv_tokens", "accuracy", "accuracy_ci95_lo", "accuracy_ci95_hi", "accuracy_rel_ci95_lo",
                "accuracy_rel_ci95_hi", "tflops_prefill", "flops_rel", "prefill_ms", "decode_ms_per_token",
                "kv_cache_mb", "peak_mem_mb", *EXTRAS]
#: FLOPs fractions at which auc.csv also reports each variant's interpolated accuracy (NaN outside its range).
FLOPS_POINTS = (0.25, 0.5, 0.75)

#: Per-sample scores by cell (or point) id: {config_hash: {sample id: score}}.
Scores = dict[str, dict[str, float]]


@dataclass
class Tables:
    """Everything the leaderboard computes from one results directory."""

    board: pd.DataFrame  # leaderboard.csv: one row per point
    cells: pd.DataFrame  # cells.csv: one row per cell
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    scores: Scores = field(default_factory=dict)  # per-sample scores of the points (by config_hash)


# ---- reading cells ------------------------------------------------------------------------------
def scan(results_dir: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The readable cell folders and (folder, reason) for every unreadable one, each logged as a
    warning: a damaged cell is named and left out instead of stopping the whole aggregation."""
    good, bad = [], []
    for folder in store.cell_folders(results_dir):
        why = store.cell_problem(folder)
        if why is None:
            good.append(folder)
        else:
            bad.append((folder, why))
            log.warning("leaderboard: unreadable cell %s (%s): left out", folder, why)
    return good, bad


def _budget_key(budget: Any) -> str:
    """A budget as a group key: ``null`` (the unpruned reference) and ``auto`` stay apart, although
    both are empty in the numeric ``budget`` column."""
    if budget is None or budget == "auto":
        return "null" if budget is None else "auto"
    return f"{budget:g}" if isinstance(budget, float) else str(int(budget))


def _interval(value: Any) -> tuple[float, float]:
    """A stored ``[lo, hi]`` as floats, (nan, nan) when absent."""
    return (float(value[0]), float(value[1])) if isinstance(value, (list, tuple)) and len(value) == 2 else (np.nan,) * 2


def read_scores(cell: Path) -> dict[str, float]:
    """Per-sample scores of a cell by sample id (rows without an ``id`` are keyed by their position)."""
    rows = store.read_predictions(cell)
    return {str(r.get("id", i)): float(r["score"]) for i, r in enumerate(rows) if r.get("score") is not None}


def cell_row(cell: Path, metrics: dict[str, Any], scores: dict[str, float], results_dir: Path) -> dict[str, Any]:
    """One cells.csv row from a cell's metrics.json, with the defaults of fields older cells lack:
    ``variant`` = the method, ``method_seed`` = ``seed``, ``accuracy_ci95`` = the Wilson interval
    of its predictions."""
    row: dict[str, Any] = {c: metrics.get(c) for c in CELL_COLUMNS + EXTRAS + TEXT_EXTRAS}
    row["variant"] = metrics.get("variant") or metrics["method"]
    row["method_seed"] = metrics.get("method_seed", metrics.get("seed"))
    row["params"] = json.dumps(metrics.get("params", {}), sort_keys=True)
    ci = metrics.get("accuracy_ci95") or (intervals.wilson_interval(list(scores.values())) if scores else None)
    row["accuracy_ci95_lo"], row["accuracy_ci95_hi"] = _interval(ci)
    row["accuracy_rel_ci95_lo"], row["accuracy_rel_ci95_hi"] = _interval(metrics.get("accuracy_rel_ci95"))
    row["cell"] = str(cell.relative_to(results_dir))
    row["_budget_key"] = _budget_key(metrics["budget"])
    row["_written"] = (cell / store.METRICS).stat().st_mtime
    for fam, acc in (metrics.get("accuracy_by_family") or {}).items():
        row[f"accuracy_{fam}"] = acc
    return row


def load(results_dir: str | Path) -> tuple[pd.DataFrame, Scores, list[tuple[Path, str]]]:
    """(one row per readable cell, per-sample scores by config_hash, the unreadable folders)."""
    results_dir = Path(results_dir)
    folders, unreadable = scan(results_dir)
    rows, scores = [], {}
    for cell in folders:
        try:
            metrics = store.read_metrics(cell)
            cell_scores = read_scores(cell)
            row = cell_row(cell, metrics, cell_scores, results_dir)
        except (OSError, ValueError, KeyError, TypeError) as e:  # replaced or damaged since the scan
            unreadable.append((cell, f"{type(e).__name__}: {e}"))
            log.warning("leaderboard: unreadable cell %s (%s: %s): left out", cell, type(e).__name__, e)
            continue
        rows.append(row)
        scores[row["config_hash"]] = cell_scores
    df = pd.DataFrame(rows, columns=None if rows else CELL_COLUMNS + EXTRAS + TEXT_EXTRAS)
    if df.empty:
        return df, scores, unreadable
    # "auto" cells (the method chose its token count; see equiv_tokens and params) have no numeric budget
    numeric = pd.to_numeric(df["budget"].replace("auto", np.nan))
    # token counts stay integers; with fractions (0 < f < 1) in the table the column is float
    df["budget"] = numeric.astype("Int64") if bool((numeric.dropna() % 1 == 0).all()) else numeric
    numeric = [c for c in MEAN_COLUMNS if c in df] + _families(df)
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    dupes = df["config_hash"].duplicated(keep=False)
    if dupes.any():
        raise RuntimeError(f"duplicated cells in {results_dir} (one config_hash in several folders): "
                           f"{sorted(df.loc[dupes, 'cell'])}")
    return latest_weights(df).drop(columns="_written"), scores, unreadable


def load_cells(results_dir: str | Path) -> pd.DataFrame:
    """One row per readable cell (see `load`)."""
    return load(results_dir)[0]


def _families(df: pd.DataFrame) -> list[str]:
    """The ``accuracy_<family>`` columns (per question family), sorted."""
    known = set(COLUMNS) | set(CELL_COLUMNS)
    return sorted(c for c in df.columns if c.startswith("accuracy_") and c not in known)


def latest_weights(df: pd.DataFrame) -> pd.DataFrame:
    """Per model name, only the cells of its most recently written weights (``weights`` fingerprint):
    a retrained or swapped checkpoint under the same name must not share curves with the old one.
    The set-aside cells stay on disk; a warning says how many."""
    w = df["weights"].fillna("")
    newest = df.assign(_w=w).sort_values("_written").groupby("model")["_w"].last()
    keep = w == df["model"].map(newest)
    if not keep.all():
        log.warning("leaderboard: %d cell(s) of older weights set aside (%s)", int((~keep).sum()),
                    ", ".join(sorted(df.loc[~keep, "model"].unique())))
    return df[keep].reset_index(drop=True)


# ---- relative accuracy, seeds, deltas -----------------------------------------------------------
def is_reference(df: pd.DataFrame) -> pd.Series:
    """The unpruned reference rows (method ``none``, budget null)."""
    return (df["method"] == "none") & df["budget"].isna()


def _references(df: pd.DataFrame) -> pd.DataFrame:
    """Per sample set, its reference's accuracy (``_ref_acc``) and id (``_ref_hash``)."""
    ref = df[is_reference(df)].drop_duplicates(REF_KEYS)
    return ref[REF_KEYS + ["accuracy", "config_hash"]].rename(
        columns={"accuracy": "_ref_acc", "config_hash": "_ref_hash"})


def add_relative(df: pd.DataFrame) -> pd.DataFrame:
    """Fill ``accuracy_rel`` from the unpruned reference row of the same sample set (`REF_KEYS`)."""
    if df.empty:
        return df
    out = df.merge(_references(df), on=REF_KEYS, how="left")
    out["accuracy_rel"] = np.where(out["_ref_acc"] > 0, out["accuracy"] / out["_ref_acc"], np.nan)
    return out.drop(columns=["_ref_acc", "_ref_hash"])


def _bootstrap_seed(seed: Any) -> int:
    """The bootstrap's seed: the run's (sample) seed, as the runner does, 0 when unknown."""
    return 0 if seed is None or pd.isna(seed) else int(seed)


def _paired_interval(a: dict[str, float], b: dict[str, float], statistic: Callable[..., np.ndarray],
                     seed: Any) -> tuple[float, float]:
    """`paired_bootstrap` of ``statistic`` over the samples ``a`` and ``b`` share; (nan, nan) if undefined."""
    x, y = intervals.paired_scores(a, b)
    ci = intervals.paired_bootstrap(x, y, statistic, seed=_bootstrap_seed(seed)) if x else None
    return (np.nan, np.nan) if ci is None else ci


def add_rel_intervals(df: pd.DataFrame, scores: Scores) -> pd.DataFrame:
    """Fill a missing ``accuracy_rel_ci95`` (a cell written before its reference, or by an older
    runner) with the paired bootstrap of accuracy / reference accuracy over the shared samples."""
    out = df.merge(_references(df), on=REF_KEYS, how="left")
    todo = out["accuracy_rel_ci95_lo"].isna() & out["_ref_hash"].notna()
    for i in out.index[todo]:
        r = out.loc[i]
        out.loc[i, ["accuracy_rel_ci95_lo", "accuracy_rel_ci95_hi"]] = _paired_interval(
            scores[r["config_hash"]], scores[r["_ref_hash"]], intervals.ratio_of_means, r["seed"])
    return out.drop(columns=["_ref_acc", "_ref_hash"])


def aggregate_seeds(cells: pd.DataFrame, scores: Scores) -> tuple[pd.DataFrame, Scores]:
    """One row per point (`POINT_KEYS`): cells that differ only by ``method_seed`` averaged.

    Figures in `MEAN_COLUMNS` and the families are means over the seeds (so a point's interval is
    the mean of its seeds' interval ends: the uncertainty of one run over these samples);
    ``accuracy_std`` is the sample standard deviation over seeds (ddof=1; NaN for a single seed,
    whose spread is not measured); ``n_seeds`` counts them; ``config_hash`` lists the cells'
    hashes joined by ``,``. Also returns the points' per-sample scores (the mean over seeds per
    sample id), keyed by that ``config_hash``.
    """
    keyed = cells.sort_values("method_seed", kind="stable")
    groups = keyed.groupby(POINT_KEYS, dropna=False, sort=False)
    means = [c for c in MEAN_COLUMNS + _families(cells) if c in cells]
    points = groups.first()
    # first() skips missing values: keys stay exact, but a mean column all-NaN in a seed is averaged below
    points[means] = groups[means].mean()
    points["accuracy_std"] = groups["accuracy"].std(ddof=1)
    points["n_seeds"] = groups.size()
    points["config_hash"] = groups["config_hash"].agg(",".join)
    points = points.reset_index().drop(columns=["method_seed", "cell"], errors="ignore")
    point_scores = {}
    for hashes in points["config_hash"]:
        per_seed = pd.DataFrame([scores[h] for h in hashes.split(",")])
        point_scores[hashes] = per_seed.mean(axis=0).to_dict()
    return points, point_scores


def add_deltas(points: pd.DataFrame, scores: Scores) -> pd.DataFrame:
    """``delta_vs_best``: accuracy minus the best variant's at the same budget on the same sample
    set, and its 95% paired-bootstrap interval over the samples both scored (matched by id)."""
    out = points.assign(delta_vs_best=np.nan, delta_vs_best_ci95_lo=np.nan, delta_vs_best_ci95_hi=np.nan)
    for _, g in points.groupby(SAMPLE_KEYS + ["_budget_key"], dropna=False, sort=False):
        best = g.loc[g["accuracy"].idxmax()]
        for i, r in g.iterrows():
            out.loc[i, "delta_vs_best"] = r["accuracy"] - best["accuracy"]
            out.loc[i, ["delta_vs_best_ci95_lo", "delta_vs_best_ci95_hi"]] = _paired_interval(
                scores[r["config_hash"]], scores[best["config_hash"]], intervals.difference_of_means, r["seed"])
    return out


def warn_shared_variants(points: pd.DataFrame) -> None:
    """Warn when one variant has several parameter sets at one budget (e.g. cells of an older runner,
    which did not record the variant): their points would share one line."""
    counts = points.groupby(LINE_KEYS + ["_budget_key"], dropna=False)["params"].nunique()
    for key, n in counts[counts > 1].items():
        k = dict(zip(LINE_KEYS + ["_budget_key"], key, strict=True))
        log.warning("leaderboard: variant %r of %s/%s has %d parameter sets at budget %s (see params); name "
                    "each configuration (method.variant=...) to give it its own line", k["variant"], k["model"],
                    k["task"], n, k["_budget_key"])


def _ordered(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``columns``, then `EXTRAS`, `TEXT_EXTRAS` and the family accuracies, sorted by model, task, method, variant,
    sample set and budget (unpruned first, then descending)."""
    df = df.sort_values(["model", "task", "method", "variant", "n_samples", "seed", "budget"],
                        ascending=[True, True, True, True, True, True, False], na_position="first", kind="stable")
    return df[columns + EXTRAS + TEXT_EXTRAS + _families(df)].reset_index(drop=True)


def tables(results_dir: str | Path) -> Tables:
    """The per-point leaderboard, the per-cell table and the unreadable cells of ``results_dir``."""
    cells, scores, unreadable = load(results_dir)
    if cells.empty:
        return Tables(cells, cells, unreadable)
    cells = add_rel_intervals(add_relative(cells), scores)
    points, point_scores = aggregate_seeds(cells, scores)
    points = add_deltas(add_relative(points), point_scores)
    warn_shared_variants(points)
    return Tables(_ordered(points, COLUMNS), _ordered(cells, CELL_COLUMNS), unreadable, point_scores)


def leaderboard(results_dir: str | Path) -> pd.DataFrame:
    """The leaderboard table (one row per point), sorted by model, task, method, variant, sample
    set, budget (unpruned first, then descending)."""
    return tables(results_dir).board


# ---- curves, AUC, plots -------------------------------------------------------------------------
def pareto_front(flops: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats (less or equal FLOPs and higher accuracy), by FLOPs."""
    order = np.lexsort((-acc, flops))
    front, best = [], -np.inf
    for i in order:
        if acc[i] > best:
            front.append(i)
            best = acc[i]
    return np.array(front, dtype=int)


def method_curves(df: pd.DataFrame) -> dict[LineKey, pd.DataFrame]:
    """Per line (a variant on one sample set), its points plus the unpruned reference of that same
    sample set, sorted by FLOPs."""
    df = df.assign(_set=df.groupby(SAMPLE_KEYS, dropna=False, sort=False).ngroup())
    ref = df[is_reference(df)]
    curves = {}
    for key, g in df[df["method"] != "none"].groupby(LINE_KEYS, dropna=False, sort=False):
        line = pd.concat([g, ref[ref["_set"].isin(g["_set"])]]).drop_duplicates("config_hash")
        curves[LineKey(*key)] = line.sort_values("flops_rel", kind="stable").drop(columns="_set")
    return curves


def auc_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy over the common FLOPs-fraction range, per line (`LINE_KEYS`), ranked per sample set.

    Within a sample set, the range runs from the largest per-variant minimum of ``flops_rel`` to 1
    (the unpruned model), so every variant's curve covers it; each curve is interpolated linearly in
    ``flops_rel``. The ``acc_at_flops_<q>`` columns give the accuracy at FLOPs fraction q where the
    variant's own curve reaches it, so variants that compress further than the common range are
    compared there too. Different sample sets are never ranked against each other.
    """
    out = []
    for _, group in df.groupby(SAMPLE_KEYS, dropna=False, sort=True):
        curves = {k: c for k, c in method_curves(group).items() if len(c) >= 2}
        if not curves:
            continue
        lo = max(float(c["flops_rel"].min()) for c in curves.values())
        hi = min(float(c["flops_rel"].max()) for c in curves.values())
        for key, c in curves.items():
            out.append({**key._asdict(), **_curve_auc(c, lo, hi)})
    at_cols = [f"acc_at_flops_{q:.2f}" for q in FLOPS_POINTS]
    table = pd.DataFrame(out, columns=[*LINE_KEYS, "auc_accuracy", "flops_rel_lo", "flops_rel_hi", "n_points",
                                       *at_cols])
    rank = table.groupby(SAMPLE_KEYS, dropna=False)["auc_accuracy"].rank(ascending=False, method="min")
    table.insert(len(LINE_KEYS), "rank", rank.astype("Int64"))
    return table.sort_values([*SAMPLE_KEYS, "rank"], kind="stable").reset_index(drop=True)


def _curve_auc(c: pd.DataFrame, lo: float, hi: float) -> dict[str, Any]:
    """One curve's mean accuracy over [lo, hi] (exact trapezoids) and its accuracy at `FLOPS_POINTS`."""
    x, y = c["flops_rel"].to_numpy(float), c["accuracy"].to_numpy(float)
    # the curve's own breakpoints inside the range make the trapezoid rule exact
    grid = np.unique(np.concatenate([[lo, hi], x[(x > lo) & (x < hi)]]))
    if hi > lo:
        y_grid = np.interp(grid, x, y)
        auc = float(np.sum(np.diff(grid) * (y_grid[1:] + y_grid[:-1]) / 2) / (hi - lo))
    else:
        auc = float(np.interp(lo, x, y))
    at = {f"acc_at_flops_{q:.2f}": (float(np.interp(q, x, y)) if x.min() <= q <= x.max() else np.nan)
          for q in FLOPS_POINTS}
    return {"auc_accuracy": auc, "flops_rel_lo": lo, "flops_rel_hi": hi, "n_points": len(c), **at}


def _set_labeller(sets: set[tuple[Any, Any]]) -> Callable[[Any, Any], str]:
    """A function (n_samples, seed) -> legend suffix naming the sample set, empty when the plot has
    one; the seed is named only when sample sets differ by it."""
    several_n = len({n for n, _ in sets}) > 1
    several_seeds = len({s for _, s in sets}) > 1

    def label(n: Any, seed: Any) -> str:
        parts = ([f"n={n}"] if len(sets) > 1 and (several_n or not several_seeds) else []) + (
            [f"seed={seed}"] if several_seeds else [])
        return ", ".join(parts)

    return label


def line_labels(curves: dict[LineKey, pd.DataFrame]) -> dict[LineKey, str]:
    """Legend label per line: its variant, plus the sample set when the plot shows several, plus the
    number of pruner seeds when its points average several."""
    suffix = _set_labeller({(k.n_samples, k.seed) for k in curves})
    labels = {}
    for key, c in curves.items():
        seeds = int(c.loc[c["method"] != "none", "n_seeds"].max()) if "n_seeds" in c else 1
        parts = [p for p in (suffix(key.n_samples, key.seed), f"{seeds} seeds" if seeds > 1 else "") if p]
        labels[key] = key.variant + (f" ({', '.join(parts)})" if parts else "")
    return labels


# ---- writing ------------------------------------------------------------------------------------
def write_all(results_dir: str | Path) -> dict[str, Any]:
    """Write leaderboard.csv, cells.csv, auc.csv (rounded, with ``schema.json``: `benchmarks.csv_schema`),
    the figures of `benchmarks.plots` per (model, task) and the summary tables.

    Returns their paths (``leaderboard``, ``cells``, ``auc``, ``plots``), the tables (``table``,
    ``cells_table``, ``auc_table``) and ``unreadable``: (folder, reason) of every cell left out.
    """
    results_dir = Path(results_dir)
    t = tables(results_dir)
    if t.board.empty:
        bad = f" ({len(t.unreadable)} unreadable: {', '.join(str(p) for p, _ in t.unreadable)})" if t.unreadable else ""
        raise FileNotFoundError(f"no finished cells under {results_dir / store.CELLS}{bad}; run benchmarks.run first")
    from benchmarks.csv_schema import write_csv
    from benchmarks.plots import write_plots
    from benchmarks.summary import write_summary

    board, cells_path, auc_path = (results_dir / n for n in ("leaderboard.csv", "cells.csv", "auc.csv"))
    write_csv(t.board, board, keep=COLUMNS)
    write_csv(t.cells, cells_path, keep=CELL_COLUMNS)
    auc = auc_table(t.board)
    write_csv(auc, auc_path, keep=[c for c in auc.columns if not c.startswith("acc_at_flops_")])
    plots = write_plots(t.board, results_dir)

    summary = write_summary(results_dir, t.board, t.scores)  # the papers' method x task table (docs/tasks.md)
    return {"leaderboard": board, "cells": cells_path, "auc": auc_path, "plots": plots, "table": t.board,
            "cells_table": t.cells, "auc_table": auc, "unreadable": t.unreadable, "summary": summary}


#: What the CLI prints of the leaderboard.
SHOWN = ["model", "task", "variant", "budget", "n_samples", "accuracy", "accuracy_ci95_lo", "accuracy_ci95_hi",
         "n_seeds", "accuracy_rel", "delta_vs_best", "flops_rel"]


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m benchmarks.leaderboard results_dir=DIR`` (OmegaConf dot-list arguments)."""
    from omegaconf import OmegaConf

    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    unknown = set(args.keys()) - {"results_dir"}
    if unknown:
        raise SystemExit(f"unknown argument(s) {sorted(unknown)}; accepted: results_dir=DIR")
    report(args.get("results_dir", "results"))


def report(results_dir: str | Path) -> dict[str, Any]:
    """`write_all`, then print the leaderboard, the AUC table and what was written (what the CLI shows;
    the runner calls it with ``leaderboard=true``, in its own process). Returns `write_all`'s dict."""
    out = write_all(results_dir)
    with pd.option_context("display.width", 200, "display.max_columns", len(SHOWN)):
        print(out["table"][SHOWN].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        if len(out["auc_table"]):
            print("\nAUC of accuracy vs FLOPs fraction (common range per sample set):")
            print(out["auc_table"].drop(columns=["weights"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for folder, why in out["unreadable"]:
        print(f"unreadable cell, left out: {folder} ({why})")
    written = [out["leaderboard"], out["cells"], out["auc"], *out["plots"], *out["summary"].values()]
    print("\nwrote " + ", ".join(str(p) for p in written))
    return out


if __name__ == "__main__":
    main()
