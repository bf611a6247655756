"""`visionzip` (VisionZip, CVPR'25): dominant tokens by [CLS] attention plus a few contextual tokens
that summarise the rest.

Spec: shared/specs/baselines.md. Pre-LLM, both signals from the ViT layer whose output LLaVA feeds
the LLM (layer -2 of CLIP-L):
- dominant: the ``budget - contextual`` patches with the highest CLS attention (head-mean; the same
  ranking as VisionZip's sum over heads), kept as-is;
- contextual: the remaining patches (in raster order) are split into ``contextual`` groups around
  uniformly strided targets among them; every non-target is assigned to its most similar target by
  cosine similarity of that layer's keys (averaged over heads), and each group becomes one token =
  the plain mean of the target and its assigned tokens (the ``merge_tokens`` op).
``contextual = round(budget * contextual_ratio)`` with the paper's 10/64: 64 -> 54 + 10,
128 -> 108 + 20, 192 -> 162 + 30. Contextual tokens follow the dominant ones (not in raster order),
as in VisionZip. Needs a vision encoder with a [CLS] token.
"""

from __future__ import annotations

import torch

from pruners import ops
from pruners.base import PreLLMContext, PreLLMDecision, Pruner
from pruners.params import Param
from pruners.registry import register_pruner

CONTEXTUAL_RATIO = 10 / 64


def visionzip_split(budget: int, contextual_ratio: float = CONTEXTUAL_RATIO) -> tuple[int, int]:
    """(dominant, contextual) token counts for ``budget`` (e.g. 64 -> (54, 10))."""
    contextual = min(budget - 1, int(round(budget * contextual_ratio))) if budget > 1 else 0
    return budget - contextual, contextual


def contextual_tokens(
    features: torch.Tensor, keys: torch.Tensor, dominant: torch.Tensor, num: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the non-dominant tokens into ``num`` contextual tokens.

    features: [B, N, Dv]; keys: [B, N, Dk] similarity metric (head-mean keys); dominant: [B, d]
    indices kept as-is. Returns (merged [B, num, Dv], assign [B, N]: target group of each token,
    -1 for dominant tokens). Targets are every ``step``-th remaining token in raster order,
    ``step = R // num`` with R remaining tokens.
    """
    B, N, _ = features.shape
    dev = features.device
    is_dom = torch.zeros(B, N, dtype=torch.bool, device=dev)
    is_dom.scatter_(1, dominant, True)
    R = N - dominant.shape[1]
    if num <= 0 or R <= 0:
        return features.new_zeros(B, 0, features.shape[-1]), torch.full((B, N), -1, dtype=torch.long, device=dev)
    num = min(num, R)
    # Remaining token indices in raster order: stable sort puts non-dominant first, ascending.
    rest = is_dom.long().argsort(dim=1, stable=True)[:, :R]  # [B, R]
    step = R // num
    tpos = torch.arange(num, device=dev) * step  # [num] positions of targets within `rest`
    targets = rest[:, tpos]  # [B, num]
    kn = torch.nn.functional.normalize(keys.float(), dim=-1)  # [B, N, Dk]
    sim = kn @ kn.gather(1, targets[..., None].expand(-1, -1, kn.shape[-1])).transpose(1, 2)  # [B, N, num]
    assign = sim.argmax(dim=2)  # [B, N] nearest target
    # Targets belong to their own group (a target's nearest target is itself up to ties).
    assign.scatter_(1, targets, torch.arange(num, device=dev).expand(B, -1))
    assign = assign.masked_fill(is_dom, -1)
    merged = ops.merge_tokens(features, assign, num)  # [B, num, Dv]
    return merged, assign


@register_pruner("visionzip")
class VisionZip(Pruner):
    """``budget`` = dominant (top CLS attention) + contextual (merged by key similarity) tokens."""

    stages = ("pre_llm",)
    requires_cls = True
    parameters = {
        "contextual_ratio": Param(float, CONTEXTUAL_RATIO, low=0, high=1, high_inclusive=False,
                                  search=("float", 0.0, 0.5), doc="share of the budget given to merged tokens"),
    }

    def vision_probe_layers(self) -> list[int]:
        return [self.info.vision_feature_layer]

    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        layer = self.info.vision_feature_layer
        n_dom, n_ctx = visionzip_split(self.budget, self.params["contextual_ratio"])
        cls = ctx.cls_attention(layer)  # [B, N]
        dominant, _ = ops.select_and_gather(cls, n_dom)  # [B, d] ascending
        _, k, _ = ctx.vision_qkv(layer)  # [B, H, 1+N, Dh]
        n_cls = k.shape[2] - ctx.features.shape[1]
        keys = k[:, :, n_cls:].mean(dim=1)  # [B, N, Dh] head-mean keys of the patches
        merged, _ = contextual_tokens(ctx.features, keys, dominant, n_ctx)
        return PreLLMDecision(
            keep=dominant,
            merged=merged if merged.shape[1] else None,
            info={"visionzip_split": [n_dom, int(merged.shape[1])]},
        )
