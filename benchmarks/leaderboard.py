"""Aggregate finished cells: ``python -m benchmarks.leaderboard results_dir=results``.

Writes, under ``results_dir``:
- ``leaderboard.csv``: one row per cell, columns in `COLUMNS` order (then a few extras);
- ``plots/pareto_<model>_<task>.png``: accuracy vs prefill TFLOPs, one line per method, the Pareto
  frontier over all methods highlighted and the unpruned point marked;
- ``auc.csv``: per (model, task, method) the area under accuracy vs FLOPs fraction over the FLOPs
  range every method covers, divided by its width (a mean accuracy): methods ranked at equal
  compute rather than at equal nominal budget; plus the accuracy at fixed FLOPs fractions.

``accuracy_rel`` is recomputed here from the unpruned reference cell (method ``none``, budget
null) of the same model, task, sample count and seed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import store

log = logging.getLogger(__name__)

COLUMNS = [
    "model", "task", "method", "budget", "equiv_tokens", "accuracy", "accuracy_rel", "tflops_prefill",
    "flops_rel", "prefill_ms", "decode_ms_per_token", "kv_cache_mb", "peak_mem_mb", "n_samples", "seed",
    "params", "weights", "config_hash",
]
EXTRAS = ["relevant_recall", "vision_tflops", "llm_tflops", "projector_tflops", "overhead_tflops",
          "visual_tokens_in", "within_budget"]
REF_KEYS = ["model", "task", "weights", "n_samples", "seed"]
#: FLOPs fractions at which auc.csv also reports each method's interpolated accuracy (NaN outside its range).
FLOPS_POINTS = (0.25, 0.5, 0.75)


def load_cells(results_dir: str | Path) -> pd.DataFrame:
    """One row per finished cell, columns `COLUMNS` + `EXTRAS` (+ ``accuracy_<family>``)."""
    rows = []
    for cell in store.iter_cells(results_dir):
        m = store.read_metrics(cell)
        row: dict[str, Any] = {c: m.get(c) for c in COLUMNS + EXTRAS}
        row["params"] = json.dumps(m.get("params", {}), sort_keys=True)
        row["_written"] = (Path(cell) / store.METRICS).stat().st_mtime
        for fam, acc in (m.get("accuracy_by_family") or {}).items():
            row[f"accuracy_{fam}"] = acc
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else COLUMNS + EXTRAS)
    if df.empty:
        return df
    # "auto" cells (the method chose its token count; see equiv_tokens and params) have no numeric budget
    df["budget"] = pd.to_numeric(df["budget"].replace("auto", np.nan)).astype("Int64")
    dupes = df["config_hash"].duplicated(keep=False)
    if dupes.any():
        raise RuntimeError(f"duplicated cells in {results_dir}: {sorted(df.loc[dupes, 'config_hash'].unique())}")
    return latest_weights(df).drop(columns="_written")


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


def add_relative(df: pd.DataFrame) -> pd.DataFrame:
    """Fill ``accuracy_rel`` from the unpruned reference row of the same (model, task, n_samples, seed)."""
    if df.empty:
        return df
    ref = df[(df["method"] == "none") & df["budget"].isna()].drop_duplicates(REF_KEYS)
    ref = ref[REF_KEYS + ["accuracy"]].rename(columns={"accuracy": "_ref_acc"})
    out = df.merge(ref, on=REF_KEYS, how="left")
    out["accuracy_rel"] = np.where(out["_ref_acc"] > 0, out["accuracy"] / out["_ref_acc"], np.nan)
    return out.drop(columns="_ref_acc")


def leaderboard(results_dir: str | Path) -> pd.DataFrame:
    """The leaderboard table, sorted by model, task, method, budget (unpruned first, then descending)."""
    df = add_relative(load_cells(results_dir))
    if df.empty:
        return df
    df = df.sort_values(["model", "task", "method", "budget"], ascending=[True, True, True, False],
                        na_position="first", kind="stable")
    families = sorted(c for c in df.columns if c.startswith("accuracy_") and c not in COLUMNS)
    return df[COLUMNS + EXTRAS + families].reset_index(drop=True)


def pareto_front(flops: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats (less or equal FLOPs and higher accuracy), by FLOPs."""
    order = np.lexsort((-acc, flops))
    front, best = [], -np.inf
    for i in order:
        if acc[i] > best:
            front.append(i)
            best = acc[i]
    return np.array(front, dtype=int)


