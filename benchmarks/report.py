"""A static HTML report of a results folder: ``python -m benchmarks.report results_dir=results``.

``make report`` writes ``<results_dir>/report/index.html`` and beside it the figures it shows, so the
folder opens from disk with no server and no network:

- the cells (one row per cell) as a table sorted by clicking a header, with a filter box per column
  (task, model, method, budget, ...) in its footer: DataTables through itables' offline bundle, inlined with its licence;
- the leaderboard's figures (`benchmarks.plots`, refreshed first by `benchmarks.leaderboard.write_all`);
- the kept-token overlays of `make overlays` (``<results_dir>/overlays`` unless ``overlays=DIR``),
  when they were made;
- each cell's resolved ``config.yaml`` (the table links to it);
- the environment: the report's machine (CPU, memory, GPU, Python, torch) and the locked package
  versions (``requirements.lock``), beside the lock digests the cells recorded.

Arguments (OmegaConf dot-list): ``results_dir=DIR`` (default ``results``), ``out=DIR`` (default
``<results_dir>/report``), ``overlays=DIR``.
"""

from __future__ import annotations

import html
import json
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks import csv_schema, store

#: the cells table's columns, in order (the rest are in cells.csv)
SHOWN = ["task", "model", "method", "variant", "budget", "equiv_tokens", "accuracy", "accuracy_ci95_lo",
         "accuracy_ci95_hi", "accuracy_rel", "tflops_prefill", "flops_rel", "prefill_ms", "kv_cache_mb",
         "relevant_recall", "n_samples", "seed", "method_seed"]
TABLE_ID = "cells"
INDEX = "index.html"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1400px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
figure { display: inline-block; margin: 0.5rem; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; font-size: 0.8rem; }
details { margin: 0.2rem 0; } summary { cursor: pointer; font-family: monospace; font-size: 0.85rem; }
table.env td, table.env th { text-align: left; padding: 0.1rem 0.8rem 0.1rem 0; font-size: 0.85rem; }
nav a { margin-right: 1rem; }
"""


@dataclass(frozen=True)
class Report:
    """What `build` wrote: the page, the number of table rows (= cells) and the copied figures."""

    index: Path
    rows: int
    plots: list[Path]
    overlays: list[Path]


def _copy(files: list[Path], root: Path, dest: Path) -> list[Path]:
    """Copy ``files`` (under ``root``) to ``dest`` keeping their relative paths; the copies' paths."""
    out = []
    for f in files:
        target = dest / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
        out.append(target)
    return out


def _config_anchor(config_hash: str) -> str:
    return f"cfg-{config_hash}"


