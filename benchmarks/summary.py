"""The papers' summary table: method x task at each token level, with the average over tasks of the
per-task ratio to the unpruned model and its paired-bootstrap interval (docs/tasks.md "The summary
table").

Written by the leaderboard (`write_summary`) as ``summary.csv``, ``summary.md`` and ``summary.tex``
under the results directory. Per model (and weights, sample count and seed), the levels are the
numeric budgets of its cells; a cell whose method chose its own count (budget ``auto``) is placed at
the level nearest its equivalent tokens (``placed_by``). A method's average needs a point on every
task at that level (else it is empty and ``n_tasks`` says how many it has). The interval resamples each
task's samples with its unpruned reference's (paired), independently per task, and takes the mean over
tasks of accuracy / reference accuracy on each resample. Tasks declare an ``ability`` (`Task.ability`):
the per-ability columns average the tasks of each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import intervals, store

SET_KEYS = ["model", "weights", "n_samples", "seed"]
#: docs/published/<model config name>.csv: numbers the papers print, beside ours for matching runs
PUBLISHED = Path(__file__).resolve().parents[1] / "docs" / "published"
#: lmms-eval task name -> the published CSV's benchmark name
PUBLISHED_BENCHMARKS = {
    "gqa": "GQA", "pope": "POPE", "mme": "MME", "textvqa_val": "TextVQA", "mmbench_en_dev": "MMB",
    "mmbench_cn_dev": "MMB-CN", "scienceqa_img": "SQA", "vqav2_val": "VQAv2", "vizwiz_vqa_val": "VizWiz",
    "seedbench": "SEED", "mmmu_val": "MMMU", "ok_vqa_val2014": "OKVQA",
}


def published_value(model: str, method: str, level: int, task: str) -> float | None:
    """The number the papers print for ``method`` at ``level`` tokens on the benchmark of lmms-eval task
    ``task`` (``lmms-<name>``) with the real checkpoint of model config ``model``; the method's own paper
    first. None when there is no such row (or the task is not a published benchmark)."""
    path = PUBLISHED / f"{model}.csv"
    bench = PUBLISHED_BENCHMARKS.get(task[len("lmms-"):]) if task.startswith("lmms-") else None
    if bench is None or not path.is_file():
        return None
    table = _published_table(path)
    hit = table[(table["method"] == method) & (table["budget"] == str(level)) & (table["benchmark"] == bench)]
    if hit.empty:
        return None
    own = hit[hit["note"].fillna("").str.startswith("own")]
    return float((own if len(own) else hit)["value"].iloc[0])


def _published_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"budget": str})


def _ability(task: str) -> str:
    """The ability a task declares (`Task.ability`; lmms-eval tasks: `benchmarks.tasks.lmms.ability_of`)."""
    if task.startswith("lmms-"):
        from benchmarks.tasks.lmms import ability_of

        return ability_of(task[len("lmms-"):])
    from benchmarks.tasks import get_task

    try:
        return str(get_task(task).ability)
    except ValueError:  # a task of cells written by another checkout
        return "general"


def mean_ratio_interval(pairs: list[tuple[np.ndarray, np.ndarray]], seed: int = 0,
                        n_resamples: int = intervals.N_RESAMPLES, level: float = intervals.LEVEL
                        ) -> tuple[float, float] | None:
    """Percentile interval of mean_t(mean(x_t) / mean(y_t)) over tasks t, each task's (x_t, y_t) pairs
    resampled together and independently of the other tasks; None if a resample's ratio is undefined."""
    rng = np.random.default_rng(seed)
    stats = np.zeros(n_resamples)
    for x, y in pairs:
        idx = rng.integers(0, len(x), size=(n_resamples, len(x)))  # [R, n_t]
        den = y[idx].mean(1)
        if np.any(den <= 0):
            return None
        stats += x[idx].mean(1) / den
    stats /= len(pairs)
    lo, hi = np.percentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def _levels(points: pd.DataFrame) -> list[int]:
    b = pd.to_numeric(points["budget"], errors="coerce").dropna()
    return sorted({int(v) for v in b}, reverse=True)


def _nearest(levels: list[int], equiv: float) -> int | None:
    """The level nearest ``equiv`` equivalent tokens (the larger on a tie); None for an unknown count."""
    return None if pd.isna(equiv) else min(levels, key=lambda v: (abs(v - equiv), -v))


