"""One fixed colour per method, shared by every figure (overlays, plots).

`method_colour` hashes the method's registry name (sha256, so the same in every process and on every
machine: Python's ``hash()`` of a str is salted per process) into a fixed qualitative palette,
matplotlib's ``tab20`` written out here so the mapping does not depend on the matplotlib version.
Two methods may share a colour (20 slots); figures label every row or line with its name as well.
"""

from __future__ import annotations

import hashlib

#: matplotlib's ``tab20`` (dark and light of each of ten hues, interleaved), as hex.
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd", "#c5b0d5",
    "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d", "#17becf", "#9edae5",
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
