"""`pdrop` (PyramidDrop, CVPR'25): progressive in-LLM pruning at stage ends.

The LLM is split into stages; at the end of each (layers 8, 16, 24 of LLaVA-1.5's 32, scaled to the
model's depth) the image tokens are ranked by the attention the last instruction token (the last
prompt token) pays them in the stage's last layer (head mean, one attention row computed from that
layer's q/k, so SDPA/FlashAttention still run everywhere), and a fraction ``lam`` of them is kept.

Budget = tokens after the last stage. ``lam=None`` (default) derives the ratio so the pyramid ends
at the budget, lam = (budget / N) ** (1 / stages): the authors' lambda = 0.5 at 72 of 576 tokens
with three stages. An explicit ``lam`` sets the earlier stages to round(N * lam**s) (never below the
budget) and the last to the budget. Kept tokens keep their original positions by default.
Parameters, equivalent tokens and published numbers: docs/methods/pdrop.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pruners._schedule import ProgressiveSchedule, check_layers, equivalent_tokens, layer_counts, scale_layers
from pruners.base import LLMLayerContext, ModelInfo, Pruner
from pruners.params import POSITIONS, Param
from pruners.registry import register_pruner

REF_LAYERS, REF_DEPTH = (8, 16, 24), 32


def pdrop_schedule(
    n_visual: int,
    n_layers: int,
    budget: int,
    layers: Sequence[int] | None = None,
    lam: float | None = None,
) -> dict[str, Any]:
    """PyramidDrop's token schedule without a model: ``{"layers", "counts", "per_layer", "equiv_tokens"}``."""
    layers = scale_layers(REF_LAYERS, REF_DEPTH, n_layers) if layers is None else check_layers(layers, n_layers)
    s = len(layers)
    PDrop.parameters["lam"].check("lam", lam, "pdrop")
    if lam is None:
        lam = (budget / n_visual) ** (1.0 / s)
    counts = [max(int(round(n_visual * lam ** (i + 1))), budget) for i in range(s - 1)] + [budget]
    per_layer = layer_counts(n_visual, n_layers, layers, counts)
    return {"layers": layers, "counts": counts, "per_layer": per_layer, "equiv_tokens": equivalent_tokens(per_layer),
            "lam": lam}


@register_pruner("pdrop")
class PDrop(ProgressiveSchedule, Pruner):
    """PyramidDrop; see the module docstring."""

    stages = ("llm",)
    #: 2: each sample keeps its own in-LLM count (its images' own sizes and schedules; inert fillers)
    version = 2
    parameters = {
        "layers": Param(list, None, item=int, doc="pruning layers K; null: 8/16/24 of 32 scaled to the model"),
        "lam": Param(float, None, low=0, high=1, low_inclusive=False, search=("float", 0.3, 1.0),
                     doc="keep fraction per stage; null: derived from the budget"),
        "positions": Param(str, "original", choices=POSITIONS, doc="RoPE positions of the kept tokens"),
    }

    def __init__(self, budget: int | None = None, seed: int = 0, **params: Any) -> None:
        super().__init__(budget=budget, seed=seed, **params)
        self._schedule: dict[str, Any] | None = None

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        budget = self.budget if self.budget is not None else info.num_visual_tokens
        self._schedule = pdrop_schedule(
            info.num_visual_tokens, info.llm_num_layers, budget, self.params["layers"], self.params["lam"]
        )

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor:
        scores = ctx.attention_rows(ctx.layer - 1, "last")  # [B, Nv]
        return ctx.keep_top(scores, self.count_at(ctx.layer))
