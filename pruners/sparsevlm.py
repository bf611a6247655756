"""`sparsevlm` (SparseVLM, ICML'25; authors' code github.com/Gumpest/SparseVLMs, LLaVA-1.5 path
``llava/model/language_model/modelling_sparse_llama.py``, ``score.py``, ``utils.py``). See
docs/methods/sparsevlm.md.

Text-guided progressive pruning inside the LLM, with recycling:

- **raters** (once, from the LLM's input embeddings): visual x text similarity ``V @ T^T``, softmax over
  the text tokens, mean over the visual tokens; the text tokens after the image scoring above the mean
  of that vector rate the visual tokens (`select_raters`).
- **signal** at each scoring layer l (2, 6, 15 of LLaVA-1.5's 32): the head-mean softmax attention of
  layer l from the raters to the visual tokens, averaged over the raters (computed from layer l's own
  q/k, so SDPA keeps running). Layers l+1.. see the top-scored tokens (engine layer K = l + 1).
- **recycling**: of the tokens deleted at a stage, the top 30% (+1) by the same score are clustered by
  density peaks (kNN density, n/10 + 1 centres, `density_peaks_merge`) and each cluster's mean hidden
  state is inserted after the kept visual tokens (`pruners.base.LLMDecision`); later stages rank them
  with the other visual tokens.
- **schedule**: the authors' per-stage counts (`TABLE`) for their four budgets on 576 tokens / 32
  layers; other budgets and models interpolate that table so the authors' equivalent count
  (`authors_equivalent_tokens`) meets the budget (`sparsevlm_schedule`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pruners._schedule import ProgressiveSchedule, equivalent_tokens, layer_counts, scale_layers
from pruners.base import LLMDecision, LLMLayerContext, ModelInfo, Pruner
from pruners.ops import attention_rows_at
from pruners.params import POSITIONS, Param
from pruners.registry import register_pruner

#: the authors' scoring layers (``pruning_loc``) on LLaVA-1.5's 32 decoder layers; the engine's pruning
#: layer K is the next one (layers K.. see the kept tokens)
REF_SCORING_LAYERS, REF_DEPTH, REF_TOKENS = (2, 6, 15), 32, 576
#: score.py ``sparse_token_dict`` (v1 rows): budget -> visual tokens kept at each scoring layer
TABLE: dict[int, tuple[int, int, int]] = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26),
                                          64: (66, 30, 17)}
RECYCLE_SHARE = 0.3  # top 30% (+1) of the deleted tokens are recycled
CLUSTER_DIV = 10  # n / 10 + 1 clusters


def recycled_count(n_deleted: int) -> int:
    """Deleted tokens recycled into clusters: int(0.3 n) + 1 (0 when nothing was deleted)."""
    return int(n_deleted * RECYCLE_SHARE) + 1 if n_deleted > 0 else 0


def cluster_count(n_recycled: int) -> int:
    """Clusters the recycled tokens form: int(n / 10) + 1 (0 for none)."""
    return int(n_recycled / CLUSTER_DIV) + 1 if n_recycled > 0 else 0


def stage_tokens(n_visual: int, counts: Sequence[int], recycle: bool = True) -> list[int]:
    """Visual tokens after each stage (kept + recycled clusters), the deletions being deterministic:
    a stage keeps min(count, current) and recycles from the rest."""
    cur, out = n_visual, []
    for c in counts:
        keep = min(int(c), cur)
        merged = cluster_count(recycled_count(cur - keep)) if recycle else 0
        cur = keep + merged
        out.append(cur)
    return out


def authors_equivalent_tokens(n_visual: int, n_layers: int, layers: Sequence[int], counts: Sequence[int],
                              recycle: bool = True) -> float:
    """The authors' "Equal Tokens" (modelling_sparse_llama.py's log): the mean over layers of the visual
    tokens after each layer, so a stage counts from its scoring layer K - 1 on, recycled tokens included."""
    per = layer_counts(n_visual, n_layers, [k - 1 for k in layers], stage_tokens(n_visual, counts, recycle))
    return equivalent_tokens(per)


def _interpolated_counts(n_visual: int, rho: float) -> list[int]:
    """Per-stage counts at keep level ``rho`` in [0, 1]: the authors' rows as fractions of 576 tokens
    against budget / 576, joined linearly with (0, 0, 0) at 0 and (1, 1, 1) at 1, times n_visual."""
    pts = [(0.0, (0.0, 0.0, 0.0))] + [(b / REF_TOKENS, tuple(c / REF_TOKENS for c in TABLE[b])) for b in sorted(TABLE)]
    pts.append((1.0, (1.0, 1.0, 1.0)))
    for (r0, f0), (r1, f1) in zip(pts, pts[1:]):
        if rho <= r1:
            t = (rho - r0) / (r1 - r0)
            frac = [a + t * (b - a) for a, b in zip(f0, f1)]
            break
    counts = [max(1, min(n_visual, int(round(n_visual * f)))) for f in frac]
    for i in range(1, len(counts)):  # never more than the stage before
        counts[i] = min(counts[i], counts[i - 1])
    return counts


def sparsevlm_schedule(n_visual: int, n_layers: int, budget: int, recycle: bool = True) -> dict[str, Any]:
    """SparseVLM's schedule without a model: ``{"layers", "counts", "per_layer", "equiv_tokens",
    "authors_equiv_tokens", "rule"}``.

    Layers: the authors' K = 3/7/16 of 32 (scoring layers 2/6/15) scaled to ``n_layers``. Counts: the
    authors' table row for budgets 192/128/96/64 on 576 tokens and 32 layers ("table"); otherwise
    ("interpolated") the table interpolated (`_interpolated_counts`) at the keep level whose authors'
    equivalent count is closest to the budget (ties: the smaller level). ``per_layer`` /
    ``equiv_tokens`` count the tokens entering each layer (what the engine computes), recycled
    tokens included."""
    layers = scale_layers([k + 1 for k in REF_SCORING_LAYERS], REF_DEPTH, n_layers)
    if n_visual == REF_TOKENS and n_layers == REF_DEPTH and budget in TABLE:
        counts, rule = list(TABLE[budget]), "table"
    else:
        best = None
        steps = 4096
        for i in range(steps + 1):
            c = _interpolated_counts(n_visual, i / steps)
            err = abs(authors_equivalent_tokens(n_visual, n_layers, layers, c, recycle) - budget)
            if best is None or err < best[0] - 1e-12:
                best = (err, c)
        counts, rule = best[1], "interpolated"
    per_layer = layer_counts(n_visual, n_layers, layers, stage_tokens(n_visual, counts, recycle))
    return {"layers": layers, "counts": counts, "per_layer": per_layer, "equiv_tokens": equivalent_tokens(per_layer),
            "authors_equiv_tokens": authors_equivalent_tokens(n_visual, n_layers, layers, counts, recycle),
            "rule": rule}


def select_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[Nt] bool: the text tokens rating the visual ones (one sample). ``visual`` [Nv, D] and ``text``
    [Nt, D] are LLM input embeddings: r = softmax_text(V T^T) averaged over the visual tokens; raters are
    r > mean(r). When none is above the mean (e.g. a single text token) every text token rates."""
    if text.shape[0] == 0 or visual.shape[0] == 0:
        return torch.ones(text.shape[0], dtype=torch.bool, device=text.device)
    r = (visual.float() @ text.float().T).softmax(dim=1).mean(0)  # [Nt]
    out = r > r.mean()
    return out if bool(out.any()) else torch.ones_like(out)


