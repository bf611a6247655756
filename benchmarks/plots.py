"""The leaderboard's figures: accuracy against compute, one PNG per (model, task) and x axis.

Three x axes (`AXES`), each its own file under ``<results_dir>/plots/``:

- ``pareto_<model>_<task>.png``: accuracy vs prefill FLOPs relative to the unpruned model of the
  same samples (``flops_rel``), absolute TFLOPs on a secondary axis on top (the CSV's unit), the
  Pareto frontier of each sample set and the unpruned star;
- ``tokens_<model>_<task>.png``: accuracy vs equivalent visual tokens (``equiv_tokens``: per LLM
  layer the visual tokens it sees, averaged; what an in-LLM schedule's budget means);
- ``latency_<model>_<task>.png``: accuracy vs measured prefill latency per sample (``prefill_ms``;
  written only when the cells measured it).

Every figure draws the same way so it stays readable where methods crowd:

- one fixed colour per method (`benchmarks.palette.method_colour`: the registry name hashed, stable
  across runs and when methods are added), a marker per variant (its name hashed the same way),
  a line style per sample set;
- 95% error bars from the cells' intervals;
- a second panel zoomed on the top accuracy band (points at >= `ZOOM_REL` of the unpruned accuracy),
  where the good methods overlap; left out when every point is already in that band;
- budget labels placed by adjustText so they do not collide with each other or the points.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import store
from benchmarks.leaderboard import (
    SAMPLE_KEYS,
    LineKey,
    is_reference,
    line_labels,
    method_curves,
    pareto_front,
)
from benchmarks.palette import method_colour

#: the zoomed panel shows accuracies from this fraction of the unpruned accuracy up
ZOOM_REL = 0.9
#: markers a variant's name is hashed into (a method's default variant is named as the method, so methods
#: that share one of the palette's 20 colours almost always differ by marker)
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "h", "<", ">", "p")
LINESTYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class XAxis:
    """One kind of figure: the leaderboard column on x, its label and the file-name prefix."""

    column: str
    label: str
    prefix: str


AXES: dict[str, XAxis] = {
    "flops": XAxis("flops_rel", "prefill FLOPs relative to the unpruned model (vision + projector + LLM + pruner)",
                   "pareto"),
    "tokens": XAxis("equiv_tokens", "equivalent visual tokens (per LLM layer, averaged)", "tokens"),
    "latency": XAxis("prefill_ms", "measured prefill latency per sample (ms)", "latency"),
}


def variant_marker(variant: str) -> str:
    """The marker of the variant named ``variant``: its sha256 into `MARKERS` (stable across runs and
    machines; with `method_colour` two lines rarely share both)."""
    digest = hashlib.sha256(str(variant).encode("utf-8")).digest()
    return MARKERS[int.from_bytes(digest[:8], "big") % len(MARKERS)]


def _yerr(c: pd.DataFrame) -> np.ndarray:
    """Error-bar lengths below and above each point from its 95% interval (0 where unknown): [2, n]."""
    y = c["accuracy"].to_numpy(float)
    lo = (y - c["accuracy_ci95_lo"].to_numpy(float)).clip(min=0)
    hi = (c["accuracy_ci95_hi"].to_numpy(float) - y).clip(min=0)
    return np.nan_to_num(np.vstack([lo, hi]))


def _zoom_floor(g: pd.DataFrame) -> float | None:
    """Lower accuracy bound of the zoomed panel (`ZOOM_REL` of the best unpruned accuracy of the plot),
    or None when the panel would show nothing new (no reference, or every point already above it)."""
    ref = g[is_reference(g)]
    if not len(ref):
        return None
    floor = ZOOM_REL * float(ref["accuracy"].max())
    inside = g["accuracy"] >= floor
    return floor if inside.sum() >= 2 and not inside.all() else None


def _set_id(values: Any) -> tuple:
    """A sample set's key with missing values made comparable (NaN != NaN would miss the lookup)."""
    return tuple(None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in values)


