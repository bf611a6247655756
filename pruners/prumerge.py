"""`prumerge` and `prumerge_plus` (LLaVA-PruMerge, Shang et al., arXiv 2403.15388, ICCV'25): keep the
patches whose ViT [CLS] attention is an IQR outlier, fold each one's nearest neighbours (by key
similarity) into it, weighted by their CLS attention; PruMerge+ adds spatially uniform samples.

Written from the authors' released code (42Shawn/LLaVA-PruMerge, ``clip_encoder.py``:
``token_prune_merge_advanced`` / ``token_prune_merge_advanced_plus``). Stage ``pre_llm``; needs a [CLS]
token. Contract: per image, C centres then one extra token (the attention-weighted sum of the
non-centres) reach the LLM, and every one of them is a merged token: ``keep`` is empty (as for
`pooling`), so ``handle.kept_indices`` is empty and ``token_counts.merged`` counts them all; the
per-image counts are in ``PreLLMDecision.info["prumerge_counts"]``. ``mode="auto"`` is adaptive with
``budget=None`` (``chooses_budget``) and fixed otherwise; an adaptive uniform batch gives every image
the batch's largest count, so results depend on the batch (batch size 1 is the authors' behaviour).
The algorithm, the mapping to the authors' functions, the fixed-budget split and every deviation:
docs/methods/prumerge.md.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from pruners import ops
from pruners.base import ModelInfo, PreLLMContext, PreLLMDecision, Pruner
from pruners.params import Param, layer_index
from pruners.registry import register_pruner

MODES = ("auto", "adaptive", "fixed")
ORDERS = ("authors", "raster")
#: the authors' ``torch.topk(cos_sim_matrix, k=int(32))``
NEIGHBOURS = 32
#: the authors' outlier fence: Q3 + 1.5 IQR
IQR_FENCE = 1.5


# ---------------------------------------------------------------------------------------------
# pure helpers (tested without a model)
# ---------------------------------------------------------------------------------------------
def single_head_cls_attention(q: torch.Tensor, k: torch.Tensor, n_patches: int) -> torch.Tensor:
    """[B, N] CLS->patch attention with the heads concatenated into one (PruMerge's recomputation).

    q, k: [B, H, T, Dh] the layer's projections, CLS at row 0, the N patches last. The softmax runs over
    all T keys (CLS included) with scale (H * Dh) ** -0.5; the patch columns are returned.
    """
    B, H, T, Dh = k.shape
    q1 = q[:, :, :1].transpose(1, 2).reshape(B, 1, 1, H * Dh)  # [B, 1, 1, H*Dh]
    k1 = k.transpose(1, 2).reshape(B, 1, T, H * Dh)  # [B, 1, T, H*Dh]
    rows = ops.attention_rows(q1, k1, scale=(H * Dh) ** -0.5)  # [B, 1, T]
    return rows[:, 0, T - n_patches:]


def concat_head_keys(k: torch.Tensor, n_patches: int) -> torch.Tensor:
    """[B, N, H*Dh] the patches' keys with the heads concatenated (the raw ``k_proj`` output)."""
    B, H, T, Dh = k.shape
    return k[:, :, T - n_patches:].transpose(1, 2).reshape(B, n_patches, H * Dh)


def iqr_outlier_count(attn: torch.Tensor, fence: float = IQR_FENCE) -> torch.Tensor:
    """[B] per row of ``attn`` [B, N], how many values lie strictly above Q3 + fence * (Q3 - Q1)
    (quartiles by linear interpolation, numpy's default ``np.percentile``)."""
    x = attn.double()
    qs = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device), dim=1)  # [2, B]
    upper = qs[1] + fence * (qs[1] - qs[0])  # [B]
    return (x > upper[:, None]).sum(dim=1)


def adaptive_counts(n_outliers: int, n: int) -> tuple[int, float]:
    """(top-attention centres, ratio r) for ``n_outliers`` IQR outliers among ``n`` patches, with the
    authors' float arithmetic: ``r = c / n``, ``int(n * r)`` centres (equal to c for n = 576). A count of
    0 is taken as 1 (their PruMerge+ would divide by zero)."""
    c = max(1, int(n_outliers))
    ratio = c / n
    return max(1, int(n * ratio)), ratio


def adaptive_uniform_positions(ratio: float, n: int) -> torch.Tensor:
    """The authors' adaptive PruMerge+ samples: ``arange(0, n - 1, int(int(1 / ratio) / 3))`` (their
    literal 575 is n - 1 for LLaVA-1.5's 576 patches); a step of 0 is taken as 1."""
    step = max(1, int(int(1 / ratio) / 3))
    return torch.arange(0, n - 1, step)


def fixed_split(budget: int, uniform: bool) -> tuple[int, int]:
    """(top-attention centres, uniform samples) for a fixed ``budget``: ``budget - 1`` centres (plus the
    extra token); PruMerge+ splits them in halves as the authors' fixed-ratio path (72 + 72 at 1/8)."""
    sel = max(0, budget - 1)
    if not uniform:
        return sel, 0
    top = (sel + 1) // 2
    return top, sel - top


