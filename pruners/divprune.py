"""`divprune` (DivPrune, CVPR'25): keep a maximally diverse subset of the visual tokens.

Greedy max-min diversity with distance 1 - cosine similarity: start from the token whose nearest
other token is farthest away (its second-smallest distance, the smallest being 0 to itself), then
repeatedly add the token whose distance to the selected set (min over the set) is largest.
Pre-LLM; no attention needed, so it works with any vision encoder.

``space`` chooses the embeddings compared: ``"projected"`` (default: the visual tokens the LLM
receives, after the projector, as DivPrune's LLaVA integration does) or ``"vision"`` (the features
before the projector). The selection is a set; the adapter re-sorts it into raster order.
Published numbers and the embedded-model results: docs/methods/divprune.md.
"""

from __future__ import annotations

import torch

from pruners.base import PreLLMContext, PreLLMDecision, Pruner
from pruners.params import Param
from pruners.registry import register_pruner

SPACES = ("projected", "vision")


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """[B, N, N] pairwise 1 - cosine similarity of x [B, N, D] (fp32)."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    return 1.0 - xn @ xn.transpose(1, 2)


def maxmin_order(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] token indices in greedy max-min selection order (first = most isolated token).

    Deterministic: ties go to the lowest index (argmax's first maximum).
    """
    B, N, _ = x.shape
    if not 1 <= k <= N:
        raise ValueError(f"k must be in 1..{N}, got {k}")
    d = cosine_distance(x)  # [B, N, N]
    eye = torch.eye(N, dtype=torch.bool, device=x.device)
    # Second-smallest distance of each token = distance to its nearest other token.
    nn_dist = d.masked_fill(eye, float("inf")).min(dim=2).values if N > 1 else torch.zeros(B, 1, device=x.device)
    first = nn_dist.argmax(dim=1)  # [B]
    order = [first]
    min_d = d.gather(1, first.view(B, 1, 1).expand(B, 1, N)).squeeze(1)  # [B, N] distance to the set
    chosen = torch.zeros(B, N, dtype=torch.bool, device=x.device)
    chosen.scatter_(1, first[:, None], True)
    for _ in range(k - 1):
        nxt = min_d.masked_fill(chosen, float("-inf")).argmax(dim=1)  # [B]
        order.append(nxt)
        chosen.scatter_(1, nxt[:, None], True)
        min_d = torch.minimum(min_d, d.gather(1, nxt.view(B, 1, 1).expand(B, 1, N)).squeeze(1))
    return torch.stack(order, dim=1)


@register_pruner("divprune")
class DivPrune(Pruner):
    """Greedy max-min diversity subset of ``budget`` visual tokens (distance 1 - cosine)."""

    stages = ("pre_llm",)
    parameters = {
        "space": Param(str, "projected", choices=SPACES, search=("categorical", list(SPACES)),
                       doc="embeddings compared: after the projector or before it"),
    }

    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        x = ctx.project(ctx.features) if self.params["space"] == "projected" else ctx.features  # [B, N, D]
        keep = maxmin_order(x, self.budget)  # [B, k] selection order; the adapter sorts it
        return PreLLMDecision(keep=keep, info={"divprune_space": self.params["space"]})