def _set_styles(g: pd.DataFrame) -> dict[tuple, str]:
    """Line style per sample set of ``g`` (by `SAMPLE_KEYS`), in sorted order."""
    keys = [k for k, _ in g.groupby(SAMPLE_KEYS, dropna=False, sort=True)]
    return {_set_id(k): LINESTYLES[i % len(LINESTYLES)] for i, k in enumerate(keys)}


def _draw(ax: Any, g: pd.DataFrame, axis: XAxis, curves: dict[LineKey, pd.DataFrame], labels: dict[LineKey, str],
          legend: bool, floor: float | None = None) -> list[Any]:
    """Draw every line of ``curves`` on ``ax`` (x = ``axis.column``); returns the budget labels' Text
    artists for `_place_labels`. With ``floor`` (the zoomed panel) only points at or above it are
    labelled, and each line's leftmost such point names its variant too, so crowded lines are told
    apart without the legend."""
    styles = _set_styles(g)
    texts = []
    for key, c in sorted(curves.items(), key=lambda kv: (kv[0].method, kv[0].variant, kv[0].n_samples,
                                                          str(kv[0].seed))):
        c = c[c[axis.column].notna()]
        if not len(c):
            continue
        colour, marker = method_colour(key.method), variant_marker(key.variant)
        ls = styles.get(_set_id(getattr(key, k) for k in SAMPLE_KEYS), "-")
        ax.errorbar(c[axis.column], c["accuracy"], yerr=_yerr(c), marker=marker, ls=ls, color=colour,
                    label=labels[key] if legend else None, lw=1.4, ms=5, elinewidth=0.8, capsize=2, alpha=0.9)
        shown = c[c["budget"].notna() & (c["accuracy"] >= (floor if floor is not None else -np.inf))]
        first = shown[axis.column].idxmin() if floor is not None and len(shown) else None
        for i, r in shown.iterrows():
            text = f"{labels[key]} {int(r['budget'])}" if i == first else str(int(r["budget"]))
            texts.append(ax.text(r[axis.column], r["accuracy"], text, fontsize=7, color=colour))
    return texts


def _draw_sets(ax: Any, g: pd.DataFrame, axis: XAxis, legend: bool) -> None:
    """Per sample set: its unpruned star and, on the FLOPs axis, its Pareto frontier."""
    styles = _set_styles(g)
    several = len(styles) > 1
    for key, s in g.groupby(SAMPLE_KEYS, dropna=False, sort=True):
        s = s[s[axis.column].notna()]
        tag = f" (n={key[3]}, seed={key[4]})" if several else ""
        if axis.column == "flops_rel" and len(s):
            x, y = s[axis.column].to_numpy(float), s["accuracy"].to_numpy(float)
            front = pareto_front(x, y)
            ax.step(x[front], y[front], where="post", color="black", lw=2.5, alpha=0.3, zorder=0,
                    ls=styles[_set_id(key)], label=f"Pareto frontier{tag}" if legend else None)
            ax.scatter(x[front], y[front], s=90, facecolors="none", edgecolors="black", zorder=3)
        ref = s[is_reference(s)]
        if len(ref):
            ax.scatter(ref[axis.column], ref["accuracy"], marker="*", s=260, color="gold", edgecolors="black",
                       zorder=4, label=f"unpruned{tag}" if legend else None)


