"""Test-only helpers shared by the adapter tests: a fixed in-LLM pruner and a projector recorder."""

from __future__ import annotations

import torch

from pruners import register_pruner
from pruners.base import LLMLayerContext, Pruner


@register_pruner("_test_fixed_llm")
class FixedLLM(Pruner):
    """Test-only LLM-stage pruner keeping given visual indices after layer `layer`."""

    stages = ("llm",)
    defaults = {"layer": 2, "keep": None, "positions": "original"}

    def llm_layers(self) -> list[int]:
        return [self.params["layer"]]

    def llm_attention_layers(self) -> list[int]:
        return []

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor:
        return torch.as_tensor(self.params["keep"]).expand(ctx.visual_pos.shape[0], -1)


class ProjectorInputs:
    """Records what the projector receives (the adapter projects the LLM's visual tokens last)."""

    def __init__(self, model):
        self.calls: list[torch.Tensor] = []
        self.h = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: self.calls.append(a[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.h.remove()
