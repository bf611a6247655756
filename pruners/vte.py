"""`vte` (visual-token exit, the training-free baseline of "Accelerating Multimodal Large Language
Models via Dynamic Visual-Token Exit and the Empirical Findings"; authors' code DoubtedSteam/DyVTE):
after decoder layer K every visual token leaves the sequence. Layers K.. see only the text tokens
(which keep their positions) and their KV cache holds no visual token. Doc: docs/methods/vte.md.

There is no score: the exit removes all visual tokens of the image at once, as the authors' exit
(`LlamaModel.forward`, inference branch) cuts the image span out of hidden states, positions and the
attention mask. The learned per-sample exit layer of DyVTE (its router) is not part of this method.

K: ``layer`` sets it directly (1..L-1); else it is derived from ``budget`` through the equivalent
(layer-averaged) visual-token count, ``N*K/L`` for N visual tokens per image (the model's
``num_visual_tokens``) and L decoder layers (`vte_layer`): the smallest K in 1..L-1 with
``N*K/L >= budget`` (as for the other in-LLM methods, the equivalent count is at least the budget),
K = L-1 when none reaches it. ``budget >= N``
keeps everything (no exit), as for every method. Giving both ``layer`` and ``budget`` is accepted only
when the budget maps to that same K (a ValueError naming both otherwise); ``layer`` with
``budget=None`` exits at ``layer`` (`chooses_budget`: the method picks its own token count).
"""

from __future__ import annotations

from typing import Any

import torch

from pruners._schedule import equivalent_tokens, layer_counts
from pruners.base import LLMLayerContext, ModelInfo, Pruner
from pruners.params import Param, check_decoder_layer
from pruners.registry import register_pruner


def vte_layer(n_visual: int, n_layers: int, budget: int) -> int:
    """The exit layer K for ``budget`` equivalent visual tokens: the smallest K in 1..L-1 with
    ``n_visual * K / n_layers >= budget`` (integer arithmetic: ceil(budget * L / N)), L-1 when none
    reaches it. Needs ``n_layers >= 2`` (ValueError otherwise)."""
    if n_layers < 2:
        raise ValueError(f"vte: a {n_layers}-layer LLM has no exit layer K in 1..L-1")
    if n_visual <= 0:
        raise ValueError(f"vte: n_visual must be positive, got {n_visual}")
    k = -(-int(budget) * n_layers // n_visual)  # ceil
    return max(1, min(n_layers - 1, k))


def vte_schedule(n_visual: int, n_layers: int, k: int) -> dict[str, Any]:
    """The exit's token schedule: ``{"layers": [K], "counts": [0], "per_layer", "equiv_tokens"}``;
    per_layer is ``[N]*K + [0]*(L-K)``, equiv_tokens ``N*K/L``."""
    per_layer = layer_counts(n_visual, n_layers, [k], [0])
    return {"layers": [k], "counts": [0], "per_layer": per_layer, "equiv_tokens": equivalent_tokens(per_layer)}


@register_pruner("vte")
class VTE(Pruner):
    """Visual-token exit after decoder layer K; see the module docstring."""

    stages = ("llm",)
    parameters = {
        "layer": Param(int, None, doc="exit layer K (layers K.. see no visual token, 1..L-1); null: from the budget"),
    }

    def __init__(self, budget: int | None = None, seed: int = 0, **params: Any) -> None:
        super().__init__(budget=budget, seed=seed, **params)
        self._k: int | None = None

    @property
    def chooses_budget(self) -> bool:
        # an explicit layer with no budget: the method sets its own token count (0 from K on)
        return self.params["layer"] is not None and self.budget is None and self.budget_fraction is None

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        n, n_layers = info.num_visual_tokens, info.llm_num_layers
        layer = self.params["layer"]
        if layer is not None:
            check_decoder_layer("vte", layer, n_layers)
        if self.budget is None:
            self._k = layer  # None: keep all
            return
        if self.budget >= n:
            if layer is not None:
                raise ValueError(
                    f"vte: budget={self.budget} keeps all {n} visual tokens (no exit) but layer={layer} exits at "
                    f"layer {layer}; give one of them (budget=None with layer, or layer=None with budget)")
            self._k = None
            return
        k = vte_layer(n, n_layers, self.budget)
        if layer is not None and layer != k:
            raise ValueError(
                f"vte: budget={self.budget} maps to exit layer K={k} (the smallest K with {n}*K/{n_layers} >= budget) "
                f"but layer={layer} was given; give one of them (budget=None with layer, or layer=None with budget)")
        self._k = k

    @property
    def exit_layer(self) -> int | None:
        """K after attach (None: no exit, every token kept)."""
        return None if self.keeps_all else self._k

    def token_schedule(self) -> list[int]:
        """Visual tokens entering each decoder layer (after attach): ``[N]*K + [0]*(L-K)``."""
        assert self.info is not None, "attach() first"
        n, n_layers = self.info.num_visual_tokens, self.info.llm_num_layers
        k = self.exit_layer
        return [n] * n_layers if k is None else vte_schedule(n, n_layers, k)["per_layer"]

    def llm_layers(self) -> list[int]:
        k = self.exit_layer
        return [] if k is None else [k]

    def llm_attention_layers(self) -> list[int]:
        return []  # no score: nothing to read

    def llm_keep_count(self, layer: int) -> int:
        return 0

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor:
        # Every visual token exits: the later layers (and their KV cache) see none of them.
        return torch.empty(ctx.visual_pos.shape[0], 0, dtype=torch.long, device=ctx.visual_pos.device)