def _place_labels(ax: Any, texts: list[Any]) -> None:
    """Move the budget labels apart (adjustText) so none overlaps another label or a point."""
    if not texts:
        return
    from adjustText import adjust_text

    adjust_text(texts, ax=ax, expand=(1.3, 1.5), arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"})


def _tflops_axis(ax: Any, g: pd.DataFrame) -> None:
    """Absolute prefill TFLOPs per sample on a secondary x axis (top), from the unpruned reference:
    x_abs = flops_rel * reference TFLOPs (their median when the plot holds several sample sets)."""
    ref = g[is_reference(g)]["tflops_prefill"].dropna()
    if not len(ref):
        return
    total = float(ref.median())
    sec = ax.secondary_xaxis("top", functions=(lambda r: r * total, lambda t: t / total))
    approx = "~" if ref.nunique() > 1 else ""
    sec.set_xlabel(f"prefill TFLOPs per sample (unpruned: {approx}{total:.3g})", fontsize=8)
    sec.tick_params(labelsize=7)


def _out_path(results_dir: Path, axis: XAxis, model: str, task: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{model}_{task}")
    return results_dir / "plots" / f"{axis.prefix}_{safe}.png"


def plot(df: pd.DataFrame, model: str, task: str, path: str | Path, x: str = "flops") -> Path | None:
    """Accuracy vs ``x`` (a key of `AXES`) for one (model, task) of leaderboard ``df``, written to
    ``path`` as PNG; None (nothing written) when no cell of that (model, task) has the x column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in AXES:
        raise ValueError(f"plots: x={x!r} is not a figure kind; accepted: {', '.join(AXES)}")
    axis = AXES[x]
    g = df[(df["model"] == model) & (df["task"] == task)]
    if axis.column not in g or not g[axis.column].notna().any():
        return None
    curves = method_curves(g)
    labels = line_labels(curves)
    floor = _zoom_floor(g)
    panels = 2 if floor is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(7.5 + 4.5 * (panels - 1), 5.5), dpi=120, squeeze=False)
    main = axes[0, 0]
    _draw_sets(main, g, axis, legend=True)
    _place_labels(main, _draw(main, g, axis, curves, labels, legend=True))
    main.set_title(f"{task} on {model}", fontsize=10)
    if floor is not None:
        zoom = axes[0, 1]
        band = g[g["accuracy"] >= floor]
        _draw_sets(zoom, g, axis, legend=False)
        top = float(np.nanmax(band[["accuracy", "accuracy_ci95_hi"]].to_numpy(float)))
        zoom.set_ylim(floor, top + 0.1 * (top - floor) + 1e-3)
        xs = band[axis.column].to_numpy(float)
        pad = 0.05 * (xs.max() - xs.min()) + 1e-9
        zoom.set_xlim(xs.min() - pad, xs.max() + pad)
        _place_labels(zoom, [t for t in _draw(zoom, g, axis, curves, labels, legend=False, floor=floor)
                             if _inside(zoom, t)])
        zoom.set_title(f"top band: accuracy >= {ZOOM_REL:.0%} of unpruned", fontsize=10)
    for ax in axes[0]:
        ax.set_xlabel(axis.label, fontsize=8)
        ax.grid(True, alpha=0.3)
        if axis.column == "flops_rel":
            _tflops_axis(ax, g)
    main.set_ylabel("accuracy (error bars: 95% interval; labels: budget)")
    fig.tight_layout()
    handles, names = main.get_legend_handles_labels()
    fig.legend(handles, names, loc="upper left", bbox_to_anchor=(1.0, 0.98), fontsize=7, borderaxespad=0.0)
    return _save(fig, Path(path))


def _inside(ax: Any, text: Any) -> bool:
    """True when ``text``'s anchor lies inside ``ax``'s current limits (labels outside a zoom are hidden)."""
    x, y = text.get_position()
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    keep = x0 <= x <= x1 and y0 <= y <= y1
    if not keep:
        text.set_visible(False)
    return keep


def _save(fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically (a reader never sees half a PNG)."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{store.TMP_PREFIX}{path.name}")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_pareto(df: pd.DataFrame, model: str, task: str, path: str | Path) -> Path | None:
    """Accuracy vs relative prefill FLOPs (TFLOPs on top) for one (model, task): `plot` with x="flops"."""
    return plot(df, model, task, path, x="flops")


def write_plots(board: pd.DataFrame, results_dir: str | Path,
                progress: Callable[[str], None] | None = None) -> list[Path]:
    """Every figure of `AXES` for every (model, task) of ``board`` under ``<results_dir>/plots/``;
    returns the paths written (a latency figure only where latency was measured)."""
    results_dir = Path(results_dir)
    written = []
    for (model, task), _ in board.groupby(["model", "task"]):
        for x, axis in AXES.items():
            p = plot(board, model, task, _out_path(results_dir, axis, model, task), x=x)
            if p is not None:
                written.append(p)
                if progress:
                    progress(str(p))
    return written


__all__ = ["AXES", "MARKERS", "ZOOM_REL", "XAxis", "plot", "plot_pareto", "variant_marker", "write_plots"]
