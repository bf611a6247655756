"""Test-only helpers shared by the adapter tests: a fixed in-LLM pruner, a projector recorder and
greedy decoding by full recompute."""

from __future__ import annotations

import torch

from mllm_adapters import apply_pruner
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


#: processor outputs describing the images (passed through wherever the pixels are)
IMAGE_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw")


def greedy_recompute(model, inputs, steps: int, method: str, params: dict) -> torch.Tensor:
    """Greedy decoding without a KV cache: the whole prompt plus the generated tokens re-run each step
    under pruner ``method`` (``params`` include the budget). Image inputs (``pixel_values`` and, for
    LLaVA-NeXT, ``image_sizes``) are passed through. Returns the step logits [B, steps, V]."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image = {k: inputs[k] for k in IMAGE_INPUTS if k in inputs}
    mm = inputs.get("mm_token_type_ids")  # Qwen: 0 for text, so generated tokens extend it with zeros
    out = []
    with apply_pruner(model, method, **params):
        for _ in range(steps):
            extra = {} if mm is None else {"mm_token_type_ids": mm}
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, **image, **extra, use_cache=False).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            out.append(logits)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            if mm is not None:
                mm = torch.cat([mm, torch.zeros_like(nxt)], 1)
    return torch.stack(out, 1)
