"""`visionzip` (VisionZip, CVPR'25): dominant tokens by [CLS] attention plus a few contextual tokens
that summarise the rest, as the authors' code (visionzip 0.1.3, `CLIPVisionTower_VisionZip.forward`)
computes them; docs/methods-pre-llm.md (visionzip) has the details and the reference test
(tests/test_reference_visionzip.py) compares it with that code.

Pre-LLM, both signals from the ViT layer whose output LLaVA feeds the LLM (layer -2 of CLIP-L):
- dominant: the [CLS] token's state at that layer plus the ``dominant - 1`` patches with the highest
  CLS attention (head-mean; the authors sum over heads: the same ranking). The authors' ``dominant=54``
  is CLS + 53 patches;
- contextual: the remaining patches (in raster order) are split into ``contextual`` groups around
  uniformly strided targets among them (every ``R // contextual``-th); every non-target goes to its most
  similar target by cosine similarity of that layer's keys (averaged over heads), and each contextual
  token is its target **plus** the mean of the non-targets assigned to it (a target with none stays
  itself).
``contextual = round(budget * contextual_ratio)`` with the paper's 10/64, ``dominant = budget -
contextual``: 64 -> 54 + 10, 128 -> 108 + 20, 192 -> 162 + 30. Order in the LLM: CLS, the dominant
patches in raster order, then the contextual tokens (the authors' order). The CLS token has no patch
index: it travels as an extra token (``merged``, anchored before the image's patches; on LLaVA-NeXT
before each tile's), so ``handle.kept_indices`` lists the dominant patches only, ``token_counts.merged``
counts CLS with the contextual tokens, and recall and overlays see patches only. Needs a [CLS] token.
"""

from __future__ import annotations

import torch

from pruners import ops
from pruners.base import PreLLMContext, PreLLMDecision, Pruner
from pruners.params import Param
from pruners.registry import register_pruner

CONTEXTUAL_RATIO = 10 / 64


def visionzip_split(budget: int, contextual_ratio: float = CONTEXTUAL_RATIO) -> tuple[int, int]:
    """(dominant, contextual) token counts for ``budget`` (e.g. 64 -> (54, 10)); dominant includes CLS."""
    contextual = min(budget - 1, int(round(budget * contextual_ratio))) if budget > 1 else 0
    return budget - contextual, contextual


def contextual_tokens(
    features: torch.Tensor, keys: torch.Tensor, dominant: torch.Tensor, num: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the non-dominant tokens into ``num`` contextual tokens: target + mean of its non-targets.

    features: [B, N, Dv]; keys: [B, N, Dk] similarity metric (head-mean keys); dominant: [B, d]
    indices kept as-is. Returns (merged [B, num, Dv], assign [B, N]: target group of each token,
    -1 for dominant tokens). Targets are every ``step``-th remaining token in raster order,
    ``step = max(1, R // num)`` with R remaining tokens.
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
    others = assign.scatter(1, targets, -1)  # [B, N] the non-targets' groups
    mean = ops.merge_tokens(features, others, num)  # [B, num, Dv]; 0 for a target with no members
    merged = features.gather(1, targets[..., None].expand(-1, -1, features.shape[-1])) + mean
    return merged, assign


@register_pruner("visionzip")
class VisionZip(Pruner):
    """``budget`` = dominant (CLS + top CLS attention) + contextual (merged by key similarity) tokens."""

    stages = ("pre_llm",)
    #: 2: the authors' code: CLS among the dominant tokens, contextual = target + mean of its group
    version = 2
    requires_cls = True
    #: docs/internvl.md, "Refused methods"
    conformance_opt_outs = {"*:internvl": (
        "reads the last N rows of the ViT keys as the N tokens' keys and merges the Dv-wide CLS "
        "state, but an InternVL token is a pixel-shuffled 2x2 unit (4 patch rows, 4 Dv wide): "
        "refused at attach"
    )}
    parameters = {
        "contextual_ratio": Param(float, CONTEXTUAL_RATIO, low=0, high=1, high_inclusive=False,
                                  search=("float", 0.0, 0.5), doc="share of the budget given to merged tokens"),
    }

    def vision_probe_layers(self) -> list[int]:
        return [self.info.vision_feature_layer]

    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        layer = self.info.vision_feature_layer
        n_dom, n_ctx = visionzip_split(self.budget, self.params["contextual_ratio"])
        B, N, _ = ctx.features.shape
        cls = ctx.cls_attention(layer)  # [B, N]
        dominant, _ = ops.select_and_gather(cls, n_dom - 1)  # [B, d - 1] ascending: CLS is the d-th
        _, k, _ = ctx.vision_qkv(layer)  # [B, H, 1+N, Dh]
        n_cls = k.shape[2] - N
        keys = k[:, :, n_cls:].mean(dim=1)  # [B, N, Dh] head-mean keys of the patches
        contextual, _ = contextual_tokens(ctx.features, keys, dominant, n_ctx)  # [B, c, Dv]
        cls_state = ctx.vision_hidden(layer)[:, :1].to(ctx.features.dtype)  # [B, 1, Dv] CLS at that layer
        merged = torch.cat([cls_state, contextual.to(ctx.features.dtype)], dim=1)  # [B, 1 + c, Dv]
        dev = ctx.features.device
        # CLS before the patches (anchor -1), the contextual tokens after the last one (anchor N - 1)
        anchor = torch.cat([torch.full((B, 1), -1, dtype=torch.long, device=dev),
                            torch.full((B, contextual.shape[1]), N - 1, dtype=torch.long, device=dev)], dim=1)
        return PreLLMDecision(
            keep=dominant,
            merged=merged,
            merged_anchor=anchor,
            info={"visionzip_split": [n_dom, int(contextual.shape[1])], "visionzip_cls_tokens": 1},
        )
