"""What each column of the leaderboard's CSV files holds, in what unit, and how it is written.

The in-memory tables (`benchmarks.leaderboard.Tables`) keep full precision; `write_csv` writes a copy
that a reader can take in at a glance:

- floats rounded per unit (`Column.digits`: accuracies and fractions to 4 decimals, TFLOPs to 6
  significant digits, milliseconds to 2 decimals, ...);
- counts (budgets, ranks, seeds, sample counts) as integers, empty where unknown;
- no column that is empty in every row, unless it is part of the file's contract (``keep``: the
  documented leading columns, which readers address by name);
- the units and meaning of every column written beside it, in ``schema.json`` (one entry per CSV file).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import store

SCHEMA = "schema.json"


@dataclass(frozen=True)
class Column:
    """One column's unit, meaning and rounding.

    unit:        "fraction" (0..1), "TFLOPs", "ms", "MB", "tokens", "count", "ratio" or "" (text / id)
    description: what the column holds
    digits:      ("decimals", n) or ("significant", n) for floats; ("integer", 0) for counts; None: as is
    """

    unit: str
    description: str
    digits: tuple[str, int] | None = None


_FRACTION = ("decimals", 4)
_INT = ("integer", 0)

COLUMNS: dict[str, Column] = {
    "model": Column("", "runner model config name (conf/model/)"),
    "task": Column("", "task name (conf/task/; lmms-eval tasks as lmms-<name>)"),
    "method": Column("", "registered pruner name (`none`: the unpruned reference)"),
    "variant": Column("", "the method's named configuration (its own line in plots; the method name by default)"),
    "budget": Column("tokens", "visual-token budget per image (empty: unpruned reference or `auto`)", _INT),
    "equiv_tokens": Column("tokens", "visual tokens per LLM layer, averaged over layers and samples", ("decimals", 2)),
    "accuracy": Column("fraction", "mean score over the samples (mean over pruner seeds for a point)", _FRACTION),
    "accuracy_ci95_lo": Column("fraction", "95% interval of accuracy, lower end", _FRACTION),
    "accuracy_ci95_hi": Column("fraction", "95% interval of accuracy, upper end", _FRACTION),
    "accuracy_std": Column("fraction", "sample std of accuracy over pruner seeds (empty for one seed)", _FRACTION),
    "n_seeds": Column("count", "pruner seeds averaged into the point", _INT),
    "accuracy_rel": Column("ratio", "accuracy / the unpruned reference's on the same samples", _FRACTION),
    "accuracy_rel_ci95_lo": Column("ratio", "95% paired-bootstrap interval of accuracy_rel, lower end", _FRACTION),
    "accuracy_rel_ci95_hi": Column("ratio", "95% paired-bootstrap interval of accuracy_rel, upper end", _FRACTION),
    "delta_vs_best": Column("fraction", "accuracy minus the best variant's at the same budget and samples", _FRACTION),
    "delta_vs_best_ci95_lo": Column("fraction", "95% paired-bootstrap interval of delta_vs_best, lower end",
                                    _FRACTION),
    "delta_vs_best_ci95_hi": Column("fraction", "95% paired-bootstrap interval of delta_vs_best, upper end",
                                    _FRACTION),
    "tflops_prefill": Column("TFLOPs", "prefill FLOPs per sample: vision + projector + LLM + pruner (docs/flops.md)",
                             ("significant", 6)),
    "flops_rel": Column("ratio", "tflops_prefill / the unpruned reference's on the same samples", _FRACTION),
    "prefill_ms": Column("ms", "measured prefill latency per sample (median)", ("decimals", 2)),
    "decode_ms_per_token": Column("ms", "measured decode latency per generated token (median)", ("decimals", 2)),
    "kv_cache_mb": Column("MB", "KV-cache size after prefill per sample", ("significant", 4)),
    "peak_mem_mb": Column("MB", "peak memory of the latency probe", ("decimals", 1)),
    "n_samples": Column("count", "samples scored", _INT),
    "seed": Column("count", "sample seed (which samples were drawn)", _INT),
    "method_seed": Column("count", "the pruner's own seed", _INT),
    "params": Column("", "the method's resolved parameters (JSON)"),
    "weights": Column("", "fingerprint of the checkpoint's weights"),
    "config_hash": Column("", "hash of the cell's resolved config (a point: its cells' hashes joined by ,)"),
    "cell": Column("", "the cell's folder relative to results_dir (config.yaml, metrics.json, predictions.jsonl)"),
    "relevant_recall": Column("fraction", "share of the task's answer-relevant patches covered by kept tokens",
                              _FRACTION),
    "vision_tflops": Column("TFLOPs", "vision tower part of tflops_prefill", ("significant", 6)),
    "llm_tflops": Column("TFLOPs", "LLM part of tflops_prefill", ("significant", 6)),
    "projector_tflops": Column("TFLOPs", "projector part of tflops_prefill", ("significant", 6)),
    "overhead_tflops": Column("TFLOPs", "the pruner's own scoring part of tflops_prefill", ("significant", 6)),
    "visual_tokens_in": Column("tokens", "visual tokens per sample before pruning (mean)", ("decimals", 2)),
    "within_budget": Column("fraction", "share of samples whose unpruned visual tokens are within the budget "
                            "(they reach the LLM whole)", _FRACTION),
    "attn_visual_share": Column("fraction", "last prompt token's attention mass on visual tokens (layer mean)",
                                _FRACTION),
    "attn_visual_share_before": Column("fraction", "attn_visual_share of the unpruned reference", _FRACTION),
    "mdi": Column("ratio", "Modality Dominance Index (docs/benchmarks.md, Diagnostics)", _FRACTION),
    "mdi_before": Column("ratio", "mdi of the unpruned reference", _FRACTION),
    "sink_share_of_kept": Column("fraction", "share of kept visual tokens that are attention sinks", _FRACTION),
    "sinks_kept": Column("fraction", "share of the sink tokens that were kept", _FRACTION),
    "sink_reason": Column("", "why the sink shares are empty (e.g. the model has no sink dimension)"),
    # auc.csv
    "rank": Column("count", "rank by auc_accuracy within the sample set (1 = best; ties share the best rank)", _INT),
    "auc_accuracy": Column("fraction", "mean accuracy over the common FLOPs-fraction range of the sample set",
                           _FRACTION),
    "flops_rel_lo": Column("ratio", "lower end of that common FLOPs-fraction range", _FRACTION),
    "flops_rel_hi": Column("ratio", "upper end of that common FLOPs-fraction range", _FRACTION),
    "n_points": Column("count", "points on the variant's curve (the unpruned reference included)", _INT),
}

_PATTERNS: list[tuple[re.Pattern[str], Column]] = [
    (re.compile(r"^acc_at_flops_(\d\.\d+)$"),
     Column("fraction", "accuracy interpolated at FLOPs fraction {0} on the variant's own curve", _FRACTION)),
    (re.compile(r"^accuracy_(.+)$"), Column("fraction", "accuracy on the questions of family {0}", _FRACTION)),
]


def column(name: str) -> Column:
    """The `Column` of ``name``: a known column, a pattern (``acc_at_flops_<q>``, ``accuracy_<family>``),
    else an undescribed one written as is."""
    if name in COLUMNS:
        return COLUMNS[name]
    for pattern, col in _PATTERNS:
        m = pattern.match(name)
        if m:
            return Column(col.unit, col.description.format(*m.groups()), col.digits)
    return Column("", "", None)


def _round(values: pd.Series, digits: tuple[str, int]) -> pd.Series:
    kind, n = digits
    x = pd.to_numeric(values, errors="coerce")
    if kind == "integer":
        whole = x.dropna()
        return x.round().astype("Int64") if bool((whole % 1 == 0).all()) else x  # fractions of a budget stay
    if kind == "decimals":
        return x.round(n)

    def sig(v: float) -> float:
        return v if not math.isfinite(v) or v == 0 else round(v, n - 1 - int(math.floor(math.log10(abs(v)))))

    return x.map(sig)


def tidy(df: pd.DataFrame, keep: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """A copy of ``df`` as written to CSV: rounded per `column`, counts as integers, and without the
    columns empty in every row that are not in ``keep``."""
    out = df.copy()
    for name in out.columns:
        digits = column(name).digits
        if digits is not None and out[name].map(lambda v: v is None or isinstance(v, (int, float, np.number))).all():
            out[name] = _round(out[name], digits)
    empty = [c for c in out.columns if c not in keep and out[c].isna().all()]
    return out.drop(columns=empty)


def write_csv(df: pd.DataFrame, path: str | Path, keep: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Write `tidy` of ``df`` to ``path`` (atomically) and record its columns in the ``schema.json``
    beside it; returns the table as written."""
    path = Path(path)
    out = tidy(df, keep)
    store.atomic_write_text(path, out.to_csv(index=False))
    schema_path = path.parent / SCHEMA
    try:
        schema = json.loads(schema_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        schema = {}
    schema[path.name] = [{"name": c, "dtype": str(out[c].dtype), **_described(c)} for c in out.columns]
    store.atomic_write_text(schema_path, json.dumps(dict(sorted(schema.items())), indent=1) + "\n")
    return out


def _described(name: str) -> dict[str, Any]:
    col = column(name)
    return {k: v for k, v in asdict(col).items() if k != "digits"}


__all__ = ["COLUMNS", "SCHEMA", "Column", "column", "tidy", "write_csv"]
