"""Shared runtime of the layer-wise keep-fraction pruners `gsearch` and `psigmoid` (Zhao et al.,
"Accelerating Multimodal Large Language Models by Searching Optimal Vision Token Reduction", CVPR 2025,
arXiv 2412.00556). Doc: docs/methods/gsearch.md "What prunebench implements".

Contract: a *schedule* is one keep FRACTION per decoder layer, ``f[0] == 1`` and non-increasing; an
image of ``n`` visual tokens keeps ``floor(f[l] * n + 0.5)`` (clamped to 0..n) from layer l on, ranked
by the instruction tokens' head-mean attention in layer l-1 (``ctx.attention_rows(l - 1,
"instruction")``), with original RoPE positions. A budget B counts equivalent tokens
(``sum_l n_l / L``): the shape is scaled by the largest ``s`` whose count is <= B (`scale_for_budget`),
except that nothing goes below n / L. Pruning layers do not depend on the image's size, so every
image's own counts are applied at the same layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from pruners._schedule import ProgressiveSchedule, equivalent_tokens
from pruners.base import LLMLayerContext, ModelInfo, Pruner

#: bisection steps of `scale_for_budget` (the step function's breakpoints are resolved far below 1e-12)
_BISECT_STEPS = 60
_STATE_KEY = "ratio_schedule_n"  # ctx.state: [B] each sample's visual tokens at the first pruning layer


def fraction_count(fraction: float, n: int) -> int:
    """Visual tokens an image of ``n`` keeps at keep fraction ``fraction``: floor(f * n + 0.5), in 0..n."""
    return max(0, min(int(n), int(math.floor(float(fraction) * n + 0.5))))


def check_fractions(fractions: Any, method: str, param: str = "schedule", n_layers: int | None = None) -> list[float]:
    """A keep-fraction schedule as a list of floats, else a ValueError naming ``param``: numbers in
    [0, 1], the first 1 (layer 0 sees every token), non-increasing; ``n_layers`` entries if given."""
    accepted = (f"a list of one keep fraction per decoder layer{f' ({n_layers} here)' if n_layers else ''}: "
                f"numbers in [0, 1], the first 1.0 (layer 0 sees every token), non-increasing")
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence):
        raise ValueError(f"{method}: parameter {param}={fractions!r} is not a list; accepted: {accepted}")
    out: list[float] = []
    for v in fractions:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or not 0 <= v <= 1:
            raise ValueError(f"{method}: parameter {param} has an item {v!r} that is not a number in [0, 1]; "
                             f"accepted: {accepted}")
        out.append(float(v))
    if not out:
        raise ValueError(f"{method}: parameter {param}=[] is empty; accepted: {accepted}")
    if out[0] != 1.0:
        raise ValueError(f"{method}: parameter {param} starts with {out[0]!r}, not 1.0; accepted: {accepted}")
    bad = [i for i in range(1, len(out)) if out[i] > out[i - 1]]
    if bad:
        i = bad[0]
        raise ValueError(f"{method}: parameter {param} increases at layer {i} ({out[i - 1]!r} -> {out[i]!r}); "
                         f"accepted: {accepted}")
    if n_layers is not None and len(out) != n_layers:
        raise ValueError(f"{method}: parameter {param} has {len(out)} entries but this model has {n_layers} decoder "
                         f"layers; accepted: {accepted}")
    return out


def schedule_counts(fractions: Sequence[float], n: int, scale: float = 1.0) -> list[int]:
    """Visual tokens entering each decoder layer: ``n`` at layer 0, ``count(min(1, scale * f[l]), n)``
    from layer 1 on (a non-increasing list of ``len(fractions)`` ints)."""
    return [int(n)] + [fraction_count(min(1.0, scale * f), n) for f in fractions[1:]]


def max_scale(fractions: Sequence[float]) -> float:
    """The largest scale s with every ``s * f[l] <= 1`` (l >= 1); 1 when every f[1:] is 0."""
    top = max(fractions[1:], default=0.0)
    return 1.0 / top if top > 0 else 1.0


def scale_for_budget(fractions: Sequence[float], n: int, budget: float) -> float:
    """The largest s in [0, `max_scale`] whose `schedule_counts` have equivalent tokens <= ``budget``
    (bisection on the non-decreasing step function); 0 when even s = 0 (every token dropped from layer
    1, n / L equivalent tokens) is above the budget."""
    hi = max_scale(fractions)
    if equivalent_tokens(schedule_counts(fractions, n, hi)) <= budget:
        return hi
    lo = 0.0
    if equivalent_tokens(schedule_counts(fractions, n, lo)) > budget:
        return 0.0
    for _ in range(_BISECT_STEPS):  # invariant: equiv(lo) <= budget < equiv(hi)
        mid = (lo + hi) / 2
        if equivalent_tokens(schedule_counts(fractions, n, mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def budget_counts(fractions: Sequence[float], n: int, budget: int | None) -> tuple[list[int], float]:
    """(per-layer counts, scale) of an image of ``n`` tokens under ``budget`` (None: as given, scale 1)."""
    if budget is None:
        return schedule_counts(fractions, n), 1.0
    s = scale_for_budget(fractions, n, budget)
    return schedule_counts(fractions, n, s), s


def resample_depth(fractions: Sequence[float], n_layers: int) -> list[float]:
    """``fractions`` (a schedule of ``len(fractions)`` layers) at the relative depths l / n_layers of a
    ``n_layers``-layer model: piecewise-linear in relative depth (layer j of the source at j / L_src),
    first entry 1, made non-increasing. A model of the source's depth gets the schedule unchanged."""
    src = list(fractions)
    m = len(src)
    out = [1.0]
    for layer in range(1, n_layers):
        x = layer * m / n_layers  # position on the source's layer axis
        j = min(int(math.floor(x)), m - 1)
        t = x - j
        v = src[j] if j + 1 >= m or t == 0 else src[j] * (1 - t) + src[j + 1] * t
        out.append(min(out[-1], v))
    return out


