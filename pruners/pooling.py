"""`pooling`: spatial average pooling of the patch grid down to about ``budget`` tokens.

The "downsampling" baseline of VTC-Bench (docs/methods/pooling.md). Pre-LLM. The grid
(rows x cols) is partitioned into an output grid of (h, w) near-equal blocks with h * w <= budget,
as square as the grid allows; each output token is the mean of its block's features (before the
projector), computed with the ``merge_tokens`` op. Output tokens are in raster order of the blocks.

Why "about": a 24 x 24 grid at budget 64 pools to 8 x 8 = 64 exactly; budget 128 gives 11 x 11 =
121 (never more than the budget, so the comparison is not tilted in pooling's favour). The actual
count is reported in ``PreLLMDecision.info["pooled_grid"]``.
"""

from __future__ import annotations

import math

import torch

from pruners import ops
from pruners.base import PreLLMContext, PreLLMDecision, Pruner
from pruners.registry import register_pruner


def pooled_grid(grid_hw: tuple[int, int], budget: int) -> tuple[int, int]:
    """Output grid (h, w) with h * w <= budget, h <= rows, w <= cols, aspect close to the input grid."""
    rows, cols = grid_hw
    h = max(1, min(rows, int(math.floor(math.sqrt(budget * rows / cols)))))
    w = max(1, min(cols, budget // h))
    return h, w


def block_assignment(patch_index: torch.Tensor, grid_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """[B, N] output-block index of each patch: patch (r, c) -> block (r * h // rows, c * w // cols).

    ``patch_index`` [B, N] is each feature's raster index in the original grid.
    """
    rows, cols = grid_hw
    h, w = out_hw
    r, c = patch_index // cols, patch_index % cols
    return (r * h // rows) * w + (c * w // cols)


@register_pruner("pooling")
class Pooling(Pruner):
    """Average-pool the patch grid to an (h, w) grid with h * w <= budget (no tokens kept as-is)."""

    stages = ("pre_llm",)

    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        out_hw = pooled_grid(self.info.grid_hw, self.budget)
        assign = block_assignment(ctx.patch_index, self.info.grid_hw, out_hw)  # [B, N]
        merged = ops.merge_tokens(ctx.features, assign, out_hw[0] * out_hw[1])  # [B, h*w, Dv]
        B = ctx.features.shape[0]
        keep = torch.empty(B, 0, dtype=torch.long, device=ctx.features.device)  # [B, 0]
        return PreLLMDecision(keep=keep, merged=merged, info={"pooled_grid": list(out_hw)})
