"""`psigmoid` (P-Sigmoid, Zhao et al., "Accelerating Multimodal Large Language Models by Searching Optimal
Vision Token Reduction", CVPR 2025, arXiv 2412.00556): in-LLM layer-wise visual-token reduction whose
per-layer keep fraction follows a parametric sigmoid of depth, tuned by Bayesian optimisation for a
compute budget. Doc: docs/methods/gsearch.md.

Decoder layer l of L (l >= 1; layer 0 sees every token) keeps the fraction
``f(l) = b + (1 - b) / (1 + exp(k * (l / L - alpha)))`` of the image's own visual tokens, before the
budget's scaling; ranking, budget semantics (equivalent tokens <= budget) and pruning layers are the
shared runtime's (`pruners._ratio_schedule`). ``budget=None`` keeps everything: P-Sigmoid is defined
for a budget. Every parameter declares its ``search=`` range, so the general tuner searches them
(``python -m benchmarks.tune method=psigmoid target_equiv_tokens=36``); ``method=psigmoid`` composes
the shipped tuned result ``conf/method/psigmoid_tuned_eq36.yaml``. Deviations from the paper (no
authors' code): on the doc page.
"""

from __future__ import annotations

import math

from pruners._ratio_schedule import RatioSchedulePruner
from pruners.base import ModelInfo
from pruners.params import POSITIONS, Param
from pruners.registry import register_pruner


def psigmoid_fractions(n_layers: int, k: float, alpha: float, b: float) -> list[float]:
    """The unscaled P-Sigmoid schedule of an ``n_layers``-layer LLM: 1 at layer 0, then
    ``b + (1 - b) / (1 + exp(k * (l / n_layers - alpha)))`` (non-increasing since k > 0)."""
    out = [1.0]
    for layer in range(1, n_layers):
        z = k * (layer / n_layers - alpha)
        sig = 1.0 / (1.0 + math.exp(z)) if z < 700 else 0.0  # exp overflow: the sigmoid is 0 there
        out.append(min(out[-1], b + (1.0 - b) * sig))
    return out


@register_pruner("psigmoid")
class PSigmoid(RatioSchedulePruner):
    """P-Sigmoid; see the module docstring."""

    version = 1
    parameters = {
        "k": Param(float, 10.0, low=0, high=1000, low_inclusive=False, search=("float", 1.0, 60.0, "log"),
                   doc="slope of the sigmoid in relative depth (> 0; larger = sharper drop)"),
        "alpha": Param(float, 0.5, low=0, high=1, search=("float", 0.0, 1.0),
                       doc="midpoint of the drop in relative depth l / L"),
        "b": Param(float, 0.0, low=0, high=1, high_inclusive=False, search=("float", 0.0, 0.5),
                   doc="floor of the keep fraction the deep layers approach (before the budget's scaling)"),
        "positions": Param(str, "original", choices=POSITIONS, doc="RoPE positions of the kept tokens"),
    }

    def shape(self, info: ModelInfo) -> list[float]:
        p = self.params
        return psigmoid_fractions(info.llm_num_layers, float(p["k"]), float(p["alpha"]), float(p["b"]))
