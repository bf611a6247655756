"""`vflowopt` (VFlowOpt, ICCV'25, arXiv 2508.05211): importance map from the vision encoder,
pre-LLM pruning with spatial recycling, progressive drops inside the LLM.

1. Importance (pre-LLM stage, ViT layer ``vision_layer``): from A = that layer's head-mean attention
   (``PreLLMContext.vision_attention``), context relevance c_j = mean of A[g, j] over the global tokens
   g (received attention > t x its mean; all tokens when none passes), plus ``alpha`` x the softmax of
   each patch's grey-level entropy (`patch_entropy`).
2. Pre-LLM pruning with recycling: ``n_v`` tokens reach the LLM, recycled ones included. The dropped
   (lowest-importance) tokens of each m x m grid cell become ONE recycled token, their
   importance-weighted mean (``pruners.ops.merge_tokens``), placed at the cell's most important dropped
   token and carrying its importance; the kept count k is the largest with
   k + (cells holding dropped tokens) <= n_v (`recycle_plan`).
3. Inside the LLM: at layers k_1 < k_2 keep the tokens with the highest pre-LLM importance
   (``ctx.token_scores``), original positions.

Counts (`vflowopt_schedule`): ``budget`` = tokens after k_2; with ``r_v`` set, n_v = round(r_v N),
n_1 = round(n_v r_1) and r_2 = budget / n_1; with ``r_v=None`` (default), r_1 = 1.0, r_2 = 0.6 and
n_v = ceil(budget / (r_1 r_2)). In a batch, a sample's lowest-ranked kept tokens may travel as
single-token "recycled" tokens so that every sample has the same kept / recycled split (its LLM input is
unchanged; only ``handle.kept_indices`` lists fewer grid indices).

Every definition in full, the parameters, the tuning step (`benchmarks/tune.py`) and the authors'
settings: docs/methods/vflowopt.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from pruners._schedule import ProgressiveSchedule, check_layers, equivalent_tokens, layer_counts, scale_layers
from pruners.base import LLMLayerContext, ModelInfo, PreLLMContext, PreLLMDecision, Pruner
from pruners.ops import merge_tokens
from pruners.params import POSITIONS, Param, layer_index
from pruners.registry import register_pruner

REF_LLM_LAYERS, REF_DEPTH = (9, 18), 28
REF_M, REF_GRID = 17.39, 27  # authors' 10% setting: cell side 17.39 patches on SigLIP's 27 x 27 grid
WEIGHT_FLOOR = 1e-12


def vflowopt_schedule(
    n_visual: int,
    n_layers: int,
    budget: int,
    r_v: float | None = None,
    r_1: float = 1.0,
    r_2: float = 0.6,
    layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """VFlowOpt's token schedule without a model.

    Returns ``{"layers": [k_1, k_2], "pre_llm": n_v, "counts": [n_1, budget], "r_2": effective r_2,
    "per_layer": tokens entering each decoder layer, "equiv_tokens": float}``.
    """
    for name, v in (("r_v", r_v), ("r_1", r_1), ("r_2", r_2), ("llm_layers", layers)):
        VFlowOpt.parameters[name].check(name, v, "vflowopt")
    layers = scale_layers(REF_LLM_LAYERS, REF_DEPTH, n_layers) if layers is None else check_layers(layers, n_layers, "llm_layers")
    if r_v is None:
        n_v = min(n_visual, math.ceil(budget / (r_1 * r_2) - 1e-9))
        n_1 = min(n_v, max(budget, int(round(n_v * r_1))))
    else:
        n_v = max(1, int(round(r_v * n_visual)))
        n_1 = max(1, int(round(n_v * r_1)))
        if budget > n_1:
            raise ValueError(
                f"budget={budget} is above the {n_1} tokens left after r_v={r_v} and r_1={r_1} "
                f"(of {n_visual}); accepted: budget in 1..{n_1}, or r_v=null to derive r_v from the budget"
            )
    per_layer = layer_counts(n_v, n_layers, layers, [n_1, budget])
    return {"layers": layers, "pre_llm": n_v, "counts": [n_1, budget], "r_2": budget / n_1,
            "per_layer": per_layer, "equiv_tokens": equivalent_tokens(per_layer)}


def patch_entropy(
    pixel_values: torch.Tensor, grid_hw: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """[B, N] Shannon entropy (bits) of each patch's grey-level histogram (256 bins).

    pixel_values: [B, 3, H, W] normalised as the processor did ((x - mean) / std, x in [0, 1]).
    """
    pv = pixel_values.float()
    B, C, H, W = pv.shape
    m = torch.tensor(mean, dtype=pv.dtype, device=pv.device).view(1, C, 1, 1)
    s = torch.tensor(std, dtype=pv.dtype, device=pv.device).view(1, C, 1, 1)
    grey = (pv * s + m).clamp(0, 1).mean(1)  # [B, H, W]
    bins = (grey * 255).round().long()  # 0..255
    gh, gw = grid_hw
    ph, pw = H // gh, W // gw
    patches = bins[:, : gh * ph, : gw * pw].reshape(B, gh, ph, gw, pw).permute(0, 1, 3, 2, 4).reshape(B, gh * gw, ph * pw)
    hist = torch.zeros(B, gh * gw, 256, dtype=torch.float32, device=pv.device)
    hist.scatter_add_(2, patches, torch.ones_like(patches, dtype=torch.float32))
    p = hist / (ph * pw)
    return -(p * torch.log2(p.clamp(min=1e-30))).sum(-1)  # p = 0 terms vanish


def recycle_plan(importance: torch.Tensor, cell: torch.Tensor, n_v: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Per sample: rank tokens and split them into kept / recycled-by-cell (module docstring, step 2).

    importance: [N] (one sample), cell: [N] cell id per token, n_v: tokens that reach the LLM.
    Returns (order [N]: token indices by decreasing importance, assign [N]: -1 for kept or discarded
    tokens, else a cell slot 0..c-1 (slots ordered by their anchor's rank), [k, c]).
    """
    N = importance.shape[0]
    order = torch.sort(importance, descending=True, stable=True).indices  # [N]
    cell_sorted = cell[order]
    # c(k) = distinct cells among ranks >= k: count ranks that are the last occurrence of their cell.
    pos = torch.arange(N)
    last = torch.full((int(cell.max()) + 1,), -1, dtype=torch.long).scatter_reduce(0, cell_sorted, pos, "amax")
    is_last = (last[cell_sorted] == pos).long()
    c_of_k = torch.cat([is_last.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.long)])  # [N+1]
    f = torch.arange(N + 1) + c_of_k  # non-decreasing in steps of 0 or 1
    ok = (f <= n_v).nonzero()
    k = int(ok.max()) if ok.numel() else 0
    assign = torch.full((N,), -1, dtype=torch.long)
    dropped = order[k:]
    dcell = cell[dropped]
    # slot per cell, ordered by the rank of the cell's first (most important) dropped token
    first_rank: dict[int, int] = {}
    for r, c in enumerate(dcell.tolist()):
        first_rank.setdefault(c, r)
    cells = sorted(first_rank, key=first_rank.get)[: max(n_v - k, 0)]  # too many cells: keep the best anchors
    slot = {c: i for i, c in enumerate(cells)}
    assign[dropped] = torch.tensor([slot.get(c, -1) for c in dcell.tolist()], dtype=torch.long)
    return order, assign, [k, len(cells)]