def summary_table(points: pd.DataFrame, scores: dict[str, dict[str, float]]) -> pd.DataFrame:
    """One row per (sample set, variant, level): per-task accuracy and ratio, their average, interval and
    per-ability averages. ``points``: the leaderboard's points; ``scores``: per-sample scores by
    ``config_hash``."""
    rows: list[dict[str, Any]] = []
    for key, g in points.groupby(SET_KEYS, dropna=False, sort=True):
        tasks = sorted(g["task"].unique())
        refs = {r["task"]: r for _, r in g[(g["method"] == "none") & g["budget"].isna()].iterrows()}
        levels = _levels(g[g["method"] != "none"])
        if not levels:
            continue
        pruned = g[g["method"] != "none"].copy()
        numeric = pd.to_numeric(pruned["budget"], errors="coerce")
        nearest = pruned["equiv_tokens"].map(lambda e, lv=levels: _nearest(lv, e))
        pruned["level"] = numeric.where(numeric.notna(), nearest)
        pruned["placed_by"] = np.where(numeric.notna(), "budget", "equiv_tokens")
        for (method, variant, lv), v in pruned.groupby(["method", "variant", "level"], sort=True):
            row: dict[str, Any] = dict(zip(SET_KEYS, key, strict=True))
            row.update(method=method, variant=variant, level=int(lv), placed_by=",".join(sorted(set(v["placed_by"]))),
                       equiv_tokens=float(v["equiv_tokens"].mean()), flops_rel=float(v["flops_rel"].mean()))
            ratios, pairs = {}, []
            for t in tasks:
                pt = v[v["task"] == t]
                if pt.empty:
                    continue
                p = pt.iloc[0]
                row[f"acc_{t}"] = float(p["accuracy"])
                pub = published_value(str(key[0]), method, int(lv), t)
                if pub is not None:
                    row[f"published_{t}"] = pub
                ref = refs.get(t)
                if ref is not None and ref["accuracy"] > 0:
                    ratios[t] = float(p["accuracy"]) / float(ref["accuracy"])
                    row[f"rel_{t}"] = ratios[t]
                    x, y = intervals.paired_scores(scores[p["config_hash"]], scores[ref["config_hash"]])
                    pairs.append((np.asarray(x, float), np.asarray(y, float)))
            row["n_tasks"] = len(ratios)
            complete = len(ratios) == len(tasks)
            row["avg_rel"] = float(np.mean(list(ratios.values()))) if complete else np.nan
            ci = mean_ratio_interval(pairs, seed=0 if pd.isna(key[3]) else int(key[3])) if complete else None
            row["avg_rel_ci95_lo"], row["avg_rel_ci95_hi"] = ci if ci else (np.nan, np.nan)
            by_ability: dict[str, list[float]] = {}
            for t, r in ratios.items():
                by_ability.setdefault(_ability(t), []).append(r)
            if complete and len(by_ability) > 1:
                for ab, rs in sorted(by_ability.items()):
                    row[f"avg_rel_{ab}"] = float(np.mean(rs))
            rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.sort_values(["model", "level", "avg_rel"], ascending=[True, False, False], kind="stable",
                          na_position="last").reset_index(drop=True)


def _tasks_of(df: pd.DataFrame) -> list[str]:
    return [c[len("acc_"):] for c in df.columns if c.startswith("acc_")]


def _display(df: pd.DataFrame, refs: dict[str, dict[str, float]]) -> list[tuple[str, int, pd.DataFrame]]:
    """(model, level, table) to print: per task "acc (rel%)", the average ratio with its interval; the
    first row is the unpruned model's accuracy per task (``refs``: model -> task -> accuracy)."""
    out = []
    tasks = _tasks_of(df)
    for (model, lv), g in df.groupby(["model", "level"], sort=False):
        references = refs.get(str(model), {})
        rows = [{"method": "unpruned", **{t: f"{100 * references[t]:.1f}" for t in tasks if t in references},
                 "avg %": "100.0"}] if references else []
        for _, r in g.iterrows():
            cells = {t: (f"{100 * r[f'acc_{t}']:.1f} ({100 * r[f'rel_{t}']:.1f}%)"
                         if pd.notna(r.get(f"acc_{t}")) and pd.notna(r.get(f"rel_{t}")) else "") for t in tasks}
            for t in tasks:  # the paper's number beside ours, where the run matches a published one
                if pd.notna(r.get(f"published_{t}", np.nan)):
                    cells[t] += f" / published {r[f'published_{t}']:g}"
            avg = (f"{100 * r['avg_rel']:.1f} [{100 * r['avg_rel_ci95_lo']:.1f}, {100 * r['avg_rel_ci95_hi']:.1f}]"
                   if pd.notna(r["avg_rel"]) and pd.notna(r["avg_rel_ci95_lo"]) else
                   (f"{100 * r['avg_rel']:.1f}" if pd.notna(r["avg_rel"]) else f"({r['n_tasks']} of {len(tasks)} tasks)"))
            name = r["variant"] + (" *" if "equiv_tokens" in r["placed_by"] else "")
            rows.append({"method": name, **cells, "avg %": avg})
        out.append((str(model), int(lv), pd.DataFrame(rows)))
    return out


def write_summary(results_dir: str | Path, points: pd.DataFrame, scores: dict[str, dict[str, float]]) -> dict[str, Path]:
    """Write summary.csv, summary.md and summary.tex under ``results_dir``; returns their paths ({} if no
    pruned point has a level)."""
    df = summary_table(points, scores)
    if df.empty:
        return {}
    results_dir = Path(results_dir)
    paths = {k: results_dir / f"summary.{k}" for k in ("csv", "md", "tex")}
    store.atomic_write_text(paths["csv"], df.to_csv(index=False))
    md, tex = [], []
    for model, lv, table in _display(df, _reference_accuracies(points)):
        md.append(f"### {model}, {lv} visual tokens\n\n{table.to_markdown(index=False)}\n")
        tex.append(f"% {model}, {lv} visual tokens\n" + table.to_latex(index=False, escape=True))
    note = ("Per task: accuracy (ratio to unpruned). avg %: mean over tasks of the ratio, [95% paired bootstrap]. "
            "* placed by equivalent tokens (the method chose its own count).\n")
    store.atomic_write_text(paths["md"], note + "\n" + "\n".join(md))
    store.atomic_write_text(paths["tex"], "% " + note + "\n".join(tex))
    return paths


def _reference_accuracies(points: pd.DataFrame) -> dict[str, dict[str, float]]:
    """model -> task -> the unpruned accuracy."""
    ref = points[(points["method"] == "none") & points["budget"].isna()]
    out: dict[str, dict[str, float]] = {}
    for _, r in ref.iterrows():
        out.setdefault(str(r["model"]), {})[str(r["task"])] = float(r["accuracy"])
    return out
