"""Constants and the learning-rate schedule shared by both training stages, and the module's log."""

from __future__ import annotations

import logging
import math

from benchmarks.tasks.shapes import generator as G

log = logging.getLogger("embedded.train")

N_COMBOS = len(G.COLOUR_NAMES) * len(G.SHAPES)  # 18 colour x shape presence bits
MAX_CLS_COUNT = 4  # CLS count head classes 0..4 (4 = "4 or more")

# Family weights of the LLM stage: bridge phase, then the mixed phase.
BRIDGE_WEIGHTS = {
    "shape": 3, "pos_colour": 3, "pos_occupied": 1, "pos_digit": 2, "where_row": 1, "where_col": 1,
    "colour": 1, "count": 1, "exists": 1, "digit": 1, "relation": 1,
}
MIXED_WEIGHTS = {f: (3 if f in G.EVAL_FAMILIES else 1) for f in G.ALL_FAMILIES}


def lr_at(step: int, base: float, warmup: int, total: int, floor: float = 0.1, progress: float | None = None) -> float:
    """Linear warm-up then cosine decay to ``floor * base`` at ``total`` steps, or at ``progress`` = 1
    when a progress fraction is given (time-budgeted stage 2: the decay follows whichever of steps
    and wall-clock is further along, so a slow shared machine still ends with a decayed rate)."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if progress is not None:
        t = max(t, min(1.0, progress))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))