def uniform_grid(n: int, count: int) -> torch.Tensor:
    """[count] raster positions ``floor((i + 1/2) * n / count)``, strictly increasing for count <= n
    (the authors' ``arange(s // 2, 575, s)`` with s = n / count when that is an integer)."""
    i = torch.arange(count)
    return ((2 * i + 1) * n) // (2 * count)


def spread_samples(taken: torch.Tensor, count: int) -> torch.Tensor:
    """[count] ascending raster positions of ``uniform_grid`` over ``taken`` [N] bool's axis that avoid the
    taken ones: a grid point already taken moves to the nearest position that is neither taken nor a grid
    point (ties: the lower position), the colliding points handled in grid order."""
    n = taken.numel()
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=taken.device)
    if count > n - int(taken.sum()):
        raise ValueError(f"spread_samples: {count} samples asked, only {n - int(taken.sum())} free positions")
    grid = uniform_grid(n, count).to(taken.device)
    hit = taken[grid]
    used = taken.clone()
    used[grid] = True
    out = grid.clone()
    for j in hit.nonzero().flatten().tolist():
        free = (~used).nonzero().flatten()
        pick = free[(free - grid[j]).abs().argmin()]  # argmin: the first (lower) of equal distances
        out[j] = pick
        used[pick] = True
    return out.sort().values


def prumerge_merge(
    features: torch.Tensor, keys: torch.Tensor, attn: torch.Tensor, centres: torch.Tensor,
    neighbours: int = NEIGHBOURS,
) -> torch.Tensor:
    """[B, C + 1, Dv]: each centre plus the attention-weighted sum of its key-nearest neighbours, then the
    attention-weighted sum of every non-centre (the extra token).

    features [B, N, Dv]; keys [B, N, Dk]; attn [B, N] CLS attention; centres [B, C] distinct indices.
    Row i: ``x_ci + sum_{j in nb(ci)} a_j x_j`` with nb(ci) the ``min(neighbours, N - 1)`` tokens j != ci of
    highest key cosine with ci; extra: ``sum_{j not a centre} a_j x_j`` (0 when every token is a centre).
    Sums are unnormalised, as the authors' code; fp32 accumulation, output in features' dtype.
    """
    B, N, _ = features.shape
    C = centres.shape[1]
    dev = features.device
    x = features.float()
    a = attn.float()
    parts = []
    if C > 0:
        kn = F.normalize(keys.float(), dim=-1)  # [B, N, Dk]
        kc = kn.gather(1, centres[..., None].expand(-1, -1, kn.shape[-1]))  # [B, C, Dk]
        sim = kc @ kn.transpose(1, 2)  # [B, C, N]
        sim = sim.scatter(2, centres[..., None], float("-inf"))  # a centre is not its own neighbour
        nb = sim.topk(min(neighbours, N - 1), dim=2).indices  # [B, C, k]
        w = torch.zeros(B, C, N, device=dev)  # [B, C, N] the merge weights of each centre's row
        w.scatter_(2, nb, a[:, None, :].expand(-1, C, -1).gather(2, nb))
        w.scatter_(2, centres[..., None], 1.0)  # the centre itself, weight 1
        parts.append(w @ x)  # [B, C, Dv]
    rest = torch.ones(B, N, dtype=torch.bool, device=dev)
    rest.scatter_(1, centres, False)  # [B, N] the non-centres
    # the extra token: a weighted mean (merge_tokens op) times its total weight = the weighted sum
    mean = ops.merge_tokens(x, torch.where(rest, 0, -1), 1, weights=a)  # [B, 1, Dv]
    parts.append(mean * torch.where(rest, a, 0.0).sum(1)[:, None, None])
    return torch.cat(parts, dim=1).to(features.dtype)