def method_curves(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per method, its cells plus the shared unpruned reference, sorted by FLOPs."""
    ref = df[(df["method"] == "none") & df["budget"].isna()]
    curves = {}
    for method, g in df[df["method"] != "none"].groupby("method"):
        curves[method] = pd.concat([g, ref]).drop_duplicates("config_hash").sort_values("flops_rel")
    return curves


def auc_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy over the common FLOPs-fraction range, per (model, task, method).

    The range runs from the largest per-method minimum of ``flops_rel`` to 1 (the unpruned model),
    so every method's curve covers it; each curve is interpolated linearly in ``flops_rel``. The
    ``acc_at_flops_<q>`` columns give the accuracy at FLOPs fraction q where the method's own curve
    reaches it, so methods that compress further than the common range are compared there too.
    """
    out = []
    for (model, task), group in df.groupby(["model", "task"]):
        curves = {m: c for m, c in method_curves(group).items() if len(c) >= 2}
        if not curves:
            continue
        lo = max(float(c["flops_rel"].min()) for c in curves.values())
        hi = min(float(c["flops_rel"].max()) for c in curves.values())
        for method, c in curves.items():
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
            out.append({"model": model, "task": task, "method": method, "auc_accuracy": auc,
                        "flops_rel_lo": lo, "flops_rel_hi": hi, "n_points": len(c), **at})
    table = pd.DataFrame(out, columns=["model", "task", "method", "auc_accuracy", "flops_rel_lo", "flops_rel_hi",
                                       "n_points", *(f"acc_at_flops_{q:.2f}" for q in FLOPS_POINTS)])
    table.insert(3, "rank", table.groupby(["model", "task"])["auc_accuracy"].rank(ascending=False, method="min"))
    return table.sort_values(["model", "task", "rank"]).reset_index(drop=True)


def plot_pareto(df: pd.DataFrame, model: str, task: str, path: str | Path) -> Path:
    """Accuracy vs prefill TFLOPs for one (model, task): a line per method, Pareto frontier, unpruned star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = df[(df["model"] == model) & (df["task"] == task)].copy()
    # readable axis units for small models (the CSV keeps TFLOPs)
    top = float(g["tflops_prefill"].max()) if len(g) else 1.0
    unit, scale = next((u, s) for u, s in (("TFLOPs", 1.0), ("GFLOPs", 1e3), ("MFLOPs", 1e6), ("kFLOPs", 1e9))
                       if top * s >= 0.1 or u == "kFLOPs")
    g["tflops_prefill"] = g["tflops_prefill"] * scale
    fig, ax = plt.subplots(figsize=(9.5, 5.5), dpi=120)
    markers = "osD^vP*Xh<>p"
    curves = method_curves(g)
    cmap = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for i, (method, c) in enumerate(sorted(curves.items())):
        ax.plot(c["tflops_prefill"], c["accuracy"], marker=markers[i % len(markers)], ls="-", color=cmap(i % cmap.N),
                label=method, lw=1.6, ms=5)
        for _, r in c[c["budget"].notna()].iterrows():
            ax.annotate(str(int(r["budget"])), (r["tflops_prefill"], r["accuracy"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=cmap(i % cmap.N))
    x, y = g["tflops_prefill"].to_numpy(float), g["accuracy"].to_numpy(float)
    if len(g):
        front = pareto_front(x, y)
        ax.step(x[front], y[front], where="post", color="black", lw=2.5, alpha=0.35, zorder=0,
                label="Pareto frontier (all methods)")
        ax.scatter(x[front], y[front], s=90, facecolors="none", edgecolors="black", zorder=3)
    ref = g[(g["method"] == "none") & g["budget"].isna()]
    if len(ref):
        ax.scatter(ref["tflops_prefill"], ref["accuracy"], marker="*", s=260, color="gold", edgecolors="black",
                   zorder=4, label="unpruned")
    ax.set_xlabel(f"prefill compute per sample ({unit}: vision + projector + LLM + pruner)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{task} on {model}: accuracy vs prefill FLOPs (labels: visual-token budget)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0.0)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{store.TMP_PREFIX}{path.name}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def write_all(results_dir: str | Path) -> dict[str, Any]:
    """Write leaderboard.csv, auc.csv and one Pareto PNG per (model, task); returns their paths."""
    results_dir = Path(results_dir)
    df = leaderboard(results_dir)
    if df.empty:
        raise FileNotFoundError(f"no finished cells under {results_dir / store.CELLS}; run benchmarks.run first")
    board = results_dir / "leaderboard.csv"
    store.atomic_write_text(board, df.to_csv(index=False))
    auc = auc_table(df)
    auc_path = results_dir / "auc.csv"
    store.atomic_write_text(auc_path, auc.to_csv(index=False))
    plots = []
    for (model, task), _ in df.groupby(["model", "task"]):
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{model}_{task}")
        plots.append(plot_pareto(df, model, task, results_dir / "plots" / f"pareto_{safe}.png"))
    return {"leaderboard": board, "auc": auc_path, "plots": plots, "table": df, "auc_table": auc}


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m benchmarks.leaderboard results_dir=DIR`` (OmegaConf dot-list arguments)."""
    from omegaconf import OmegaConf

    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    unknown = set(args.keys()) - {"results_dir"}
    if unknown:
        raise SystemExit(f"unknown argument(s) {sorted(unknown)}; accepted: results_dir=DIR")
    out = write_all(args.get("results_dir", "results"))
    with pd.option_context("display.width", 200, "display.max_columns", 12):
        print(out["table"][COLUMNS[:11]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        if len(out["auc_table"]):
            print("\nAUC of accuracy vs FLOPs fraction (common range):")
            print(out["auc_table"].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nwrote {out['leaderboard']}, {out['auc']}, " + ", ".join(str(p) for p in out["plots"]))


if __name__ == "__main__":
    main()