def density_peaks_merge(x: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """[c, D] cluster means of ``x`` [n, D] by density peaks (one sample; as the authors' utils.py
    ``cluster_and_merge``): distances d / sqrt(D); density exp(-mean of the squared distances to the
    ``n_clusters`` nearest, itself included); each token's distance to the nearest denser token (the
    largest distance for the densest); centres are the ``n_clusters`` best density x that distance, in
    that order; every token joins its nearest centre (a centre itself); each cluster is the mean of its
    members (sum / (count + 1e-6), as theirs). Equal densities are ordered by index (theirs adds U(0, 1e-6)
    noise to the densities to the same end), so exactly one token is the densest."""
    xf = x.float()
    n, dim = xf.shape
    diff = xf[:, None, :] - xf[None, :, :]
    dist = diff.norm(dim=-1) / dim**0.5  # [n, n]
    knn = dist.topk(n_clusters, dim=-1, largest=False).values  # [n, c]
    density = (-(knn**2).mean(-1)).exp()  # [n]
    # [i, j]: j denser than i; equal densities (mutual nearest neighbours always tie) go to the lower index,
    # a fixed stand-in for the authors' U(0, 1e-6) noise that makes the order strict
    ar = torch.arange(n, device=x.device)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (ar[None, :] < ar[:, None]))
    parent = torch.where(denser, dist, dist.max()).min(-1).values  # [n]
    centres = (parent * density).topk(n_clusters).indices  # [c] best first
    assign = dist[centres].argmin(0)  # [n] nearest centre
    assign[centres] = torch.arange(n_clusters, device=x.device)
    sums = xf.new_zeros(n_clusters, dim).index_add_(0, assign, xf)
    count = xf.new_zeros(n_clusters).index_add_(0, assign, xf.new_ones(n))
    return (sums / (count[:, None] + 1e-6)).to(x.dtype)


