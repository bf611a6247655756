"""What the pre-LLM stage can read of a vision block when the family spec encodes the images itself
(``FamilySpec.vision_loop = False``, ``vision_probes = True``: Qwen2-VL, Qwen2.5-VL).

The spec's ``encode_images`` captures the blocks a pruner declared (``vision_probe_layers()``) while the
tower runs, one `VisionBlockProbe` per image and block, its rows in *feature order*: feature token j
(one LLM token, a Qwen 2x2 unit) is rows ``g*j .. g*j+g-1`` (g = rows per feature token). From a probe
the engine offers the pruner (lazily, inside its call, so the work counts as pruner overhead):

- ``vision_qkv(layer)``: ``(q, k, v)`` each [1, H, n, Dh], RoPE applied as the block applies it;
- ``vision_hidden(layer)``: [1, n, Dv] the block's output;
- ``vision_attention(layer)``: [1, N, N] the block's head-mean softmax attention pooled to feature tokens
  the way the merger pools the patches (`feature_attention`), with the block's attention segments (one
  per image; Qwen2.5-VL's windows) respected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisionBlockProbe:
    """One vision block on one image, rows in feature order.

    q, k, v: [H, n, Dh] the block's attention projections (q and k with its rotary embedding).
    hidden:  [n, Dv] the block's output.
    segment: [n] the attention segment of each row: rows attend only to rows of their own segment
             (the whole image, or Qwen2.5-VL's window in its windowed blocks).
    scale:   the block's softmax scale.
    n_cls:   leading rows that are [CLS] tokens, not part of any feature token (InternVL: 1 per tile,
             the probe of one tile; default 0: every row belongs to a feature token).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    hidden: torch.Tensor
    segment: torch.Tensor
    scale: float
    n_cls: int = 0

    @property
    def qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q, self.k, self.v

    def rows(self, index: torch.Tensor) -> VisionBlockProbe:
        """The probe restricted to (and reordered by) row ``index`` [n'] (with [CLS] rows, ``index`` must
        list them first: the result keeps ``n_cls``)."""
        return VisionBlockProbe(self.q[:, index], self.k[:, index], self.v[:, index], self.hidden[index],
                                self.segment[index], self.scale, self.n_cls)


@dataclass(frozen=True)
class ImageEncoding:
    """What `FamilySpec.encode_images` returns: per image its [n_i, Dv] features (run order) and its
    probes, ``{block: VisionBlockProbe}`` (empty unless blocks were asked for).

    view_probes: optional, per image and per view of its layout, that view's own probes (InternVL: one
    ViT pass per tile, each with its [CLS] row, ``n_cls = 1``); when given, a view of an image of several
    views is pruned with these instead of the image's probes restricted to the view's rows."""

    features: list[torch.Tensor]
    probes: list[dict[int, VisionBlockProbe]]
    view_probes: list[list[dict[int, VisionBlockProbe]]] | None = None


def segment_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """[n] segment of each row from cumulative boundaries ``cu_seqlens`` [S + 1] (0, ..., n)."""
    rows = torch.arange(n, device=cu_seqlens.device)
    return torch.bucketize(rows, cu_seqlens[1:].to(rows.dtype), right=True)


def patch_attention(probe: VisionBlockProbe) -> torch.Tensor:
    """[n, n] head-mean softmax attention of the block over its rows (0 between rows of different
    segments), in float32, one head at a time (n^2 floats at most)."""
    H, n, _ = probe.q.shape
    apart = probe.segment[:, None] != probe.segment[None, :]  # [n, n] keys a query cannot see
    out = torch.zeros(n, n, dtype=torch.float32, device=probe.q.device)
    for h in range(H):
        s = (probe.q[h].float() @ probe.k[h].float().T) * probe.scale  # [n, n]
        out += torch.softmax(s.masked_fill(apart, float("-inf")), dim=-1)
    return out / H


def feature_attention(probe: VisionBlockProbe, n_features: int) -> torch.Tensor:
    """[N, N] attention between feature tokens (N = ``n_features``, g = n / N rows each): a feature
    token's query row is the mean of its g rows' attention, and it receives the sum over its g key
    rows, so every row still sums to 1 (the merger's grouping applied to the attention, as VisPruner's
    author describes for Qwen2.5-VL). N = n gives the rows' own attention. A probe with [CLS] rows
    (``n_cls > 0``) gives `feature_attention_cls`."""
    if probe.n_cls:
        return feature_attention_cls(probe, n_features)
    n = probe.q.shape[1]
    if n % n_features:
        raise ValueError(f"{n} probe rows do not split into {n_features} feature tokens")
    g = n // n_features
    a = patch_attention(probe)  # [n, n]
    return a.view(n_features, g, n_features, g).sum(3).mean(1)  # [N, N]


def feature_attention_cls(probe: VisionBlockProbe, n_features: int) -> torch.Tensor:
    """[c + N, c + N] `feature_attention` of a probe whose first c = ``probe.n_cls`` rows are [CLS]
    tokens: the softmax runs over every row ([CLS] keys included, as the block computes it); [CLS] rows
    and columns stay as they are, the N feature tokens are pooled like `feature_attention` (query rows
    the mean of their g rows, key columns the sum), so every row still sums to 1."""
    c = probe.n_cls
    n = probe.q.shape[1] - c
    if n % n_features:
        raise ValueError(f"{n} probe rows after {c} [CLS] rows do not split into {n_features} feature tokens")
    g = n // n_features
    a = patch_attention(probe)  # [c + n, c + n]
    out = a.new_zeros(c + n_features, c + n_features)
    out[:c, :c] = a[:c, :c]
    out[:c, c:] = a[:c, c:].view(c, n_features, g).sum(2)
    out[c:, :c] = a[c:, :c].view(n_features, g, c).mean(1)
    out[c:, c:] = a[c:, c:].view(n_features, g, n_features, g).sum(3).mean(1)
    return out


#: how `cls_feature_attention` turns the [CLS] attention to a feature token's g rows into one score
CLS_REDUCES = ("sum", "mean", "max")


def cls_feature_attention(probe: VisionBlockProbe, n_features: int, reduce: str) -> torch.Tensor:
    """[N] head-mean softmax attention of the probe's first [CLS] row over all its rows (its segment's),
    in float32, each feature token's g key columns reduced by ``reduce`` (`CLS_REDUCES`; the family's
    `FamilySpec.cls_unit_reduce`). With "sum" it is row 0 of `feature_attention_cls` over the features."""
    if probe.n_cls < 1:
        raise ValueError("this probe has no [CLS] row")
    if reduce not in CLS_REDUCES:
        raise ValueError(f"cls_unit_reduce must be one of {CLS_REDUCES}, got {reduce!r}")
    c = probe.n_cls
    n = probe.q.shape[1] - c
    if n % n_features:
        raise ValueError(f"{n} probe rows after {c} [CLS] rows do not split into {n_features} feature tokens")
    g = n // n_features
    H = probe.q.shape[0]
    apart = probe.segment[None, :] != probe.segment[:1, None]  # [1, c + n] keys the [CLS] query cannot see
    row = torch.zeros(1, probe.q.shape[1], dtype=torch.float32, device=probe.q.device)
    for h in range(H):
        s = (probe.q[h, :1].float() @ probe.k[h].float().T) * probe.scale  # [1, c + n]
        row += torch.softmax(s.masked_fill(apart, float("-inf")), dim=-1)
    cols = (row[0, c:] / H).view(n_features, g)  # [N, g]
    if reduce == "sum":
        return cols.sum(1)
    if reduce == "mean":
        return cols.mean(1)
    return cols.amax(1)
