"""`fopru` (FoPru, "FoPru: Focal Pruning for Efficient Large Vision-Language Models", arXiv 2411.14164):
training-free, pre-LLM pruning by an attention-based token significance read from the vision encoder,
with two strategies, and the kept tokens put back in their original (raster) order.
docs/methods/fopru.md has the sources, what was followed and what was defined here.

Significance (one ViT layer: the one whose output feeds the LLM, ``info.vision_feature_layer``):

- ``significance="auto"`` (default): ``A`` = the head-mean softmax attention of that layer between the
  feature tokens only (the [CLS] row and column dropped on CLIP towers; Qwen's merged units as
  ``ctx.vision_attention`` gives them). ``s1`` = column means of ``A`` (how much each token is attended
  to), ``s2`` = row means of ``A`` (on CLIP: ``(1 - attention to CLS) / N``); per image the one with the
  larger (unbiased) variance is the significance (``s1 if var(s1) > var(s2) else s2``), as the public ``focal_prunning`` implementation
  (dongxianzhe/hydrainfer, ``layer/token_prunning.py``) computes it;
- ``significance="received"``: ``s1`` only (column means over the feature-token queries, CLS query
  excluded like the reference); ``significance="cls"``: the [CLS] row (``ctx.cls_attention``),
  refused at attach on encoders without [CLS].

Strategies (``k = min(budget, N)``):

- ``rank``: the ``k`` most significant tokens of the image (ties: lower raster index), via
  ``ops.select_and_gather``;
- ``row``: rows of the (current image / view / tile) patch grid ``ctx.info.grid_hw = (H, W)`` ranked by
  the sum of their tokens' significance (ties: upper row first); the top ``k // W`` rows are kept whole
  and, when ``W`` does not divide ``k``, the ``k % W`` most significant tokens of the next-ranked row
  fill the budget exactly (our definition; the reference keeps whole rows only).
"""

from __future__ import annotations

import torch

from pruners import ops
from pruners.base import PreLLMContext, PreLLMDecision, Pruner
from pruners.params import Param
from pruners.registry import register_pruner

STRATEGIES = ("rank", "row")
SIGNIFICANCES = ("auto", "received", "cls")


def focal_significance(attn: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(significance [B, N], use_column [B] bool) from head-mean attention ``attn`` [B, T, T] whose last
    ``n`` tokens are the feature tokens: column means vs row means of the feature-token block, per
    image the one with the larger unbiased variance (column means unless the row means' is larger)."""
    a = attn[:, attn.shape[1] - n:, attn.shape[2] - n:].float()  # [B, N, N] feature tokens only
    s1 = a.mean(1)  # [B, N] column means: attention each token receives
    s2 = a.mean(2)  # [B, N] row means
    use_col = s1.var(dim=1) > s2.var(dim=1)  # [B]
    return torch.where(use_col[:, None], s1, s2), use_col


def rank_select(sig: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] raster-ordered indices of the ``k`` most significant tokens (ties: lower index)."""
    keep, _ = ops.select_and_gather(sig, min(k, sig.shape[1]))
    return keep


def row_select(sig: torch.Tensor, grid_hw: tuple[int, int], k: int) -> torch.Tensor:
    """[B, k] raster-ordered indices: the top ``k // W`` rows by summed significance kept whole, then the
    ``k % W`` most significant tokens of the next-ranked row. ``sig`` [B, H * W] in raster order."""
    B, N = sig.shape
    H, W = grid_hw
    if H * W != N:
        raise ValueError(f"fopru strategy='row': {N} tokens do not fill the patch grid {H} x {W}")
    k = min(k, N)
    s = sig.float().reshape(B, H, W)
    rows = torch.sort(s.sum(2), dim=1, descending=True, stable=True).indices  # [B, H]
    n_full, rem = divmod(k, W)
    cols = torch.arange(W, device=sig.device)
    parts = [(rows[:, :n_full, None] * W + cols).reshape(B, n_full * W)]  # [B, n_full * W]
    if rem:
        nxt = rows[:, n_full]  # [B] the next-ranked row
        in_row = s[torch.arange(B, device=sig.device), nxt]  # [B, W]
        top = torch.sort(in_row, dim=1, descending=True, stable=True).indices[:, :rem]  # [B, rem]
        parts.append(nxt[:, None] * W + top)
    return torch.cat(parts, dim=1).sort(dim=1).values


@register_pruner("fopru")
class FoPru(Pruner):
    """Top-``budget`` tokens (``rank``) or top rows (``row``) by ViT attention significance."""

    stages = ("pre_llm",)
    #: False: the default significance needs no [CLS]; ``attach`` refuses ``significance="cls"`` itself
    requires_cls = False
    cls_param = ("significance", "significance='auto' or significance='received'")
    parameters = {
        "strategy": Param(str, "rank", choices=STRATEGIES, search=("categorical", list(STRATEGIES)),
                          doc="'rank': globally most significant tokens; 'row': most significant whole rows"),
        "significance": Param(str, "auto", choices=SIGNIFICANCES,
                              doc="'auto': column or row means of the patch attention, the higher-variance "
                                  "one (reference implementation); 'received': column means; 'cls': [CLS] row"),
    }

    def vision_probe_layers(self) -> list[int]:
        return [self.info.vision_feature_layer]

    def significance(self, ctx: PreLLMContext) -> tuple[torch.Tensor, str]:
        """([B, N] significance of the feature tokens, which signal was used)."""
        layer = self.info.vision_feature_layer
        mode = self.params["significance"]
        if mode == "cls":
            return ctx.cls_attention(layer).float(), "cls"
        n = ctx.features.shape[1]
        if mode == "received":
            a = ctx.vision_attention(layer)
            return a[:, a.shape[1] - n:, a.shape[2] - n:].float().mean(1), "received"
        sig, use_col = focal_significance(ctx.vision_attention(layer), n)
        return sig, ",".join("column" if c else "row" for c in use_col.tolist())

    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        sig, used = self.significance(ctx)
        if self.params["strategy"] == "rank":
            keep = rank_select(sig, self.budget)
        else:
            keep = row_select(sig, tuple(ctx.info.grid_hw), self.budget)
        return PreLLMDecision(keep=keep, info={"fopru_strategy": self.params["strategy"], "fopru_signal": used})
