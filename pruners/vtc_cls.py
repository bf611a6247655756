"""`vtc_cls` (VTC-CLS, arXiv 2412.05819): keep the patches the ViT [CLS] token attends to most,
summed over the ViT layers from ``start_layer`` up to the feature layer LLaVA feeds the LLM.

Spec: shared/specs/vtc_cls.md. Pre-LLM, no merging, the ViT runs in full. The kept patches are
taken from LLaVA's own features (layer -2, CLS dropped) and the adapter re-sorts them into raster
order, so the LLM sees a shorter contiguous prompt. Needs a vision encoder with a [CLS] token.

Scores come from ``ctx.cls_attention(layer)`` (one head-mean CLS row per layer, computed by the
``attention_rows`` op, never the full attention map); the top-k uses ``select_and_gather``.
"""

from __future__ import annotations

import torch

from pruners import ops
from pruners.base import ModelInfo, PreLLMContext, PreLLMDecision, Pruner
from pruners.registry import register_pruner

#: VTC-CLS's default start layer (authors' CLI) for the 24-layer CLIP-L/336 of LLaVA-1.5.
REF_START_LAYER, REF_DEPTH = 16, 24
ENSEMBLES = ("sum", "min", "max")


def resolve_start_layer(start_layer: int | None, info: ModelInfo) -> int:
    """The first summed ViT layer for this model.

    ``None`` scales the authors' 16-of-24 to the model's depth (16 for CLIP-L; layer 3 of a 4-layer
    ViT, clamped to the feature layer), so the default is meaningful on small models too.
    A non-negative value is used as given; a negative one counts back from the end of the ViT
    (-2 = the feature layer of LLaVA-1.5, -8 = layer 16 of 24) and starts at layer 0 at the earliest,
    so one negative range serves encoders of any depth (the tuner's search space).
    """
    n, feat = info.vision_num_layers, info.vision_feature_layer
    if start_layer is None:
        return min(feat, int(round(REF_START_LAYER * n / REF_DEPTH)))
    s = max(0, n + start_layer) if start_layer < 0 else start_layer
    if not 0 <= s <= feat:
        raise ValueError(
            f"start_layer={start_layer} is after the feature layer ({feat}) whose output LLaVA takes; "
            f"accepted: None (scaled default), an int in 0..{feat}, or a negative int <= {feat - n}"
        )
    return s


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
    defaults = {"start_layer": None, "ensemble": "sum"}
    search_space = {"start_layer": ("int", -9, -2), "ensemble": ("categorical", list(ENSEMBLES))}

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        if self.params["ensemble"] not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {self.params['ensemble']!r}")
        sl = self.params["start_layer"]
        if sl is not None and (isinstance(sl, bool) or not isinstance(sl, int)):
            raise ValueError(f"start_layer must be an int or None (scaled default), got {sl!r}")
        self._start = resolve_start_layer(sl, info)

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
