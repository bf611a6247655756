"""Markdown tables of perf figures (shared by ``__main__`` and the parts, so neither imports the other)."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def print_table(rows: list[dict[str, Any]], cols: list[str] | None = None) -> None:
    if not rows:
        return
    cols = cols or list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    print()
