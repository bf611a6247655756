"""Markdown tables of perf figures (shared by ``__main__``, the parts and ``report``, so none imports another)."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], cols: list[str] | None = None,
                   headers: dict[str, str] | None = None) -> str:
    """``rows`` as a markdown table of columns ``cols`` (default: the first row's keys); ``headers``
    renames columns; a missing value is an empty cell. Empty string for no rows."""
    if not rows:
        return ""
    cols = cols or list(rows[0])
    names = [(headers or {}).get(c, c) for c in cols]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]], cols: list[str] | None = None) -> None:
    if rows:
        print(markdown_table(rows, cols))
