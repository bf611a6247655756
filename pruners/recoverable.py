"""`recoverable` (Recoverable Compression, arXiv 2409.01179, AAAI'25): keep the patches the ViT
[CLS] attends to, recover the ones the question points at, merge the rest.

Pre-LLM, training-free, needs a vision encoder with [CLS]. Contract: the LLM gets the kept + recovered
tokens in raster order, then the merged tokens. The question-patch similarity comes from a CLIP text
tower when one is available, else from the LLM's input embeddings
(``PreLLMDecision.info["text_similarity"]`` says which). ``mode="fixed"`` splits exactly ``budget``
tokens by ``recover_share`` and ``merge_share`` (`fixed_split`); ``mode="adaptive"`` (``budget=None``)
counts outliers (`high_outliers`), and a batch takes the largest per-image count of each part, so
adaptive results depend on the batch (per-image counts in ``info["adaptive_counts"]``).
The five steps, the deviations (the score layer; the outlier rule and shares are our reading of the
paper), every parameter and the published numbers: docs/methods/recoverable.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pruners import ops
from pruners.base import ModelInfo, PreLLMContext, PreLLMDecision, Pruner
from pruners.params import Param, layer_index
from pruners.registry import register_pruner

MODES = ("fixed", "adaptive")
ATTENTIONS = ("single_head", "head_mean")
FALLBACK = "llm_embeddings"


# ---------------------------------------------------------------------------------------------
# pure helpers (tested without a model)
# ---------------------------------------------------------------------------------------------
def local_outlier_factor(x: torch.Tensor, n_neighbors: int = 20) -> torch.Tensor:
    """[B, N] local outlier factor of 1-D values x [B, N] (Breunig et al. 2000, as sklearn's LOF).

    lrd(i) = 1 / mean_{o in kNN(i)} max(kdist(o), |x_i - x_o|); LOF(i) = mean_{o in kNN(i)} lrd(o) / lrd(i).
    Values near 1 are inliers; much larger than 1 are outliers.
    """
    B, N = x.shape
    k = max(1, min(n_neighbors, N - 1))
    xf = x.float()
    d = (xf[:, :, None] - xf[:, None, :]).abs()  # [B, N, N]
    d = d.masked_fill(torch.eye(N, dtype=torch.bool, device=x.device), float("inf"))  # exclude self
    knn_d, knn_i = d.topk(k, dim=2, largest=False)  # [B, N, k]
    kdist = knn_d[:, :, -1]  # [B, N]
    reach = torch.maximum(kdist.gather(1, knn_i.flatten(1)).view(B, N, k), knn_d)  # [B, N, k]
    lrd = 1.0 / (reach.mean(2) + 1e-10)  # [B, N]
    return lrd.gather(1, knn_i.flatten(1)).view(B, N, k).mean(2) / lrd


def high_outliers(x: torch.Tensor, threshold: float, n_neighbors: int = 20) -> torch.Tensor:
    """[B, N] bool: values that are LOF outliers (LOF > threshold) on the high side (> median)."""
    lof = local_outlier_factor(x, n_neighbors)
    return (lof > threshold) & (x > x.median(dim=1, keepdim=True).values)


def fixed_split(budget: int, recover_share: float, merge_share: float) -> tuple[int, int, int]:
    """(keep, recover, merge) token counts summing to ``budget``; keep >= 1."""
    m = int(round(budget * merge_share)) if budget >= 3 else 0
    r = int(round(budget * recover_share)) if budget >= 2 else 0
    m = min(m, max(0, budget - 1))
    r = min(r, budget - 1 - m)
    return budget - r - m, r, m


def _masked_top(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] ascending indices of the top-k scores among ``allowed`` [B, N] (select_and_gather op)."""
    if k <= 0:
        return torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
    s = scores.float().masked_fill(~allowed, float("-inf"))
    idx, _ = ops.select_and_gather(s, k)
    return idx


def recoverable_select(
    attn: torch.Tensor,
    text_sim: torch.Tensor,
    keys: torch.Tensor,
    counts: tuple[int, int, int],
    *,
    neighbours: int = 32,
    text_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Steps 2-4 for fixed counts (keep, recover, merge) on [B, N] scores and [B, N, Dk] keys.

    Returns {"keep": [B, v], "recover": [B, r], "centres": [B, C], "assign": [B, N] centre group of
    each token (-1 none), "extra": [B, N] bool members of the extra token}; C = merge - 1.
    """
    B, N = attn.shape
    v, r, m = counts
    dev = attn.device
    everyone = torch.ones(B, N, dtype=torch.bool, device=dev)
    keep = _masked_top(attn, everyone, v)  # [B, v]
    free = everyone.clone()
    free.scatter_(1, keep, False)
    recover = _masked_top(text_sim, free, min(r, int(free.sum(1).min())))  # [B, r]
    free.scatter_(1, recover, False)
    n_free = int(free.sum(1).min())
    C = max(0, min(m - 1, n_free)) if m > 0 else 0
    centres = _masked_top(attn, free, C)  # [B, C]
    rest = free.clone()
    rest.scatter_(1, centres, False)  # non-centre remaining tokens
    assign = torch.full((B, N), -1, dtype=torch.long, device=dev)
    if C > 0:
        kn = F.normalize(keys.float(), dim=-1)  # [B, N, Dk]
        kc = kn.gather(1, centres[..., None].expand(-1, -1, kn.shape[-1]))  # [B, C, Dk]
        sim = kn @ kc.transpose(1, 2)  # [B, N, C]
        best_sim, best = sim.max(dim=2)  # [B, N]
        # Each centre keeps at most `neighbours` members, ranked by key similarity + text term.
        affinity = (best_sim + text_weight * text_sim.float()).masked_fill(~rest, float("-inf"))  # [B, N]
        onehot = F.one_hot(best, C).bool() & rest[..., None]  # [B, N, C]
        per_centre = affinity[..., None].expand(-1, -1, C).masked_fill(~onehot, float("-inf"))  # [B, N, C]
        kth = min(neighbours, N)
        top_members = per_centre.topk(kth, dim=1)  # along tokens: [B, kth, C]
        member = torch.zeros(B, N, C, dtype=torch.bool, device=dev)
        member.scatter_(1, top_members.indices, torch.isfinite(top_members.values))
        joined = member.any(dim=2)  # [B, N]
        assign = torch.where(joined, best, assign)
        assign.scatter_(1, centres, torch.arange(C, device=dev).expand(B, -1))
    return {"keep": keep, "recover": recover, "centres": centres, "assign": assign, "extra": rest}


def merge_clusters(
    features: torch.Tensor, attn: torch.Tensor, sel: dict[str, torch.Tensor], with_extra: bool
) -> torch.Tensor:
    """[B, C (+1), Dv] a-weighted means of each centre's cluster, then (optionally) of all non-centres."""
    C = sel["centres"].shape[1]
    w = attn.float()
    parts = []
    if C > 0:
        parts.append(ops.merge_tokens(features, sel["assign"], C, weights=w))  # [B, C, Dv]
    if with_extra and bool(sel["extra"].any()):
        extra_assign = torch.where(sel["extra"], 0, -1).long()  # [B, N]
        parts.append(ops.merge_tokens(features, extra_assign, 1, weights=w))  # [B, 1, Dv]
    if not parts:
        return features.new_zeros(features.shape[0], 0, features.shape[-1])
    return torch.cat(parts, dim=1)


def question_first_line(text: str) -> str:
    """The question's first non-empty line, cut before a chat-role marker such as 'ASSISTANT:'."""
    for marker in ("ASSISTANT:", "ASSISTANT :", "Assistant:"):
        if marker in text:
            text = text.split(marker)[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else ""


def llm_embedding_similarity(ctx: PreLLMContext, num_visual: int) -> torch.Tensor:
    """[B, N] cosine between the projected visual tokens and the mean normalised LLM input embedding
    of the real tokens after the image (the question)."""
    emb = ctx.text_embeddings().float()  # [B, L, Dt]
    B, L = ctx.input_ids.shape
    ar = torch.arange(L, device=emb.device)[None]
    after = (ar >= (ctx.image_start[:, None] + num_visual)) & ctx.attention_mask.bool()  # [B, L]
    w = after.float()
    q = (F.normalize(emb, dim=-1) * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)  # [B, Dt]
    vis = F.normalize(ctx.project(ctx.features).float(), dim=-1)  # [B, N, Dt]
    return (vis * F.normalize(q, dim=-1)[:, None]).sum(-1)


# ---------------------------------------------------------------------------------------------
@register_pruner("recoverable")
class RecoverableCompression(Pruner):
    """CLS-attention keep + question-guided recovery + attention-weighted merge of the rest."""

    stages = ("pre_llm",)
    requires_cls = True
    #: docs/internvl.md, "Refused methods"
    conformance_opt_outs = {"*:internvl": (
        "its CLS attention and merge keys are the last N rows of the ViT q/k, one per token, but "
        "an InternVL token is a pixel-shuffled 2x2 unit of 4 patch rows: refused at attach"
    )}
    parameters = {
        "mode": Param(str, "fixed", choices=MODES, doc="fixed: exactly budget tokens; adaptive: LOF outlier counts"),
        "recover_share": Param(float, 0.25, low=0, high=1, high_inclusive=False, search=("float", 0.0, 0.5),
                               doc="share of the budget recovered by text similarity (fixed mode)"),
        "merge_share": Param(float, 0.125, low=0, high=1, high_inclusive=False, search=("float", 0.0, 0.3),
                             doc="share of the tokens that are merged clusters"),
        "score_layer": Param(int, None, doc="ViT layer of the CLS attention (negative: from the end); null: feature layer"),
        "attention": Param(str, "single_head", choices=ATTENTIONS, search=("categorical", list(ATTENTIONS)),
                           doc="CLS attention from concatenated heads (PruMerge) or the head mean"),
        "text_tower": Param(str, None, doc=f"CLIP text tower folder, {FALLBACK!r}, or null (auto: <model>/text_tower)"),
        "neighbours": Param(int, 32, low=1, doc="most members a merge centre keeps"),
        "text_weight": Param(float, 1.0, doc="weight of text similarity when ranking a centre's members"),
        "lof_threshold": Param(float, 1.5, low=0, low_inclusive=False, doc="LOF above which a score is an outlier (adaptive)"),
        "lof_neighbors": Param(int, 20, low=1, doc="neighbours of the local outlier factor (adaptive)"),
    }

    @property
    def chooses_budget(self) -> bool:
        return self.params["mode"] == "adaptive"

    def check_params(self) -> None:
        p = self.params
        if p["mode"] == "adaptive" and self.budget is not None:
            raise ValueError(
                f"recoverable: parameter mode='adaptive' chooses the token count itself, but budget={self.budget} "
                f"was given: pass budget=None (or use mode='fixed')"
            )
        if p["recover_share"] + p["merge_share"] >= 1.0:
            raise ValueError(
                f"recoverable: parameters recover_share + merge_share must be < 1 (the rest is the visual keep), "
                f"got recover_share={p['recover_share']!r} + merge_share={p['merge_share']!r}"
            )

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        feat, n = info.vision_feature_layer, info.vision_num_layers
        self._layer = layer_index("recoverable", "score_layer", self.params["score_layer"], n, feat, feat)

    def vision_probe_layers(self) -> list[int]:
        return [self._layer]

    # ---- signals -----------------------------------------------------------------------------
    def visual_scores(self, ctx: PreLLMContext) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, N] CLS attention to the patches, [B, N, H*Dh] patch keys) at the score layer."""
        q, k, _ = ctx.vision_qkv(self._layer)  # [B, H, T, Dh]
        n_cls = k.shape[2] - ctx.features.shape[1]
        B, H, T, Dh = k.shape
        keys = k[:, :, n_cls:].transpose(1, 2).reshape(B, T - n_cls, H * Dh)  # [B, N, H*Dh]
        if self.params["attention"] == "head_mean":
            return ctx.cls_attention(self._layer), keys
        q1 = q[:, :, :1].transpose(1, 2).reshape(B, 1, 1, H * Dh)  # [B, 1, 1, H*Dh] single head
        k1 = k.transpose(1, 2).reshape(B, 1, T, H * Dh)  # [B, 1, T, H*Dh]
        rows = ops.attention_rows(q1, k1, scale=(H * Dh) ** -0.5)  # [B, 1, T]
        return rows[:, 0, n_cls:], keys

    def text_similarity(self, ctx: PreLLMContext) -> tuple[torch.Tensor, dict[str, Any]]:
        """([B, N] question-patch similarity, info about which encoder produced it)."""
        tt = self.params["text_tower"]
        found = None
        if tt != FALLBACK:
            if ctx.text_patch_similarity is not None:  # the engine's CLIP text tower service
                found = ctx.text_patch_similarity(tt, question_first_line)
            elif tt is not None:
                raise ValueError(f"recoverable: text_tower={tt!r} was given, but this adapter offers no text tower "
                                 f"service (PreLLMContext.text_patch_similarity); use text_tower={FALLBACK!r}")
        if found is not None and found.similarity is not None:
            return found.similarity, {"text_similarity": "clip_text_tower", "text_tower": found.folder}
        info: dict[str, Any] = {"text_similarity": FALLBACK}
        if found is not None:
            info["text_similarity_note"] = "no tokenizer given to apply_pruner, so the question text was unavailable"
        return llm_embedding_similarity(ctx, self.info.num_visual_tokens), info

    # ---- pruning -----------------------------------------------------------------------------
    def _adaptive_counts(self, attn: torch.Tensor, tsim: torch.Tensor) -> tuple[tuple[int, int, int], list]:
        p = self.params
        out_a = high_outliers(attn, p["lof_threshold"], p["lof_neighbors"])  # [B, N]
        v = out_a.sum(1).clamp(min=1)  # [B]
        out_t = high_outliers(tsim, p["lof_threshold"], p["lof_neighbors"]) & ~out_a
        r = out_t.sum(1)
        share = p["merge_share"]
        m = ((v + r).float() * share / (1 - share)).round().long().clamp(min=2 if share > 0 else 0)
        N = attn.shape[1]
        per_image = [[int(a), int(b), int(c)] for a, b, c in zip(v, r, m)]
        vm, rm = int(v.max()), int(r.max())
        rm = min(rm, N - vm)
        mm = min(int(m.max()), N - vm - rm)
        return (vm, rm, mm), per_image

    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        attn, keys = self.visual_scores(ctx)  # [B, N], [B, N, Dk]
        tsim, info = self.text_similarity(ctx)  # [B, N]
        p = self.params
        if p["mode"] == "adaptive":
            counts, per_image = self._adaptive_counts(attn, tsim)
            info["adaptive_counts"] = per_image  # per image [keep, recover, merge] before batch padding
        else:
            counts = fixed_split(self.budget, p["recover_share"], p["merge_share"])
        sel = recoverable_select(attn, tsim, keys, counts, neighbours=p["neighbours"], text_weight=p["text_weight"])
        merged = merge_clusters(ctx.features, attn, sel, with_extra=counts[2] > 0)  # [B, m', Dv]
        m_used = merged.shape[1]  # equals counts[2] whenever the budget is below the patch count
        keep = torch.cat([sel["keep"], sel["recover"]], dim=1)  # [B, v + r]
        info["recoverable_split"] = [sel["keep"].shape[1], sel["recover"].shape[1], m_used]
        return PreLLMDecision(keep=keep, merged=merged if m_used else None, info=info)
