"""`vtc_cls` (VTC-CLS, arXiv 2412.05819): keep the patches the ViT [CLS] token attends to most,
summed over the ViT layers from ``start_layer`` up to the feature layer LLaVA feeds the LLM.

Pre-LLM, no merging, the ViT runs in full. The kept patches are taken from LLaVA's own features
(layer -2, CLS dropped) and the adapter re-sorts them into raster order, so the LLM sees a shorter
contiguous prompt. Needs a vision encoder with a [CLS] token.

Scores come from ``ctx.cls_attention(layer)`` (one head-mean CLS row per layer, computed by the
``attention_rows`` op, never the full attention map); the top-k uses ``select_and_gather``.
The layer choice, parameters and published numbers (and `fastervlm`, a configuration of this
method): docs/methods/vtc_cls.md.
"""

from __future__ import annotations

import torch

from pruners import ops
from pruners.base import ModelInfo, PreLLMContext, PreLLMDecision, Pruner
from pruners.params import Param, layer_index
from pruners.registry import register_pruner

#: VTC-CLS's default start layer (authors' CLI) for the 24-layer CLIP-L/336 of LLaVA-1.5.
REF_START_LAYER, REF_DEPTH = 16, 24
ENSEMBLES = ("sum", "min", "max")


def resolve_start_layer(start_layer: int | None, info: ModelInfo) -> int:
    """The first summed ViT layer for this model.

    ``None`` scales the authors' 16-of-24 to the model's depth (16 for CLIP-L; layer 3 of a 4-layer
    ViT, clamped to the feature layer), so the default is meaningful on small models too.
    A non-negative value is used as given; a negative one counts back from the end of the ViT
    (-2 = the feature layer of LLaVA-1.5, -8 = layer 16 of 24). Either must name a layer in
    0..feature layer, else a ValueError naming ``start_layer`` and the accepted range.
    """
    n, feat = info.vision_num_layers, info.vision_feature_layer
    default = min(feat, int(round(REF_START_LAYER * n / REF_DEPTH)))
    return layer_index("vtc_cls", "start_layer", start_layer, n, feat, default)


def cls_layer_scores(rows: list[torch.Tensor], ensemble: str = "sum") -> torch.Tensor:
    """Combine per-layer CLS attention rows ([B, N] each) into one score per patch: [B, N].

    ``sum`` is the paper's default; ``min``/``max`` are the ensembles it also discusses.
    """
    stacked = torch.stack([r.float() for r in rows], dim=0)  # [Lyr, B, N]
    if ensemble == "sum":
        return stacked.sum(0)
    if ensemble == "min":
        return stacked.min(0).values
    if ensemble == "max":
        return stacked.max(0).values
    raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")


def select_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] indices of the k highest scores per row, ascending (raster) order, via the fused op."""
    keep, _ = ops.select_and_gather(scores, k)
    return keep


@register_pruner("vtc_cls")
class VTCCLS(Pruner):
    """Top-``budget`` patches by ViT [CLS] attention summed over layers ``start_layer``..feature layer."""

    stages = ("pre_llm",)
    requires_cls = True
    parameters = {
        "start_layer": Param(int, None, search=("int", -9, -2),
                             doc="first summed ViT layer (negative: from the end); null: 16 of 24 scaled"),
        "ensemble": Param(str, "sum", choices=ENSEMBLES, search=("categorical", list(ENSEMBLES)),
                          doc="how the per-layer CLS rows combine"),
    }

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        self._start = resolve_start_layer(self.params["start_layer"], info)

    def vision_probe_layers(self) -> list[int]:
        return list(range(self._start, self.info.vision_feature_layer + 1))

    def scores(self, ctx: PreLLMContext) -> torch.Tensor:
        """[B, N] combined CLS attention of the declared layers."""
        return cls_layer_scores([ctx.cls_attention(i) for i in self.vision_probe_layers()], self.params["ensemble"])

    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        scores = self.scores(ctx)  # [B, N]
        keep = select_top(scores, self.budget)  # [B, k]
        return PreLLMDecision(
            keep=keep,
            info={"vtc_cls_layers": [self._start, self.info.vision_feature_layer]},
        )