def cells_table(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells as the page shows them: `SHOWN` columns rounded as in cells.csv, plus a link to each
    cell's resolved config."""
    shown = csv_schema.tidy(cells[[c for c in SHOWN if c in cells] + ["config_hash"]], keep=SHOWN[:5])
    links = [f'<a href="#{_config_anchor(h)}">{html.escape(h[:10])}</a>' for h in shown.pop("config_hash")]
    shown = shown.astype(object).where(shown.notna(), "")  # empty, not "<NA>" (the unpruned budget)
    return shown.assign(config=links)


def _table_html(df: pd.DataFrame) -> str:
    """The DataTables table of ``df`` (sortable by its headers, one filter box per column under the table,
    every row on one page), and
    the offline DataTables bundle it needs, inlined."""
    from itables.javascript import generate_init_offline_itables_html, to_html_datatable

    bundle = Path(__import__("itables").__file__).parent / "html" / "dt_bundle.js"
    init = generate_init_offline_itables_html(bundle)
    table = to_html_datatable(df, table_id=TABLE_ID, connected=False, paging=False, column_filters="footer",
                              allow_html=True, showIndex=False, classes="display compact cell-border",
                              maxBytes=0, order=[])
    return init + table


def _licences() -> str:
    """The licence of the inlined table library (itables, MIT; its bundle holds DataTables and jQuery,
    MIT, whose notices stay inside the bundle)."""
    from importlib import metadata

    dist = metadata.distribution("itables")
    texts = [Path(str(f.locate())).read_text(encoding="utf-8") for f in dist.files or []
             if "licen" in str(f).lower() and Path(str(f.locate())).is_file()]
    notice = ("The table is DataTables (SpryMedia Ltd, MIT) with jQuery (OpenJS Foundation, MIT), bundled by "
              f"itables {dist.version} (Marc Wouts, MIT); their copyright notices are kept in the inlined bundle.")
    body = "".join(f"<pre>{html.escape(t)}</pre>" for t in texts if t)
    return f"<p>{html.escape(notice)}</p>{body}"


def environment(cells: pd.DataFrame, results_dir: Path) -> dict[str, Any]:
    """The report machine's hardware and software, the locked versions and the cells' recorded locks."""
    import torch

    from benchmarks.lockfile import LOCK, lock_digest, read_lock

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name")) or cpu
    except (OSError, StopIteration):
        pass
    try:
        import psutil

        memory = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:  # psutil is locked; a bare install may lack it
        memory = "unknown"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    recorded = sorted({str(_cell_lock(results_dir / c)) for c in cells["cell"]})
    return {
        "machine": {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "memory": memory,
                    "gpu": ", ".join(gpus) or "none", "python": sys.version.split()[0], "torch": torch.__version__,
                    "report written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
        "lock digest (this checkout)": lock_digest(),
        "lock digests the cells recorded": recorded,
        "locked packages": read_lock(LOCK) if LOCK.is_file() else {},
    }


def _cell_lock(cell: Path) -> Any:
    """The lock digest a cell recorded in its resolved config (``code.lock``), None if absent."""
    try:
        import yaml

        return ((yaml.safe_load((cell / store.CONFIG).read_text(encoding="utf-8")) or {}).get("code") or {}).get("lock")
    except (OSError, ValueError):
        return None


def _env_html(env: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in env["machine"].items())
    rows += f"<tr><th>lock digest (this checkout)</th><td>{html.escape(str(env['lock digest (this checkout)']))}</td></tr>"
    rows += ("<tr><th>lock digests the cells recorded</th><td>"
             f"{html.escape(', '.join(env['lock digests the cells recorded']))}</td></tr>")
    pkgs = "".join(f"<tr><td>{html.escape(n)}</td><td>{html.escape(v)}</td></tr>"
                   for n, v in sorted(env["locked packages"].items()))
    return (f'<table class="env" id="machine">{rows}</table><details><summary>locked packages '
            f'({len(env["locked packages"])}, requirements.lock)</summary><table class="env" id="packages">{pkgs}'
            "</table></details>")


def _figures(paths: list[Path], base: Path) -> str:
    return "".join(f'<figure><a href="{p.relative_to(base).as_posix()}"><img src="{p.relative_to(base).as_posix()}" '
                   f'alt="{html.escape(p.stem)}" loading="lazy"></a><figcaption>{html.escape(p.stem)}</figcaption>'
                   "</figure>" for p in paths)


def _overlays_html(paths: list[Path], base: Path, overlays_src: Path | None) -> str:
    if not paths:
        where = overlays_src if overlays_src is not None else "<results_dir>/overlays"
        return f"<p>No overlays in {html.escape(str(where))}: run <code>make overlays</code> first.</p>"
    groups: dict[str, list[Path]] = {}
    for p in paths:
        groups.setdefault(p.parent.name, []).append(p)
    return "".join(f"<h3>{html.escape(g)}</h3>{_figures(ps, base)}" for g, ps in sorted(groups.items()))


def _configs_html(cells: pd.DataFrame, results_dir: Path) -> str:
    parts = []
    for _, r in cells.iterrows():
        try:
            text = (results_dir / r["cell"] / store.CONFIG).read_text(encoding="utf-8")
        except OSError as e:
            text = f"(unreadable: {e})"
        parts.append(f'<details id="{_config_anchor(r["config_hash"])}"><summary>{html.escape(r["cell"])}</summary>'
                     f"<pre>{html.escape(text)}</pre></details>")
    return "".join(parts)


def build(results_dir: str | Path = "results", out: str | Path | None = None,
          overlays: str | Path | None = None) -> Report:
    """Refresh the leaderboard of ``results_dir`` and write the report folder (``out``, default
    ``<results_dir>/report``); returns what was written."""
    from benchmarks.leaderboard import write_all

    results_dir = Path(results_dir)
    out = Path(out) if out is not None else results_dir / "report"
    overlays_src = Path(overlays) if overlays is not None else results_dir / "overlays"
    board = write_all(results_dir)  # the CSVs, schema.json and figures, up to date with the cells
    cells = board["cells_table"]
    if out.exists():
        shutil.rmtree(out)  # a report never shows figures of cells that are gone
    out.mkdir(parents=True)
    plots = _copy(sorted(board["plots"]), results_dir, out)
    overlay_files = sorted(overlays_src.rglob("*.png")) if overlays_src.is_dir() else []
    overlay_copies = _copy(overlay_files, overlays_src, out / "overlays")
    for extra in ("leaderboard.csv", "cells.csv", "auc.csv", csv_schema.SCHEMA, "summary.md"):
        if (results_dir / extra).is_file():
            shutil.copy2(results_dir / extra, out / extra)
    table = cells_table(cells)
    env = environment(cells, results_dir)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>prunebench report: {html.escape(str(results_dir))}</title>
<style>{_CSS}</style></head><body>
<h1>prunebench report</h1>
<p>{len(table)} cells from <code>{html.escape(str(results_dir.resolve()))}</code>. Downloads:
<a href="leaderboard.csv">leaderboard.csv</a>, <a href="cells.csv">cells.csv</a>, <a href="auc.csv">auc.csv</a>,
<a href="{csv_schema.SCHEMA}">{csv_schema.SCHEMA}</a> (units).</p>
<nav><a href="#table">cells</a><a href="#plots">plots</a><a href="#overlays">overlays</a>
<a href="#configs">configs</a><a href="#environment">environment</a><a href="#licences">licences</a></nav>
<h2 id="table">Cells</h2>
<p>One row per cell. Click a header to sort; type in a box under the table to filter that column (or in Search for all).
Accuracy is a fraction; FLOPs in TFLOPs per sample; latency in ms (units: {csv_schema.SCHEMA}).</p>
{_table_html(table)}
<h2 id="plots">Plots</h2>{_figures(plots, out)}
<h2 id="overlays">Kept-token overlays</h2>{_overlays_html(overlay_copies, out, overlays_src)}
<h2 id="configs">Resolved configs</h2>{_configs_html(cells, results_dir)}
<h2 id="environment">Environment</h2>{_env_html(env)}
<h2 id="licences">Licences</h2>{_licences()}
<script type="application/json" id="report-meta">{json.dumps({"cells": len(table), "table_id": TABLE_ID})}</script>
</body></html>
"""
    index = out / INDEX
    store.atomic_write_text(index, page)
    return Report(index=index, rows=len(table), plots=plots, overlays=overlay_copies)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m benchmarks.report results_dir=DIR [out=DIR] [overlays=DIR]``."""
    from omegaconf import OmegaConf

    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    unknown = set(args.keys()) - {"results_dir", "out", "overlays"}
    if unknown:
        raise SystemExit(f"unknown argument(s) {sorted(unknown)}; accepted: results_dir=DIR, out=DIR, overlays=DIR")
    report = build(args.get("results_dir", "results"), args.get("out"), args.get("overlays"))
    print(f"wrote {report.index} ({report.rows} cells, {len(report.plots)} plots, {len(report.overlays)} overlays)")


if __name__ == "__main__":
    main()
