"""The handle `apply_pruner` returns: what the last forward kept, token counts, and `remove()`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pruners.base import Pruner


@dataclass
class PruningHandle:
    """State shared between a user and the adapter for one attached pruner.

    kept_indices:  after each prefill, per sample a LongTensor of kept visual-token indices into the
                   ORIGINAL patch grid (raster order; LLaVA-NeXT: positions in the image's unpruned
                   packed run, see mllm_adapters/llava_next.py). Merged tokens have no grid index and
                   are not listed.
    kept_by_layer: after each prefill of an in-LLM method, {decoder layer K: per sample the kept
                   indices (as in kept_indices) of the visual tokens entering layer K}, one entry per
                   pruning layer; empty for methods that prune only before the LLM.
    token_counts:  {"visual_in": N, "vision": [tokens entering each ViT layer run, CLS included],
                    "llm_visual": [visual tokens entering each LLM decoder layer],
                    "merged": number of merged (non-grid) tokens reaching the LLM}.
    overhead_flops: FLOPs spent inside the pruner's own code (scoring, selection, merging) in the last
                   prefill, counted by torch.utils.flop_counter when ``count_overhead_flops`` is True.
    info:          facts the pruner reported (e.g. which text encoder a text-guided method used).
    """

    pruner: Pruner
    adapter: Any = None
    kept_indices: list[torch.Tensor] = field(default_factory=list)
    kept_by_layer: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    token_counts: dict[str, Any] = field(default_factory=dict)
    overhead_flops: int = 0
    count_overhead_flops: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    removed: bool = False

    def remove(self) -> None:
        """Detach every hook; the model behaves exactly as before `apply_pruner`."""
        if not self.removed and self.adapter is not None:
            self.adapter.remove()
        self.removed = True

    def __enter__(self) -> PruningHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