@register_pruner("vflowopt")
class VFlowOpt(ProgressiveSchedule, Pruner):
    """Importance map + recycling pre-LLM, progressive drops in the LLM; see the module docstring."""

    stages = ("pre_llm", "llm")
    #: 2: each sample keeps its own in-LLM count (its images' own sizes and schedules; inert fillers)
    version = 2
    #: ``search``: the authors' search space (r_2 is solved from the compute target through the budget)
    parameters = {
        "r_v": Param(float, None, low=0, high=1, low_inclusive=False, search=("float", 0.25, 0.375),
                     doc="pre-LLM keep ratio of N (recycled tokens count); null: derived from budget, r_1, r_2"),
        "r_1": Param(float, 1.0, low=0, high=1, low_inclusive=False, search=("float", 0.533, 1.0),
                     doc="keep ratio at k_1 (multiplicative)"),
        "r_2": Param(float, 0.6, low=0, high=1, low_inclusive=False,
                     doc="keep ratio at k_2, used only when r_v is null (else solved from the budget)"),
        "t": Param(float, 39.26, search=("float", 0.0, 50.0),
                   doc="global-token threshold (x mean received attention); authors' 10% setting"),
        "m": Param(float, None, low=0, low_inclusive=False, search=("float", 3.0, 24.0),
                   doc="recycling cell side in patches; null: 17.39/27 of the grid side (authors' 10% setting)"),
        "alpha": Param(float, 0.0, search=("float", -1.0, 1.0),
                       doc="weight of the patch-entropy term (authors' shipped configs: 0)"),
        "vision_layer": Param(int, None, doc="ViT layer of the importance map; null: the one before the feature layer"),
        "llm_layers": Param(list, None, item=int, length=2,
                            doc="[k_1, k_2]; null: 9 and 18 of 28 scaled to the model's depth"),
        "pixel_mean": Param(list, None, item=float, length=3,
                            doc="processor normalisation (R, G, B), to recover grey levels for the entropy; "
                                "null: the model's (ModelInfo.pixel_mean)"),
        "pixel_std": Param(list, None, item=float, length=3, low=0, low_inclusive=False,
                           doc="processor normalisation (R, G, B), to recover grey levels for the entropy; "
                               "null: the model's (ModelInfo.pixel_std)"),
        "positions": Param(str, "original", choices=POSITIONS, doc="RoPE positions of the kept tokens"),
    }

    def __init__(self, budget: int | None = None, seed: int = 0, **params: Any) -> None:
        super().__init__(budget=budget, seed=seed, **params)
        self._schedule: dict[str, Any] | None = None

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        p = self.params
        # keep-all (budget None or N): validate the parameters on a 1-token budget, then stay inactive
        budget = 1 if self.keeps_all else self.budget
        self._schedule = vflowopt_schedule(
            info.num_visual_tokens, info.llm_num_layers, budget, p["r_v"], p["r_1"], p["r_2"], p["llm_layers"]
        )
        feat = info.vision_feature_layer
        self._vision_layer = layer_index(
            "vflowopt", "vision_layer", p["vision_layer"], info.vision_num_layers, feat, max(feat - 1, 0)
        )
        self._m = float(p["m"]) if p["m"] is not None else REF_M / REF_GRID * info.grid_hw[1]
        self._pixel_mean = self._pixel_stat("pixel_mean", info.pixel_mean)
        self._pixel_std = self._pixel_stat("pixel_std", info.pixel_std)

    def _pixel_stat(self, name: str, from_model: tuple[float, ...] | None) -> tuple[float, ...] | None:
        """Parameter ``name`` if given, else the model's value; a ValueError when neither is known and
        the entropy term needs it (alpha != 0)."""
        given = self.params[name]
        value = tuple(float(v) for v in given) if given is not None else from_model
        if value is None and float(self.params["alpha"]) != 0.0:
            raise ValueError(
                f"vflowopt: parameter {name}=null means the model's image normalisation, but this model's "
                f"ModelInfo.{name} is unknown; pass {name}=[R, G, B] (the processor's {name.split('_')[1]}) "
                f"or alpha=0 (no patch-entropy term)"
            )
        return value

    def vision_probe_layers(self) -> list[int]:
        return [self._vision_layer] if self._schedule and not self.keeps_all else []

    # ---- step 1: importance -----------------------------------------------------------------
    def importance(self, ctx: PreLLMContext) -> torch.Tensor:
        """[B, N] importance of the current patch features (context relevance + alpha x entropy term)."""
        A = ctx.vision_attention(self._vision_layer)  # [B, T, T] head mean (T = N + CLS tokens)
        received = A.mean(1)  # [B, T] column means
        glob = received > self.params["t"] * received.mean(1, keepdim=True)  # [B, T]
        glob = torch.where(glob.any(1, keepdim=True), glob, torch.ones_like(glob))  # none passes: all
        w = glob.float()
        c = (A * w[..., None]).sum(1) / w.sum(1, keepdim=True)  # [B, T]
        n_cls = A.shape[-1] - ctx.features.shape[1]
        c = c[:, n_cls:]  # [B, N] patch columns
        alpha = float(self.params["alpha"])
        if alpha != 0.0:
            e = patch_entropy(ctx.pixel_values, ctx.info.grid_hw, self._pixel_mean, self._pixel_std)
            e = e.gather(1, ctx.patch_index)  # [B, N]
            c = c + alpha * torch.softmax(e, dim=1)
        return c

    # ---- step 2: pre-LLM pruning with recycling ---------------------------------------------
    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        imp = self.importance(ctx)  # [B, N]
        x = ctx.features  # [B, N, Dv]
        B, N, _ = x.shape
        n_v = min(self._schedule["pre_llm"], N)
        gw = ctx.info.grid_hw[1]
        m = max(self._m, 1.0)
        cols_cells = math.ceil(gw / m)
        r, c = ctx.patch_index // gw, ctx.patch_index % gw
        cell = (torch.floor(r / m) * cols_cells + torch.floor(c / m)).long()  # [B, N]
        plans = [recycle_plan(imp[b].cpu(), cell[b].cpu(), n_v) for b in range(B)]
        k_min = min(p[2][0] for p in plans)
        n_merged = n_v - k_min
        keep = torch.stack([p[0][:k_min] for p in plans]).to(x.device)  # [B, k_min]
        assign = torch.stack([p[1] for p in plans])  # [B, N]
        for b, (order, _assign, (k, n_cells)) in enumerate(plans):
            # kept tokens beyond the batch's common kept count travel as single-token "recycled" slots
            extra = order[k_min:k]
            assign[b, extra] = n_cells + torch.arange(extra.numel())
        assign = assign.to(x.device)
        weights = imp.clamp(min=0) + WEIGHT_FLOOR  # [B, N]
        merged = merge_tokens(x, assign, n_merged, weights=weights)  # [B, n_merged, Dv]
        # anchor = most important token of each slot
        slot_imp = torch.full((B, max(n_merged, 1)), -float("inf"), device=x.device)
        valid = assign >= 0
        a_cl = assign.clamp(min=0)
        slot_imp = slot_imp.scatter_reduce(1, a_cl, torch.where(valid, imp, torch.full_like(imp, -float("inf"))), "amax")
        is_anchor = valid & (imp == slot_imp.gather(1, a_cl))
        idx = torch.arange(N, device=x.device).expand(B, N)
        # among ties take the lowest raster index: scatter amin of indices of anchor candidates
        big = torch.full_like(idx, N)
        anchor = torch.full((B, max(n_merged, 1)), N, dtype=torch.long, device=x.device).scatter_reduce(
            1, a_cl, torch.where(is_anchor, idx, big), "amin"
        )[:, :n_merged]
        scores = torch.cat([imp.gather(1, keep), slot_imp[:, :n_merged]], dim=1)  # [B, k_min + n_merged]
        return PreLLMDecision(
            keep=keep,
            merged=merged if n_merged else None,
            merged_anchor=anchor if n_merged else None,
            scores=scores,
            info={"vflowopt_pre_llm_tokens": n_v, "vflowopt_recycled": [p[2][1] for p in plans]},
        )

    # ---- step 3: progressive drops in the LLM ----------------------------------------------
    def llm_attention_layers(self) -> list[int]:
        return []

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor:
        scores = ctx.token_scores  # [B, Nv] pre-LLM importance of the current visual tokens
        return ctx.keep_top(scores, self.count_at(ctx.layer))
