"""`vispruner` (VisPruner, ICCV'25, arXiv 2412.01818, "Beyond Text-Visual Attention: Exploiting Visual
Cues for Effective Token Pruning in VLMs"): important tokens by the vision encoder's attention, then
diverse tokens by removing near-duplicates among the rest, as the authors' code computes them
(Theia-4869/VisPruner, ``LlavaMetaForCausalLM.encode_images`` in llava/model/llava_arch.py, signals from
``CLIPVisionTower.feature_select`` in llava/model/multimodal_encoder/clip_encoder.py).
docs/methods/vispruner.md has the algorithm, the CLS-free variant's source and every deviation.

Pre-LLM, at the ViT layer that feeds the LLM (``info.vision_feature_layer``). Contract:
``n_imp = int(budget * important_ratio)`` important tokens (``importance="cls"``: head-mean [CLS]
attention; ``"received"``: the mean attention each token receives, the CLS-free form) plus
``budget - n_imp`` diverse ones by iterative similarity matching on the pre-projector features; the
kept set reaches the LLM in raster order. ``importance="cls"`` on an encoder without [CLS] (Qwen) is
refused at attach with a ValueError pointing to ``"received"``; ``requires_cls`` stays False because
the received variant runs on every family.
"""

from __future__ import annotations

import torch

from pruners.base import PreLLMContext, PreLLMDecision, Pruner
from pruners.params import Param
from pruners.registry import register_pruner

#: the authors' default share of important tokens (``--important_ratio`` default in llava/eval/*.py)
IMPORTANT_RATIO = 0.5
#: A-tokens removed per matching round at most (the authors' ``min(8, R - T_div)``)
REMOVE_PER_ROUND = 8
IMPORTANCES = ("cls", "received")

def vispruner_split(budget: int, important_ratio: float = IMPORTANT_RATIO) -> tuple[int, int]:
    """(important, diverse) token counts of ``budget``: ``int(budget * important_ratio)`` important (the
    authors' floor), the rest diverse. 64 -> (32, 32) at 0.5, (48, 16) at 0.75; 9 -> (4, 5) at 0.5."""
    n_imp = min(budget, max(0, int(budget * important_ratio)))
    return n_imp, budget - n_imp


def _descending(x: torch.Tensor) -> torch.Tensor:
    """[B, M] indices sorting each row of ``x`` in descending order, ties to the lower position."""
    return torch.sort(x, dim=1, descending=True, stable=True).indices


def remove_duplicates(features: torch.Tensor, candidates: torch.Tensor, n_keep: int,
                      per_round: int = REMOVE_PER_ROUND) -> torch.Tensor:
    """VisPruner's diverse tokens: thin ``candidates`` down to ``n_keep`` by iterative matching.

    features:   [B, N, D] token features (compared by cosine similarity, in fp32).
    candidates: [B, R] token indices in the order the matching uses (descending importance at the start).
    Returns [B, n_keep] indices (in the final list's order: surviving A tokens by descending
    similarity, then B tokens), or ``candidates`` unchanged when ``n_keep <= 0`` or ``n_keep >= R``.

    Each round: R tokens in the current list, ``r = min(per_round, R - n_keep)``; A = positions 0, 2, 4,
    ..., B = 1, 3, 5, ...; an A token's score is its highest cosine similarity to a B token; the ``r``
    highest-scoring A tokens are dropped (ties: the earlier A token counts as higher), all of A when
    ``r`` is larger than A; the list becomes the surviving A tokens (highest score first) then B.
    """
    if n_keep <= 0:
        return candidates
    x = torch.nn.functional.normalize(features.float(), dim=-1)  # [B, N, D]
    res = candidates
    while True:
        R = res.shape[1]
        r = min(per_round, R - n_keep)
        if r <= 0:
            return res
        tok = x.gather(1, res[..., None].expand(-1, -1, x.shape[-1]))  # [B, R, D]
        a_idx, b_idx = res[:, 0::2], res[:, 1::2]  # [B, ceil(R/2)], [B, floor(R/2)]
        sim = (tok[:, 0::2] @ tok[:, 1::2].transpose(1, 2)).amax(dim=2)  # [B, |A|] best match in B
        survivors = _descending(sim)[:, r:]  # [B, |A| - r] (empty when r >= |A|)
        res = torch.cat([a_idx.gather(1, survivors), b_idx], dim=1)  # [B, R - min(r, |A|)]


def vispruner_select(scores: torch.Tensor, features: torch.Tensor, budget: int,
                     important_ratio: float = IMPORTANT_RATIO,
                     per_round: int = REMOVE_PER_ROUND) -> tuple[torch.Tensor, int, int]:
    """(keep [B, k] = important tokens by descending score then the diverse ones, n_imp, n_div).

    scores: [B, N] importance (CLS or received attention); features: [B, N, D]. ``k = min(budget, N)``;
    a budget covering every token keeps them all (in raster order).
    """
    B, N = scores.shape
    if budget >= N:
        return torch.arange(N, device=scores.device).expand(B, N).clone(), N, 0
    n_imp, n_div = vispruner_split(budget, important_ratio)
    order = _descending(scores.float())  # [B, N]
    important, rest = order[:, :n_imp], order[:, n_imp:]
    if n_div <= 0:
        return important, n_imp, 0
    diverse = remove_duplicates(features, rest, n_div, per_round)
    return torch.cat([important, diverse], dim=1), n_imp, n_div


@register_pruner("vispruner")
class VisPruner(Pruner):
    """``budget`` = ``int(budget * important_ratio)`` important tokens (ViT attention) + diverse tokens
    (iterative removal of near-duplicates among the rest)."""

    stages = ("pre_llm",)
    #: False on purpose: ``importance="received"`` needs no [CLS]; ``attach`` refuses ``"cls"`` itself (on a
    #: family without [CLS] the conformance suite checks that refusal of the default, from ``cls_param``;
    #: tests/test_vispruner.py runs ``"received"`` there)
    requires_cls = False
    cls_param = ("importance", "importance='received' (the mean attention each token receives from all tokens, "
                               "the authors' variant for encoders without [CLS])")
    parameters = {
        "important_ratio": Param(float, IMPORTANT_RATIO, low=0, high=1, search=("float", 0.0, 1.0),
                                 doc="share of the budget given to important tokens (floor of budget x ratio)"),
        "importance": Param(str, "cls", choices=IMPORTANCES,
                            doc="importance signal: 'cls' ([CLS] attention, the paper's) or 'received' "
                                "(mean attention each token receives; the author's variant without [CLS])"),
    }

    def vision_probe_layers(self) -> list[int]:
        return [self.info.vision_feature_layer]

    def scores(self, ctx: PreLLMContext) -> torch.Tensor:
        """[B, N] importance of the feature tokens at the feature layer."""
        layer = self.info.vision_feature_layer
        if self.params["importance"] == "cls":
            return ctx.cls_attention(layer)
        return ctx.received_attention(layer)

    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        keep, n_imp, n_div = vispruner_select(self.scores(ctx), ctx.features, self.budget,
                                              self.params["important_ratio"])
        return PreLLMDecision(
            keep=keep,
            info={"vispruner_split": [n_imp, n_div], "vispruner_importance": self.params["importance"]},
        )
