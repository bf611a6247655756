"""`transprune` (TransPrune, arXiv 2507.20630): progressive in-LLM pruning by Token Transition
Variation (TTV) plus Instruction-Guided Attention (IGA).

At each pruning layer K, per visual token j:
- TTV: for every decoder layer of the window and each of its attention and MLP sub-layers,
  x = the sub-layer input after its RMSNorm, y = its output (residual update):
  ||y_j|| / ||x_j|| * softmax_over_tokens(1 - cos(x_j, y_j)), summed over both sub-layers and over
  layers ``ttv_start``..K-1 (sums carried with the surviving tokens across pruning points).
  Computed by the fused op ``pruners.ops.transition_variation``.
- IGA: attention of the instruction tokens after the image to the visual tokens, from layer K's own
  q/k projections (with RoPE) applied to its input, head mean and mean over those queries
  (``ctx.layer_rows("instruction")``: only these rows are computed).
- score = TTV / sum(TTV) + IGA / sum(IGA); ``use_iga=False`` is the paper's "TTV alone". The top tokens
  are kept, in original order. No merging.

Schedule (`transprune_schedule`): the authors' K = 7, 9, 12 of LLaVA-1.5's 32 layers keeping 87.5%,
62.5% and 12.5% of the 576 image tokens (576 -> 504 -> 360 -> 72), scaled to the model's depth. The
count after the LAST pruning layer is the ``budget``; ``ratios`` are the fractions of the original
image tokens kept at the earlier ones (never fewer than the budget). Positions: compact (the authors')
by default where the family defines it.

The TTV window's reading, the positions measurement on the embedded model, every parameter and the
published numbers: docs/methods/transprune.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pruners._schedule import ProgressiveSchedule, check_layers, equivalent_tokens, layer_counts, scale_layers
from pruners.base import LLMLayerContext, ModelInfo, Pruner
from pruners.ops import transition_variation
from pruners.params import POSITIONS, Param
from pruners.registry import register_pruner

#: Authors' LLaVA-1.5 schedule: K values on a 32-layer model and keep fractions before the budget.
REF_LAYERS, REF_DEPTH = (7, 9, 12), 32
REF_RATIOS = (0.875, 0.625)
REF_FINAL_RATIO = 0.125  # 72 of 576: the budget that reproduces the authors' schedule


def transprune_schedule(
    n_visual: int,
    n_layers: int,
    budget: int | None = None,
    layers: Sequence[int] | None = None,
    ratios: Sequence[float] | None = None,
) -> dict[str, Any]:
    """TransPrune's token schedule without a model.

    Returns ``{"layers": [K...], "counts": [tokens kept from each K], "per_layer": [tokens entering
    each decoder layer], "equiv_tokens": float}``. ``budget=None`` uses the authors' final 12.5%.
    """
    layers = scale_layers(REF_LAYERS, REF_DEPTH, n_layers) if layers is None else check_layers(layers, n_layers)
    TransPrune.parameters["ratios"].check("ratios", ratios, "transprune")
    ratios = list(REF_RATIOS if ratios is None else ratios)
    if len(ratios) != len(layers) - 1:
        raise ValueError(
            f"ratios must hold one keep fraction per pruning layer except the last (whose count is the budget): "
            f"{len(layers) - 1} value(s) for layers={layers}, got {ratios!r}"
        )
    check_non_increasing(ratios)
    if budget is None:
        budget = max(1, int(round(REF_FINAL_RATIO * n_visual)))
    counts = [max(int(round(r * n_visual)), budget) for r in ratios] + [budget]
    per_layer = layer_counts(n_visual, n_layers, layers, counts)
    return {"layers": layers, "counts": counts, "per_layer": per_layer, "equiv_tokens": equivalent_tokens(per_layer)}


def check_non_increasing(ratios: Sequence[float], names: Sequence[str] | None = None) -> None:
    """Each pruning layer keeps at most the previous one's tokens: ratios must not increase.
    ``names`` (e.g. ``["ratio_1", "ratio_2"]``) names the flat parameters the ratios came from."""
    if all(a >= b for a, b in zip(ratios, ratios[1:])):
        return
    if names:
        given = "parameters " + ", ".join(f"{n}={r!r}" for n, r in zip(names, ratios)) + " increase"
    else:
        given = f"parameter ratios={list(ratios)!r} increases"
    rule = " >= ".join(names) if names else "ratios[0] >= ratios[1] >= ..."
    raise ValueError(
        f"transprune: {given}; accepted: non-increasing keep fractions ({rule}), "
        f"since each pruning layer keeps at most the tokens the previous one kept"
    )


def layer_ttv(capture: dict[str, torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """TTV of one decoder layer: attention-sub-layer TTV + MLP-sub-layer TTV, [B, L] fp32.

    capture: {"attn_in", "attn_out", "mlp_in", "mlp_out"}, each [B, L, D] (inputs after their RMSNorm,
    outputs before the residual add); mask: [B, L] bool, True = real token (softmax over those only).
    """
    ttv = transition_variation(capture["attn_in"], capture["attn_out"], mask=mask)  # [B, L]
    return ttv + transition_variation(capture["mlp_in"], capture["mlp_out"], mask=mask)


@register_pruner("transprune")
class TransPrune(ProgressiveSchedule, Pruner):
    """TTV (+ IGA) progressive pruning inside the LLM; see the module docstring."""

    stages = ("llm",)
    #: 2: each sample keeps its own in-LLM count (its images' own sizes and schedules; inert fillers)
    version = 2
    parameters = {
        "layers": Param(list, None, item=int, doc="pruning layers K; null: the authors' 7/9/12 of 32 scaled to the model"),
        "ratios": Param(list, None, item=float, low=0, high=1, low_inclusive=False,
                        doc="keep fractions of the image tokens at every K but the last; null: 0.875, 0.625"),
        "use_iga": Param(bool, True, doc="add instruction-guided attention to TTV (false: TTV alone)"),
        "ttv_start": Param(int, None, doc="first decoder layer whose TTV is accumulated; null: layers[0] - 1"),
        "positions": Param(str, None, choices=POSITIONS,
                           doc="RoPE positions of the kept tokens; null: compact (the authors') where the model "
                               "family defines it (1-D RoPE), else original (M-RoPE)"),
        # Tuner-friendly flat spellings of `ratios` (one per pruning layer but the last).
        "ratio_1": Param(float, None, low=0, high=1, low_inclusive=False, search=("float", 0.5, 1.0),
                         folds_into="ratios", doc="ratios[0], for the tuner"),
        "ratio_2": Param(float, None, low=0, high=1, low_inclusive=False, search=("float", 0.25, 1.0),
                         folds_into="ratios", doc="ratios[1], for the tuner"),
    }

    def __init__(self, budget: int | None = None, seed: int = 0, **params: Any) -> None:
        super().__init__(budget=budget, seed=seed, **params)
        self._schedule: dict[str, Any] | None = None

    def check_params(self) -> None:
        flat = self.folded_params
        if flat:
            if self.params["ratios"] is not None:
                raise ValueError(
                    f"transprune: give the keep fractions either as ratios=[...] or as ratio_1, ratio_2 (one per "
                    f"pruning layer but the last), not both; got {sorted(flat)} with ratios={self.params['ratios']!r}"
                )
            if "ratio_1" not in flat:
                raise ValueError(f"transprune: parameter ratio_2={flat['ratio_2']!r} needs ratio_1 (the first keep "
                                 f"fraction); accepted: ratio_1 alone, ratio_1 and ratio_2, or ratios=[...]")
            names = [k for k in ("ratio_1", "ratio_2") if k in flat]
            check_non_increasing([flat[k] for k in names], names)
            self.params["ratios"] = [float(flat[k]) for k in names]
        elif self.params["ratios"] is not None:
            check_non_increasing(self.params["ratios"])

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        budget = self.budget if self.budget is not None else info.num_visual_tokens
        self._schedule = transprune_schedule(
            info.num_visual_tokens, info.llm_num_layers, budget, self.params["layers"], self.params["ratios"]
        )
        start = self.params["ttv_start"]
        first = self._schedule["layers"][0]
        if start is None:
            start = first - 1
        if not 0 <= start < first:
            raise ValueError(
                f"transprune: parameter ttv_start={start!r} is not before the first pruning layer ({first}); "
                f"accepted: an int in 0..{first - 1} or null (layers[0] - 1)"
            )
        self._ttv_start = start

    def llm_attention_layers(self) -> list[int]:
        return []  # IGA uses layer K's own rows (ctx.layer_rows)

    def llm_capture_layers(self) -> list[int]:
        if not self._schedule or self.keeps_all:
            return []
        return list(range(self._ttv_start, self._schedule["layers"][-1]))

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor:
        layers = self._schedule["layers"]
        stage = layers.index(ctx.layer)
        k = self._schedule["counts"][stage]
        lo = self._ttv_start if stage == 0 else layers[stage - 1]
        caps = ctx.captures
        vis = ctx.visual_pos  # [B, Nv]
        ttv = ctx.state.get("ttv")  # [B, Nv] sums carried from earlier windows
        if ttv is None:
            ttv = torch.zeros(vis.shape, dtype=torch.float32, device=vis.device)
        for j in range(lo, ctx.layer):
            ttv = ttv + layer_ttv(caps.pop(j), ctx.key_mask).gather(1, vis)  # [B, Nv]; frees the capture
        ttv = ttv.masked_fill(~ctx.key_mask.gather(1, vis), 0.0)  # slots the engine made inert carry none
        score = ttv / ttv.sum(1, keepdim=True).clamp(min=1e-12)  # [B, Nv]
        if self.params["use_iga"]:
            iga = ctx.layer_rows("instruction").float()  # [B, Nv]
            score = score + iga / iga.sum(1, keepdim=True).clamp(min=1e-12)
        keep = ctx.keep_top(score, k).sort(dim=1).values  # [B, k], original order
        ctx.state["ttv"] = ttv.gather(1, keep)
        return keep
