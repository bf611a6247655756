"""`flowcut` (FlowCut, arXiv 2505.19536): prune patch tokens progressively INSIDE the ViT by their
information flow, so the vision encoder itself gets cheaper.

Stage ``vision``: after every ViT layer before the feature layer, the patches (CLS excluded) are
scored by CLS relation + value similarity x value magnitude, accumulated over layers, and cut on
every other layer by an entropy-adaptive amount (`flowcut_cut`), reaching ``budget`` at the feature
layer; CLS is always kept. Contract: the LLM receives the ``budget`` surviving patch features;
``handle.token_counts[b].vision`` lists the tokens entering each ViT layer. Each image follows its
own schedule: shorter rows are padded (-1) and the adapter masks the padding as keys, so a batch
equals its images alone (``handle.batch_counts.vision_width``). On LLaVA-NeXT it runs per anyres
tile (`mllm_adapters/engine/views.py`). The formulas, the deviations (batches, the authors' second
prune inside the LLM not implemented) and published numbers: docs/methods/flowcut.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pruners import ops
from pruners.base import ModelInfo, Pruner, VisionLayerContext
from pruners.registry import register_pruner


def layers_left(feature_layer: int, layer: int) -> int:
    """rpl: ViT layers still to run after ``layer`` before the feature layer's output is taken,
    minus one (0 at the last pruning point, F - 1)."""
    return feature_layer - layer - 1


def flowcut_cut(n: int, target: int, rpl: int, ratio: float) -> int:
    """Tokens to drop at a layer with ``rpl`` layers left (rpl even and >= 0), ``n`` current patches,
    and normalised CLS-attention entropy ``ratio`` = H / log(n) in [0, 1]."""
    if n <= target or rpl < 0 or rpl % 2:
        return 0
    if rpl == 0:
        return n - target
    cut = int(round((n - target) / math.sqrt(rpl) * (1.0 - ratio**2)))
    return max(0, min(cut, n - target))


def flowcut_schedule(
    num_patches: int, target: int, feature_layer: int, ratio: float | Callable[[int, int], float]
) -> list[int]:
    """Patch counts entering each ViT layer 0..feature_layer under FlowCut's schedule.

    ``ratio`` is the normalised entropy H / log(N) of the CLS attention, a constant or a function
    (layer, current count) -> ratio. No model needed (the schedule is data-dependent only through it).
    """
    counts, n = [], num_patches
    for i in range(feature_layer + 1):
        counts.append(n)
        if i < feature_layer:
            rho = ratio(i, n) if callable(ratio) else ratio
            n -= flowcut_cut(n, target, layers_left(feature_layer, i), rho)
    return counts


def entropy_ratio(relation: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] H(r / sum r) / log(N_b) over the real patches (mask [B, N]); 0 when N_b <= 1."""
    r = relation.float().masked_fill(~mask, 0.0)
    p = r / r.sum(1, keepdim=True).clamp(min=1e-30)
    h = -(p * p.clamp(min=1e-30).log()).sum(1)  # [B]
    n = mask.sum(1).float()
    return torch.where(n > 1, h / n.clamp(min=2).log(), torch.zeros_like(h)).clamp(0.0, 1.0)


def flow_scores(
    relation: torch.Tensor, v: torch.Tensor, n_cls: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, N] FlowCut's per-patch score (r / sum r + s / sum s) * m.

    relation: [B, N] CLS->patch attention; v: [B, H, n_cls + N, Dh] this layer's values; mask: [B, N]
    real patches (padded ones score 0).
    """
    B, N = relation.shape
    if mask is None:
        mask = torch.ones(B, N, dtype=torch.bool, device=relation.device)
    vp = v[:, :, n_cls:]  # [B, H, N, Dh]
    keys = torch.cat([torch.ones(B, n_cls, dtype=torch.bool, device=mask.device), mask], dim=1)  # CLS + patches
    sem = ops.attention_rows(v[:, :, :1], v, key_mask=keys, scale=1.0)[:, 0, n_cls:]  # [B, N]
    mag = vp.float().mean(dim=1).abs().sum(-1)  # [B, N]
    r = relation.float().masked_fill(~mask, 0.0)
    score = (r / r.sum(1, keepdim=True).clamp(min=1e-30) + sem / sem.sum(1, keepdim=True).clamp(min=1e-30)) * mag
    return score.masked_fill(~mask, 0.0)


@register_pruner("flowcut")
class FlowCut(Pruner):
    """Progressive in-ViT pruning by cumulative information flow with an entropy-adaptive schedule."""

    stages = ("vision",)
    requires_cls = True
    #: docs/internvl.md, "Refused methods"
    conformance_opt_outs = {"*:internvl": (
        "cuts single patches inside the ViT; InternVL's pixel shuffle needs every 2x2 unit whole, "
        "so the family spec refuses the vision stage at attach"
    )}
    #: 2: the semantic softmax includes the CLS token, as the authors' code (version 1: patches only)
    version = 2

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        if info.vision_feature_layer < 1:
            raise ValueError(
                f"flowcut prunes between ViT layers before the feature layer, but this model's feature layer "
                f"is {info.vision_feature_layer}; it needs >= 1"
            )

    def vision_layers(self) -> list[int]:
        return list(range(self.info.vision_feature_layer))

    def prune_vision(self, ctx: VisionLayerContext) -> torch.Tensor | None:
        B, N = ctx.patch_index.shape
        mask = ctx.patch_mask if ctx.patch_mask is not None else torch.ones(B, N, dtype=torch.bool)
        mask = mask.to(ctx.patch_index.device)
        relation = ctx.cls_attention()  # [B, N]
        _, _, v = ctx.qkv()  # [B, H, 1+N, Dh]
        score = flow_scores(relation, v, v.shape[2] - N, mask)  # [B, N]
        cum = ctx.state.get("flowcut_cum")
        cum = score if cum is None else 0.5 * cum + 0.5 * score  # [B, N]
        ctx.state["flowcut_cum"] = cum
        rpl = layers_left(self.info.vision_feature_layer, ctx.layer)
        if rpl < 0 or rpl % 2:
            return None
        n_real = mask.sum(1).tolist()  # real patches per image (padding sits at the end of each row)
        ratios = entropy_ratio(relation, mask).tolist()
        keep_n = [n - flowcut_cut(n, self.budget, rpl, rho) for n, rho in zip(n_real, ratios)]
        if all(k == n for k, n in zip(keep_n, n_real)):
            return None
        kmax = max(keep_n)
        keep = torch.full((B, kmax), -1, dtype=torch.long, device=cum.device)  # [B, kmax], -1 = padding
        new_cum = torch.zeros(B, kmax, dtype=cum.dtype, device=cum.device)
        for b in range(B):
            idx, (c,) = ops.select_and_gather(
                cum[b : b + 1], keep_n[b], valid_len=torch.tensor([n_real[b]], device=cum.device),
                tensors=(cum[b : b + 1],),
            )
            keep[b, : keep_n[b]] = idx[0]
            new_cum[b, : keep_n[b]] = c[0]
        # Kept indices are ascending with padding last: the adapter's raster re-sort leaves them in
        # this order, so the carried scores stay aligned with the surviving tokens.
        ctx.state["flowcut_cum"] = new_cum
        return keep