@register_pruner("sparsevlm")
class SparseVLM(ProgressiveSchedule, Pruner):
    """SparseVLM (v1 rules of the authors' code); see the module docstring."""

    stages = ("llm",)
    version = 1
    parameters = {
        "recycle": Param(bool, True, doc="recycle the best deleted tokens as cluster means (the authors' default)"),
        "positions": Param(str, None, choices=POSITIONS,
                           doc="RoPE positions of the kept and recycled tokens; null: compact (the authors' "
                               "renumbering) where the model family defines it (1-D RoPE), else original"),
    }

    def __init__(self, budget: int | None = None, seed: int = 0, **params: Any) -> None:
        super().__init__(budget=budget, seed=seed, **params)
        self._schedule: dict[str, Any] | None = None

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        if info.llm_num_layers < 4:
            raise ValueError(f"sparsevlm needs at least 4 decoder layers (three pruning layers K in 1..L-1), "
                             f"this model has {info.llm_num_layers}")
        budget = self.budget if self.budget is not None else info.num_visual_tokens
        self._schedule = sparsevlm_schedule(info.num_visual_tokens, info.llm_num_layers, budget,
                                            self.params["recycle"])

    def llm_capture_layers(self) -> list[int]:
        return [0] if self.llm_layers() else []  # layer 0's input: the LLM input embeddings (raters)

    # ---- the stage ----------------------------------------------------------------------------
    def _raters(self, ctx: LLMLayerContext) -> torch.Tensor:
        """[B, Ni] bool over ``ctx.instruction_pos``' axis, chosen at the first stage (the sequence is still
        the prompt there, so the captured input embeddings line up with its positions)."""
        if "sparsevlm_raters" not in ctx.state:
            emb = ctx.captures[0]["layer_in"]  # [B, L, D]
            real_v = ctx.key_mask.gather(1, ctx.visual_pos)
            ipos = ctx.instruction_pos
            out = torch.zeros(ipos.shape, dtype=torch.bool, device=ipos.device)
            for b in range(emb.shape[0]):
                valid = ipos[b] >= 0
                v = emb[b, ctx.visual_pos[b][real_v[b]]]
                t = emb[b, ipos[b][valid]]
                out[b, valid.nonzero()[:, 0]] = select_raters(v, t)
            ctx.state["sparsevlm_raters"] = out
        return ctx.state["sparsevlm_raters"]

    def scores(self, ctx: LLMLayerContext) -> torch.Tensor:
        """[B, Nv] head-mean attention of scoring layer K - 1 from the raters to the visual tokens,
        averaged over the raters."""
        raters = self._raters(ctx) & (ctx.instruction_pos >= 0)
        q, k, _ = ctx.layer_qkv(ctx.layer - 1, "instruction")
        rows = attention_rows_at(q, k, ctx.visual_pos, key_mask=ctx.key_mask,
                                 query_pos=ctx.instruction_pos.clamp(min=0), scale=q.shape[-1] ** -0.5)  # [B, Ni, Nv]
        w = raters.to(rows.dtype)
        rows = torch.where(raters[..., None], rows, torch.zeros_like(rows))  # no NaN from padded rows
        return rows.sum(1) / w.sum(1, keepdim=True).clamp(min=1)

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor | LLMDecision:
        score = self.scores(ctx)  # [B, Nv]
        keep = ctx.keep_top(score, self.count_at(ctx.layer))  # [B, k]
        if not self.params["recycle"]:
            return keep
        B, nv = score.shape
        real = ctx.key_mask.gather(1, ctx.visual_pos)  # [B, Nv] real visual tokens (not inert, not fillers)
        kept = torch.zeros(B, nv, dtype=torch.bool, device=score.device).scatter(1, keep, True)
        if ctx.fillers is not None:  # slots beyond a sample's own count are not kept tokens of it
            kept = kept & ~ctx.fillers
        deleted = real & ~kept
        merged = []
        for b in range(B):
            idx = deleted[b].nonzero()[:, 0]
            r = recycled_count(int(idx.numel()))
            if r == 0:
                merged.append(ctx.hidden_states.new_zeros(0, ctx.hidden_states.shape[-1]))
                continue
            cand = idx[score[b, idx].topk(r).indices]  # best first
            x = ctx.hidden_states[b, ctx.visual_pos[b, cand]]  # [r, D] this layer's input (= layer K-1's output)
            merged.append(density_peaks_merge(x, cluster_count(r)))
        m = max(t.shape[0] for t in merged)
        if m == 0:
            return keep
        counts = torch.tensor([t.shape[0] for t in merged], device=score.device)
        pad = torch.stack([torch.cat([t, t.new_zeros(m - t.shape[0], t.shape[1])]) for t in merged])
        return LLMDecision(keep=keep, merged=pad, merged_counts=counts)