def pruning_layers(fractions: Sequence[float], scaled: bool) -> list[int]:
    """Layers K at which `prune_llm` runs (see the module docstring)."""
    layers = [k for k in range(2, len(fractions)) if fractions[k] < fractions[k - 1]]
    if len(fractions) > 1 and (scaled or fractions[1] < 1.0):
        layers = [1] + layers
    return layers


class RatioSchedulePruner(ProgressiveSchedule, Pruner):
    """Base of `gsearch` and `psigmoid`: subclasses give the shape (`shape`) and whether ``budget=None``
    runs it (`chooses_budget`); this turns it into per-image counts and prunes by instruction attention."""

    stages = ("llm",)
    #: the attention query rows ranking the visual tokens (the paper's: the instruction tokens)
    queries = "instruction"

    def __init__(self, budget: int | None = None, seed: int = 0, **params: Any) -> None:
        super().__init__(budget=budget, seed=seed, **params)
        self._fractions: list[float] | None = None

    def shape(self, info: ModelInfo) -> list[float]:
        """The unscaled keep-fraction schedule for ``info`` (``info.llm_num_layers`` entries)."""
        raise NotImplementedError

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        n = info.num_visual_tokens
        fractions = check_fractions(self.shape(info), self.name, n_layers=info.llm_num_layers)
        self._fractions = fractions
        budget = None if self.keeps_all else self.budget
        if self.keeps_all:
            counts, scale = [n] * info.llm_num_layers, 1.0
        else:
            counts, scale = budget_counts(fractions, n, budget)
        layers = pruning_layers(fractions, scaled=budget is not None)
        self._schedule = {
            "layers": layers, "counts": [counts[k] for k in layers], "per_layer": counts,
            "equiv_tokens": equivalent_tokens(counts), "fractions": fractions, "scale": scale,
        }

    @property
    def fractions(self) -> list[float]:
        """The unscaled schedule (after attach)."""
        assert self._fractions is not None, "attach() first"
        return list(self._fractions)

    @property
    def scale(self) -> float:
        """The budget's scale s of the schedule (after attach; 1 without a budget)."""
        return float(self._schedule["scale"])

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor:
        scores = ctx.attention_rows(ctx.layer - 1, self.queries)  # [B, Nv] head mean over the query rows
        if self.budget is None and ctx.keep_counts is not None:
            # As found (chooses_budget): the engine's per-sample counts mean "keep all" without a budget,
            # so each sample's count comes from its own visual tokens, read at the first pruning layer.
            real = ctx.key_mask.gather(1, ctx.visual_pos).sum(1)  # [B] current real visual tokens
            n0 = ctx.state.setdefault(_STATE_KEY, real.tolist())
            f = self._fractions[ctx.layer]
            own = torch.tensor([fraction_count(f, n) for n in n0], device=real.device)
            ctx.keep_counts = torch.minimum(own, real)
        return ctx.keep_top(scores, self.count_at(ctx.layer))