# ---------------------------------------------------------------------------------------------
@register_pruner("prumerge")
class PruMerge(Pruner):
    """IQR-outlier CLS-attention centres, each merged with its key-nearest neighbours, + one extra token."""

    stages = ("pre_llm",)
    requires_cls = True
    #: docs/internvl.md, "Refused methods"
    conformance_opt_outs = {"*:internvl": (
        "its single-head CLS attention and merge keys are the last N rows of the ViT q/k, one per "
        "token, but an InternVL token is a pixel-shuffled 2x2 unit of 4 patch rows: refused at "
        "attach"
    )}
    #: PruMerge+ (the subclass) adds the spatially uniform samples
    uniform: ClassVar[bool] = False
    parameters = {
        "mode": Param(str, "auto", choices=MODES,
                      doc="auto: adaptive when budget is null, else fixed; adaptive: IQR outlier count; "
                          "fixed: exactly budget tokens"),
        "order": Param(str, "authors", choices=ORDERS,
                       doc="authors: centres by descending CLS attention (uniform samples after); raster: "
                           "each at its patch position"),
        "neighbours": Param(int, NEIGHBOURS, low=1, search=("int", 4, 64),
                            doc="key-nearest tokens merged into each centre"),
        "score_layer": Param(int, None,
                             doc="ViT layer of the CLS attention and keys (negative: from the end); null: "
                                 "the feature layer"),
    }

    @property
    def chooses_budget(self) -> bool:
        mode = self.params["mode"]
        return mode == "adaptive" or (mode == "auto" and self.budget is None)

    def check_params(self) -> None:
        if self.params["mode"] == "adaptive" and self.budget is not None:
            raise ValueError(
                f"{self.name}: parameter mode='adaptive' chooses the token count itself, but budget={self.budget} "
                f"was given: pass budget=None (or mode='fixed' / 'auto')"
            )

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        feat, n = info.vision_feature_layer, info.vision_num_layers
        self._layer = layer_index(self.name, "score_layer", self.params["score_layer"], n, feat, feat)

    def vision_probe_layers(self) -> list[int]:
        return [self._layer]

    # ---- selection -----------------------------------------------------------------------------
    def _adaptive_centres(self, attn: torch.Tensor) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Per image its centres in the authors' order and [top, uniform] counts (adaptive path)."""
        n = attn.shape[1]
        counts = iqr_outlier_count(attn).tolist()
        out, per_image = [], []
        for b, c in enumerate(counts):
            k, ratio = adaptive_counts(c, n)
            top = ops.select_and_gather(attn[b : b + 1], k)[0][0]  # [k] ascending
            top = top[attn[b, top].float().argsort(descending=True, stable=True)]  # descending attention
            extra = torch.empty(0, dtype=torch.long, device=attn.device)
            if self.uniform:
                grid = adaptive_uniform_positions(ratio, n).to(attn.device)
                is_top = torch.zeros(n, dtype=torch.bool, device=attn.device)
                is_top[top] = True
                extra = grid[~is_top[grid]]
            extra = extra[: max(0, n - 1 - k)]  # at most N - 1 centres: never more tokens than unpruned
            out.append(torch.cat([top, extra]))
            per_image.append([int(k), int(extra.numel())])
        return out, per_image

    def _fixed_centres(self, attn: torch.Tensor) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Per image its centres in the authors' order and [top, uniform] counts (fixed budget)."""
        B, n = attn.shape
        n_top, n_uni = fixed_split(self.budget, self.uniform)
        top_all = ops.select_and_gather(attn, n_top)[0]  # [B, n_top] ascending
        out = []
        for b in range(B):
            top = top_all[b][attn[b, top_all[b]].float().argsort(descending=True, stable=True)]
            taken = torch.zeros(n, dtype=torch.bool, device=attn.device)
            taken[top] = True
            out.append(torch.cat([top, spread_samples(taken, n_uni)]))
        return out, [[n_top, n_uni] for _ in range(B)]

    @staticmethod
    def _pad_to_batch(attn: torch.Tensor, centres: list[torch.Tensor]) -> torch.Tensor:
        """[B, C] with C the largest count: a shorter row is filled with its next patches by attention."""
        C = max(int(c.numel()) for c in centres)
        rows = []
        for b, c in enumerate(centres):
            if c.numel() < C:
                chosen = torch.zeros(attn.shape[1], dtype=torch.bool, device=attn.device)
                chosen[c] = True
                order = attn[b].float().argsort(descending=True, stable=True)
                c = torch.cat([c, order[~chosen[order]][: C - c.numel()]])
            rows.append(c)
        return torch.stack(rows)

    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        B, N, _ = ctx.features.shape
        q, k, _ = ctx.vision_qkv(self._layer)  # [B, H, T, Dh]
        attn = single_head_cls_attention(q, k, N)  # [B, N]
        keys = concat_head_keys(k, N)  # [B, N, H*Dh]
        adaptive = self.chooses_budget
        centres_list, per_image = (self._adaptive_centres if adaptive else self._fixed_centres)(attn)
        centres = self._pad_to_batch(attn, centres_list)  # [B, C]
        merged = prumerge_merge(ctx.features, keys, attn, centres, self.params["neighbours"])  # [B, C + 1, Dv]
        anchor = None
        if self.params["order"] == "raster":
            anchor = torch.cat([centres, torch.full((B, 1), N - 1, dtype=torch.long, device=centres.device)], 1)
        info: dict[str, Any] = {
            "prumerge_mode": "adaptive" if adaptive else "fixed",
            # per image: [top-attention centres, uniform samples, tokens reaching the LLM]
            "prumerge_counts": [[t, u, int(merged.shape[1])] for t, u in per_image],
        }
        keep = torch.empty(B, 0, dtype=torch.long, device=ctx.features.device)
        return PreLLMDecision(keep=keep, merged=merged, merged_anchor=anchor, info=info)


@register_pruner("prumerge_plus")
class PruMergePlus(PruMerge):
    """PruMerge+: the PruMerge centres plus spatially uniform samples, then the same merge."""

    uniform = True

