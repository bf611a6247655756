"""`fastv` (FastV, ECCV'24): inside the LLM after layer K, keep the visual tokens the last token
attends to most at layer K-1 (head-mean).

Only one attention row is computed (from layer K-1's q/k), so the model can run SDPA or
FlashAttention everywhere. Kept tokens keep their original RoPE positions by default.
Signal, budget, parameters and published numbers: docs/methods/fastv.md.
"""

from __future__ import annotations

import torch

from pruners.base import LLMLayerContext, ModelInfo, Pruner
from pruners.params import POSITIONS, Param, check_decoder_layer
from pruners.registry import register_pruner


@register_pruner("fastv")
class FastV(Pruner):
    stages = ("llm",)
    #: 2: each sample keeps its own in-LLM count (its images' own sizes and schedules; inert fillers)
    version = 2
    parameters = {
        "layer": Param(int, 2, doc="decoder layer K: layers K.. see only the kept tokens (1..L-1)"),
        "positions": Param(str, "original", choices=POSITIONS, doc="RoPE positions of the kept tokens"),
    }

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        check_decoder_layer("fastv", self.params["layer"], info.llm_num_layers)

    def llm_layers(self) -> list[int]:
        return [self.params["layer"]]

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor:
        scores = ctx.attention_rows(self.params["layer"] - 1, "last")  # [B, Nv]
        return ctx.keep_top(scores, self.budget)
