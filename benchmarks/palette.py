"""One fixed colour per method, shared by every figure (overlays, plots).

`method_colour` hashes the method's registry name (sha256, so the same in every process and on every
machine: Python's ``hash()`` of a str is salted per process) into a fixed qualitative palette of
20 saturated colours (matplotlib's ``tab10``, then dark shades of ``tab20b`` and ``Dark2``; no pale
shades, which vanish as thin lines on white), written out here so the mapping does not depend on the
matplotlib version. Two methods may share a colour (20 slots): plots also give each variant its own
marker (`benchmarks.plots.variant_marker`) and figures label every row or line with its name.
"""

from __future__ import annotations

import hashlib

#: ``tab10``, then dark shades of ``tab20b`` (indigo, olive, ochre, brick, plum, slate blue) and
#: ``Dark2`` (teal, magenta, mustard, purple), as hex.
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#5254a3", "#1b9e77", "#e7298a", "#a6761d", "#7570b3",
)
#: the unpruned reference (method ``none``) is always black, whatever its hash
REFERENCE_COLOUR = "#000000"


def method_colour(name: str) -> str:
    """The colour (``#rrggbb``) of the method registered as ``name``: ``none`` black, every other name
    its sha256 digest modulo the palette size (stable across runs, processes and machines)."""
    name = str(name)
    if name == "none":
        return REFERENCE_COLOUR
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return PALETTE[int.from_bytes(digest[:8], "big") % len(PALETTE)]


__all__ = ["PALETTE", "REFERENCE_COLOUR", "method_colour"]
