"""`random`: keep `budget` visual tokens uniformly at random, in raster order (a strong baseline)."""

from __future__ import annotations

import torch

from pruners.base import PreLLMContext, PreLLMDecision, Pruner
from pruners.registry import register_pruner


@register_pruner("random")
class RandomPruner(Pruner):
    """Pre-LLM uniform random subset. The draw for an image depends only on (seed, image content),
    so the same image keeps the same tokens alone or in any batch."""

    stages = ("pre_llm",)
    uses_seed = True

    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        n = ctx.features.shape[1]
        keep = torch.stack([torch.randperm(n, generator=g)[: self.budget] for g in ctx.generators])  # [B, k]
        return PreLLMDecision(keep=keep.to(ctx.features.device))
