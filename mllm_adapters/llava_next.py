"""Adapter for transformers' LlavaNextForConditionalGeneration (LLaVA-NeXT / LLaVA-1.6, anyres tiling).

How the model feeds an image to the LLM (``LlavaNextModel.pack_image_features``): the processor
cuts the image into a *base tile* (the whole image resized to one ViT input, side x side patches)
plus gh x gw *crops* of the best-fitting grid pinpoint. Each tile goes through the ViT on its own
(CLS dropped, feature layer -2, projector). The crops' patch grids are stitched into one
(gh*side) x (gw*side) *canvas*, the canvas rows (or columns) that only cover the processor's
letterbox padding are cut ("unpad"), and a learned ``image_newline`` vector is appended after every
remaining canvas row. The image's *packed run* is: base tile (raster), then the canvas rows, each
followed by its newline. On LLaVA-NeXT-7B that is 576 + h' x (w' + 1) tokens with h', w' <= 48,
so the count depends on the image's size (at most 2,928 with the 672 x 672 pinpoint).
`image_layout` rebuilds that packing as an index table, so the adapter can gather exactly the
tokens the model would feed the LLM; `tests/test_llava_next_adapter.py` checks it against
transformers' own packing.

How pruners see the tokens (the rules, also in README.md):

- ``budget`` = visual tokens per image reaching the LLM, as for LLaVA-1.5. ``ModelInfo`` describes
  the model: ``num_visual_tokens`` is the largest packed run any image can have (newlines included),
  ``grid_hw`` the patch grid of ONE tile. ``budget=None`` (or >= that maximum) keeps everything and the
  model runs untouched. An image whose own packed run is at most ``budget`` tokens long reaches the
  LLM unchanged (newlines included).
- ``handle.kept_indices`` are positions in the image's unpruned packed run (0 .. N_b - 1: base tile
  first, then canvas rows, newline slots included), in the order the LLM sees them.
- ``pre_llm`` stage, per tile: every pre-LLM method runs on each tile separately, as if the tile
  were a LLaVA-1.5 image: only the tile's patches that survive unpadding are shown, as a
  rectangular grid (``ctx.info.grid_hw`` = that rectangle, ``ctx.patch_index`` its raster index,
  ``ctx.pixel_values`` the matching pixels); CLS attention, ViT q/k/v and hidden states come from
  that tile's own ViT pass, restricted to [CLS] + those patches; the prompt in the context holds a
  run of exactly that many placeholders. The image budget is split over its tiles in proportion
  to their shown patch counts (largest remainder, ties to the earlier tile; a tile whose share is
  0 contributes nothing; adaptive methods that choose their own count run on every tile with
  ``budget=None``). Kept tokens are put back in packed order; merged tokens with an anchor sit
  right after it, the others follow the image's kept tokens, tile by tile. Newline tokens carry
  no vision feature, so a pruned image reaches the LLM without them (the budget counts exactly the
  tokens the LLM sees). Random choices are seeded per tile from (seed, tile pixels).
- ``llm`` stage: unchanged LLaVA machinery on the LLM sequence. The visual run of every sample
  is its packed (or pre-LLM pruned) run, newlines included (an in-LLM method may drop them like any
  visual token). Images of different sizes give runs of different lengths, so each run is padded to
  a common width with *inert slots*: masked out as keys everywhere, not advancing RoPE positions,
  scoring 0 in attention rows and TTV and -inf in carried scores, so a method ranks them last. The
  width is at least the largest count the method keeps at any pruning layer: an image with fewer
  tokens keeps all of them (plus inert slots). The outputs at inert slots are meaningless, like
  those at padding; every real token sees exactly what it would see alone (batch of two = two
  batches of one). Counts of progressive methods (PDrop, TransPrune, VFlowOpt) are computed from
  ``ModelInfo.num_visual_tokens``, the model's maximum.
- ``handle.token_counts`` (what `benchmarks.flops` reads): the LLaVA-1.5 keys (``llm_visual`` and
  ``visual_in`` hold the batch maxima) plus per image ``visual_in_per_sample`` (its packed run),
  ``vision_tiles`` (ViT passes), ``projector_per_sample`` (tokens through the projector) and
  ``llm_visual_per_sample`` (its real tokens entering each decoder layer, inert slots excluded);
  ``llm_visual_width`` is the padded width the batch actually computed. ``vision`` (tokens entering
  each ViT layer of one tile; with a vision-stage method, the padded width of the batch's tile rows)
  is absent when the model runs untouched (every layer runs then). With a vision-stage method,
  ``vision_per_tile_per_sample`` lists per image, per tile that ran, the real tokens entering each of
  its ViT layers (``vision_tiles`` stays the image's tile count, what the untouched model runs).
- ``vision`` stage (FlowCut: tokens cut inside the ViT), per tile: the tiles of the whole batch run
  through the ViT layers together as one batch. After each of the method's layers the pruner is
  called once per tile (B = 1) with that tile's share of the image budget (split as in the pre_llm
  stage, `split_budget`). It sees the tile's view: [CLS] + its current patches that survive
  unpadding (``ctx.info.grid_hw`` = the view rectangle, ``ctx.patch_index`` raster indices in it, CLS
  attention and q/k/v of that layer restricted to those columns), with a state dict of its own. The
  tile's patches outside its view stay in its sequence until its first cut, then leave it. Tiles
  keeping different counts are padded to the widest row and the padding is masked as keys, so each
  tile computes as if alone (batch of two = two batches of one). A tile whose share covers its view
  runs whole (like an image within the budget, whose tiles all run whole and which reaches the LLM
  with its newlines); a tile whose share is 0 is not run at all. The kept patches of the image's
  tiles reach the LLM in packed order, without newlines (as pre_llm). A method combining the
  vision stage with another stage is refused with a ValueError naming it and the supported stages.

Positions: tokens dropped before the LLM are removed from the position count (compact, as for
LLaVA-1.5); in-LLM pruning keeps original positions unless ``positions="compact"``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.image_processing_utils import select_best_resolution
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mllm_adapters.handle import PruningHandle
from mllm_adapters.llava import LlavaAdapter, _Forward, _gather_seq
from mllm_adapters.registry import register_family
from pruners._schedule import ProgressiveSchedule
from pruners.base import ModelInfo, PreLLMContext, Pruner, VisionLayerContext, sample_generators

MODEL_CLASS = "LlavaNextForConditionalGeneration"
INERT = -2  # visual_index of an inert slot (merged tokens are -1, as for LLaVA-1.5)


# ---- packing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageLayout:
    """Where each token of one image's packed run comes from.

    side:  patches per tile side.
    rects: per tile (0 = base, then the crops in the processor's row-major order), the rectangle of
           its side x side patch grid that survives unpadding, as (r0, r1, c0, c1) half-open.
    src:   [N] for each packed slot, the flat source ``tile * side**2 + patch`` (patch = raster index
           in the tile), or -1 for an ``image_newline`` slot.
    """

    side: int
    rects: tuple[tuple[int, int, int, int], ...]
    src: torch.Tensor

    @property
    def n_tiles(self) -> int:
        return len(self.rects)

    @property
    def n_packed(self) -> int:
        return int(self.src.numel())

    def view_patches(self, tile: int) -> torch.Tensor:
        """[m] raster indices (in the tile's side x side grid) of the tile's patches that are packed."""
        r0, r1, c0, c1 = self.rects[tile]
        rows = torch.arange(r0, r1)[:, None]
        cols = torch.arange(c0, c1)[None, :]
        return (rows * self.side + cols).reshape(-1)

    def packed_index(self) -> torch.Tensor:
        """[n_tiles * side**2] packed slot of every (tile, patch), -1 where unpadding drops it."""
        out = torch.full((self.n_tiles * self.side**2,), -1, dtype=torch.long)
        real = self.src >= 0
        out[self.src[real]] = torch.arange(self.n_packed)[real]
        return out


def _unpadded_span(orig_hw: tuple[int, int], canvas_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) of a canvas of ``canvas_hw`` patches kept by LLaVA-NeXT's unpadding of an image
    of ``orig_hw`` pixels (same arithmetic as transformers' ``unpad_image``)."""
    oh, ow = orig_hw
    ch, cw = canvas_hw
    if ow / oh > cw / ch:
        scale = cw / ow
        new_h = int(round(oh * scale, 7))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    scale = ch / oh
    new_w = int(round(ow * scale, 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


def image_layout(image_size: tuple[int, int], pinpoints: list[list[int]], tile_px: int, side: int) -> ImageLayout:
    """The packed run of an image of ``image_size`` = (height, width) pixels (see `ImageLayout`)."""
    best_h, best_w = select_best_resolution(list(image_size), pinpoints)
    gh, gw = best_h // tile_px, best_w // tile_px
    n2 = side * side
    rects: list[tuple[int, int, int, int]] = [(0, side, 0, side)]
    src = [torch.arange(n2)]
    if gh * gw == 0:  # no crops: base tile + one newline (transformers' single-tile branch)
        src.append(torch.tensor([-1]))
        return ImageLayout(side, tuple(rects), torch.cat(src))
    R0, R1, C0, C1 = _unpadded_span(tuple(int(v) for v in image_size), (gh * side, gw * side))
    for i in range(gh):
        for j in range(gw):
            r0, r1 = max(R0 - i * side, 0), min(R1 - i * side, side)
            c0, c1 = max(C0 - j * side, 0), min(C1 - j * side, side)
            rects.append((r0, max(r0, r1), c0, max(c0, c1)))
    R = torch.arange(R0, R1)[:, None]  # canvas rows kept
    C = torch.arange(C0, C1)[None, :]  # canvas cols kept
    tile = 1 + (R // side) * gw + (C // side)  # [h', w']
    flat = tile * n2 + (R % side) * side + (C % side)  # [h', w'] source of each canvas cell
    nl = torch.full((flat.shape[0], 1), -1, dtype=torch.long)
    src.append(torch.cat([flat, nl], dim=1).reshape(-1))  # rows, each followed by its newline
    return ImageLayout(side, tuple(rects), torch.cat(src))


def max_packed_tokens(pinpoints: list[list[int]], tile_px: int, side: int) -> int:
    """Longest packed run any image can have: base tile + the largest canvas with one newline per row."""
    best = 0
    for h, w in pinpoints:
        gh, gw = h // tile_px, w // tile_px
        best = max(best, gh * side * (gw * side + 1))
    return side * side + max(best, 1)


def split_budget(budget: int, sizes: list[int]) -> list[int]:
    """Split ``budget`` over parts of ``sizes`` tokens in proportion to size (largest remainder; ties go
    to the earlier part). Each share is at most its part's size; the shares sum to min(budget, sum)."""
    total = sum(sizes)
    if budget >= total:
        return list(sizes)
    shares = [budget * m // total for m in sizes]
    rema = [(-(budget * m % total), i) for i, m in enumerate(sizes)]
    for _, i in sorted(rema)[: budget - sum(shares)]:
        shares[i] += 1
    return shares


# ---- adapter -----------------------------------------------------------------------------------
@dataclass
class _NextForward(_Forward):
    """Per-prefill state plus the prompt rewrite (kept for the decode steps)."""

    src_cols: torch.Tensor | None = None  # [B, L'] original column of each LLM-prompt column (-1 = inert/pad)
    advancing: torch.Tensor | None = None  # [B, L'] True for columns that advance positions (= src_cols >= 0)
    removed: torch.Tensor | None = None  # [B] image tokens dropped before the LLM, per sample


def _vision_stage_error(pruner: Pruner) -> ValueError:
    return ValueError(
        f"method {pruner.name!r} combines vision-stage pruning (inside the ViT) with the stages "
        f"{[s for s in pruner.stages if s != 'vision']}, which is not supported for {MODEL_CLASS}: a vision-stage "
        f"method runs there on its own, per anyres tile. Supported: 'vision' alone (per tile), 'pre_llm' (per "
        f"tile), 'llm', and 'pre_llm' + 'llm'"
    )


@dataclass
class _VisionTile:
    """One tile the vision stage runs through the ViT (a row of the batched tile sequence)."""

    image: int  # sample in the batch
    tile: int  # tile of that image (0 = base)
    row: int  # tile in the batch's [T, 3, S, S] pixel tensor
    in_view: torch.Tensor  # [side**2] bool: the tile's patches that survive unpadding
    view_rank: torch.Tensor  # [side**2] raster index of each view patch inside the view's rectangle
    pruner: Pruner | None  # the tile's pruner (its share of the budget), None when the tile stays whole
    state: dict[str, Any]  # the tile pruner's per-forward state (e.g. FlowCut's cumulative flow)


@register_family("llava_next")
class LlavaNextAdapter(LlavaAdapter):
    """Attach one pruner to a LlavaNextForConditionalGeneration (see the module docstring)."""

    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    tiny_builders = ("build_tiny_llava_next", "tiny_llava_next_config")

    def __init__(self, model: nn.Module, pruner: Pruner, handle: PruningHandle) -> None:
        if "vision" in pruner.stages and len(pruner.stages) > 1:
            raise _vision_stage_error(pruner)
        self._layouts: dict[tuple[int, int], ImageLayout] = {}
        self._tile_pruners: dict[tuple, Pruner] = {}
        super().__init__(model, pruner, handle)
        self._fw = _NextForward()

    def _model_info(self) -> ModelInfo:
        base = super()._model_info()  # validates the tower, feature layer and select strategy
        vcfg = self.config.vision_config
        self.side = vcfg.image_size // vcfg.patch_size
        self.tile_px = vcfg.image_size
        self.patch_px = vcfg.patch_size
        self.pinpoints = [list(p) for p in self.config.image_grid_pinpoints]
        n_max = max_packed_tokens(self.pinpoints, self.tile_px, self.side)
        return dataclasses.replace(base, family="llava_next", num_visual_tokens=n_max)

    def remove(self) -> None:
        super().remove()
        self._fw = _NextForward()

    def layout(self, image_size: tuple[int, int]) -> ImageLayout:
        """The (cached) packed-run layout of an image of ``image_size`` = (height, width) pixels."""
        key = (int(image_size[0]), int(image_size[1]))
        if key not in self._layouts:
            self._layouts[key] = image_layout(key, self.pinpoints, self.tile_px, self.side)
        return self._layouts[key]

    def _advancing(self) -> torch.Tensor | None:
        return self._fw.advancing if isinstance(self._fw, _NextForward) else None

    # ---- top-level hook ------------------------------------------------------------------------
    # positional order of LlavaNextForConditionalGeneration.forward
    _FORWARD_ARGS = ("input_ids", "pixel_values", "image_sizes", "attention_mask", "position_ids", "past_key_values")

    def _new_forward(self) -> _NextForward:
        return _NextForward()

    def _top_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, prefill = (), self._start_forward(args, kwargs)
        if not prefill:
            return args, kwargs
        fw = self._fw
        pixel_values = kwargs.get("pixel_values")
        input_ids = kwargs.get("input_ids")
        if pixel_values is None or kwargs.get("mm_encoder_outputs") is not None:
            self.handle.kept_indices = []
            fw.prompt_len = input_ids.shape[1] if input_ids is not None else 0
            return args, kwargs
        if input_ids is None:
            raise ValueError("pruning needs input_ids (with image placeholder tokens), not inputs_embeds")
        image_sizes = kwargs.get("image_sizes")
        if image_sizes is None:
            raise ValueError(f"{MODEL_CLASS} needs image_sizes (from its processor) next to pixel_values")
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        layouts = [self.layout(tuple(s)) for s in torch.as_tensor(image_sizes).tolist()]
        starts = self._image_runs(input_ids, layouts)
        n_packed = [lay.n_packed for lay in layouts]
        n_layers = self.info.llm_num_layers
        if self.pruner.keeps_all:  # the model runs untouched
            self.handle.kept_indices = [torch.arange(n, device=input_ids.device) for n in n_packed]
            self.handle.token_counts = {
                "visual_in": max(n_packed), "visual_in_per_sample": n_packed, "merged": 0,
                "vision_tiles": [lay.n_tiles for lay in layouts],
                # the untouched model projects every patch of every tile (before unpadding)
                "projector_per_sample": [lay.n_tiles * self.side**2 for lay in layouts],
                "llm_visual": [max(n_packed)] * n_layers, "llm_visual_per_sample": [[n] * n_layers for n in n_packed],
            }
            fw.prompt_len = input_ids.shape[1]
            return args, kwargs

        tiles, first_tile = self._tiles(pixel_values, layouts)  # [T, 3, S, S]
        if "vision" in self.pruner.stages:
            per_image = self._vision_stage_next(tiles, first_tile, layouts)
        else:
            per_image = self._vision_and_pre_llm_next(tiles, first_tile, layouts, input_ids, attention_mask, starts)
        self._rewrite_prompt(kwargs, input_ids, attention_mask, starts, layouts, per_image)
        return args, kwargs

    def _image_runs(self, input_ids: torch.Tensor, layouts: list[ImageLayout]) -> torch.Tensor:
        """[B] start of each sample's image run; checks one contiguous run of the packed length per sample."""
        is_img = input_ids == self.config.image_token_id
        counts = is_img.sum(1).tolist()
        expected = [lay.n_packed for lay in layouts]
        if len(expected) != input_ids.shape[0] or counts != expected:
            raise ValueError(
                f"each sample must hold exactly one image whose placeholder run matches its packed token count "
                f"(from image_sizes): expected {expected}, got {counts}"
            )
        starts = is_img.float().argmax(1)
        for b, n in enumerate(expected):
            s = int(starts[b])
            if not bool(is_img[b, s : s + n].all()):
                raise ValueError(f"sample {b}: the {n} image placeholders are not one contiguous run")
        return starts

    def _tiles(self, pixel_values: torch.Tensor, layouts: list[ImageLayout]) -> tuple[torch.Tensor, list[int]]:
        """All tiles of the batch [T, 3, S, S] (padding tiles of the 5-D layout dropped) and each image's first."""
        counts = [lay.n_tiles for lay in layouts]
        if pixel_values.dim() == 5:  # [B, max_tiles, 3, S, S]
            tiles = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)], dim=0)
        elif pixel_values.dim() == 4:  # already [T, 3, S, S]
            tiles = pixel_values
        else:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")
        if tiles.shape[0] != sum(counts):
            raise ValueError(f"pixel_values hold {tiles.shape[0]} tiles, image_sizes imply {sum(counts)}")
        first = [0]
        for n in counts[:-1]:
            first.append(first[-1] + n)
        return tiles, first

    # ---- vision + per-tile pre-LLM -------------------------------------------------------------
    def _embed(self, tiles: torch.Tensor) -> torch.Tensor:
        """ViT input sequences [T, n_cls + side**2, Dv] of tiles [T, 3, S, S] (embeddings, pre-norm)."""
        vt = self.vision_tower
        hs = vt.embeddings(tiles.to(vt.embeddings.patch_embedding.weight.dtype))
        return vt.pre_layrnorm(hs) if hasattr(vt, "pre_layrnorm") else hs

    def _run_vit(
        self, tiles: torch.Tensor, probe: set[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """ViT on every tile up to the feature layer: (features [T, side**2, Dv], layer inputs, layer outputs)."""
        info = self.info
        hs = self._embed(tiles)  # [T, 1+n2, Dv]
        layer_in: dict[int, torch.Tensor] = {}
        layer_out: dict[int, torch.Tensor] = {}
        for i in range(info.vision_feature_layer + 1):
            h_in = hs
            hs = self._run_vision_layer(i, hs, None, i in probe)
            if i in probe:
                layer_in[i], layer_out[i] = h_in, hs
        n_cls = hs.shape[1] - self.side**2
        return hs[:, n_cls:], layer_in, layer_out

    def _vision_and_pre_llm_next(
        self,
        tiles: torch.Tensor,
        first_tile: list[int],
        layouts: list[ImageLayout],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        starts: torch.Tensor,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Per image: (vision-space tokens [n, Dv], newline flags [n], packed index [n] (-1 merged), scores [n] | None)."""
        pruner, info = self.pruner, self.info
        run_pre = "pre_llm" in pruner.stages
        probe = set(pruner.vision_probe_layers()) if run_pre else set()
        feats, layer_in, layer_out = self._run_vit(tiles, probe)
        n2 = self.side**2
        self.handle.token_counts = {
            "visual_in": max(lay.n_packed for lay in layouts),
            "visual_in_per_sample": [lay.n_packed for lay in layouts],
            "vision": [feats.shape[1] + (1 if info.has_cls else 0)] * (info.vision_feature_layer + 1),
            "vision_tiles": [lay.n_tiles for lay in layouts],
        }
        gens = sample_generators(pruner.seed, tiles) if run_pre else []
        cls_cache: dict[int, torch.Tensor] = {}
        out = []
        for b, lay in enumerate(layouts):
            t0 = first_tile[b]
            img_feats = feats[t0 : t0 + lay.n_tiles].reshape(-1, feats.shape[-1])  # [n_tiles*n2, Dv]
            if not run_pre or self._reaches_whole(lay):
                src = lay.src.to(feats.device)
                out.append((img_feats[src.clamp(min=0)], src < 0, torch.arange(lay.n_packed, device=feats.device), None))
                continue
            views, sizes, shares = self._tile_shares(lay)
            pidx = lay.packed_index().to(feats.device)
            keys, toks, index, scores = [], [], [], []
            any_scores = False
            tail = 0  # running key for merged tokens without an anchor (after every packed slot)
            for t, (vp, k_t) in enumerate(zip(views, shares)):
                m = sizes[t]
                if m == 0 or k_t == 0:
                    continue
                vp = vp.to(feats.device)
                tg = t0 + t
                tile_feats = feats[tg : tg + 1, vp]  # [1, m, Dv]
                if k_t is not None and k_t >= m:
                    keep, merged, anchor, sc = torch.arange(m, device=feats.device)[None], None, None, None
                else:
                    ctx = self._tile_context(
                        tg, lay.rects[t], vp, tile_feats, tiles, layer_in, layer_out, cls_cache, gens[tg],
                        input_ids[b : b + 1], attention_mask[b : b + 1], int(starts[b]), lay.n_packed, probe,
                    )
                    decision = self._call_pruner(self._tile_pruner(k_t, lay.rects[t]).prune_pre_llm, ctx)
                    self.handle.info.update(decision.info)
                    keep, merged, anchor, sc = decision.keep, decision.merged, decision.merged_anchor, decision.scores
                k = keep.shape[1]
                packed = pidx[t * n2 + vp[keep[0]]]  # [k]
                keys.append(packed * 2)
                toks.append(tile_feats[0, keep[0]])
                index.append(packed)
                if sc is not None:
                    any_scores = True
                scores.append(sc[0, :k].float() if sc is not None else torch.zeros(k, device=feats.device))
                if merged is not None and merged.shape[1]:
                    nm = merged.shape[1]
                    if anchor is not None:
                        keys.append(pidx[t * n2 + vp[anchor[0]]] * 2 + 1)
                    else:
                        keys.append(2 * lay.n_packed + tail + torch.arange(nm, device=feats.device))
                        tail += nm
                    toks.append(merged[0].to(tile_feats.dtype))
                    index.append(torch.full((nm,), -1, dtype=torch.long, device=feats.device))
                    scores.append(sc[0, k:].float() if sc is not None else torch.zeros(nm, device=feats.device))
            order = torch.cat(keys).argsort(stable=True)
            tok = torch.cat(toks)[order]
            out.append((tok, torch.zeros(tok.shape[0], dtype=torch.bool, device=tok.device), torch.cat(index)[order],
                        torch.cat(scores)[order] if any_scores else None))
        self._fw.vision_qkv.clear()
        return out

    # ---- vision stage, per tile ------------------------------------------------------------------
    def _vision_plan(self, first_tile: list[int], layouts: list[ImageLayout], device: torch.device) -> list[_VisionTile]:
        """The tiles the ViT runs: every tile with packed patches, except those a pruned image gives no share."""
        n2 = self.side**2
        plan = []
        for b, lay in enumerate(layouts):
            whole = self._reaches_whole(lay)
            views, sizes, shares = self._tile_shares(lay)
            for t, (vp, m, k) in enumerate(zip(views, sizes, shares)):
                if m == 0 or k == 0:
                    continue
                in_view = torch.zeros(n2, dtype=torch.bool, device=device)
                in_view[vp.to(device)] = True
                rank = torch.zeros(n2, dtype=torch.long, device=device)
                rank[vp.to(device)] = torch.arange(m, device=device)
                keep_whole = whole or (k is not None and k >= m)
                pruner = None if keep_whole else self._tile_pruner(k, lay.rects[t])
                plan.append(_VisionTile(b, t, first_tile[b] + t, in_view, rank, pruner, {}))
        return plan

    def _vision_stage_next(
        self, tiles: torch.Tensor, first_tile: list[int], layouts: list[ImageLayout]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Vision-stage pruning per tile (see the module docstring); same per-image output as
        `_vision_and_pre_llm_next`. The tiles of the whole batch run through the ViT together, each row
        padded to the widest (padding masked as keys, so each tile computes as if alone)."""
        info = self.info
        n_cls = 1 if info.has_cls else 0
        dev = tiles.device
        plan = self._vision_plan(first_tile, layouts, dev)
        rows = torch.tensor([p.row for p in plan], dtype=torch.long, device=dev)
        hs = self._embed(tiles[rows])  # [A, n_cls + side**2, Dv]
        # per tile: raster index (in its side x side grid) of each patch in its sequence; real ones first
        cur = [torch.arange(self.side**2, device=dev) for _ in plan]
        mask: torch.Tensor | None = None  # [A, W] real patches (None: every row is full)
        widths: list[int] = []
        per_tile: list[list[int]] = [[] for _ in plan]
        gens = sample_generators(self.pruner.seed, tiles)
        prunes = any(p.pruner is not None for p in plan)
        for i in range(info.vision_feature_layer + 1):
            widths.append(hs.shape[1])
            for a, c in enumerate(cur):
                per_tile[a].append(n_cls + int(c.numel()))
            key_mask = None if mask is None else torch.cat(
                [torch.ones(len(plan), n_cls, dtype=torch.bool, device=dev), mask], dim=1)  # [A, W + n_cls]
            h_in = hs
            here = prunes and i in self._vision_layers
            hs = self._run_vision_layer(i, hs, self._vision_additive_mask(key_mask, hs.dtype), here)
            if not here:
                continue
            sel = self._prune_tiles(i, plan, cur, hs, h_in, key_mask, gens)
            self._fw.vision_qkv.pop(i, None)
            if sel is None:
                continue
            lengths = torch.tensor([int(s.numel()) for s in sel], device=dev)
            width = int(lengths.max())
            cols = torch.zeros(len(plan), width, dtype=torch.long, device=dev)  # [A, W'] kept patch columns
            for a, s in enumerate(sel):
                cols[a, : s.numel()] = s
            hs = torch.cat([hs[:, :n_cls], _gather_seq(hs[:, n_cls:], cols)], dim=1)  # [A, n_cls + W', Dv]
            cur = [c[s] for c, s in zip(cur, sel)]
            real = torch.arange(width, device=dev)[None] < lengths[:, None]  # [A, W']
            mask = None if bool(real.all()) else real
        self.handle.token_counts = {
            "visual_in": max(lay.n_packed for lay in layouts),
            "visual_in_per_sample": [lay.n_packed for lay in layouts],
            "vision": widths,  # tokens per tile row the batch computed (the widest tile, padding included)
            "vision_tiles": [lay.n_tiles for lay in layouts],
            "vision_per_tile_per_sample": [[per_tile[a] for a, p in enumerate(plan) if p.image == b]
                                           for b in range(len(layouts))],
        }
        return self._assemble_tiles(hs[:, n_cls:], plan, cur, layouts)

    def _prune_tiles(
        self,
        i: int,
        plan: list[_VisionTile],
        cur: list[torch.Tensor],
        hs: torch.Tensor,
        h_in: torch.Tensor,
        key_mask: torch.Tensor | None,
        gens: list[torch.Generator],
    ) -> list[torch.Tensor] | None:
        """Call each pruned tile's pruner after ViT layer ``i`` on that tile's view: [CLS] + its current
        patches that survive unpadding, as a B = 1 sequence. Returns per tile the patch columns it keeps
        (its view patches the pruner kept, in raster order; a tile that keeps everything keeps all its
        columns), or None when no tile pruned."""
        n_cls = 1 if self.info.has_cls else 0
        cls_rows: list[torch.Tensor] = []  # this layer's [A, W] CLS attention, computed once when first asked

        def cls_attention(a: int, pos: torch.Tensor) -> torch.Tensor:
            if not cls_rows:
                cls_rows.append(self._cls_attention(i, h_in, key_mask))
            return cls_rows[0][a : a + 1, pos]

        def qkv(a: int, cols: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(x[a : a + 1][:, :, cols] for x in self._vision_qkv(i, h_in))  # each [1, H, n_cls + n, Dh]

        sel, pruned = [], False
        for a, p in enumerate(plan):
            c = cur[a]
            every = torch.arange(c.numel(), device=c.device)
            if p.pruner is None:
                sel.append(every)
                continue
            pos = p.in_view[c].nonzero()[:, 0]  # [n] columns (after CLS) of the tile's view patches
            cols = torch.cat([torch.arange(n_cls, device=c.device), n_cls + pos])  # [n_cls + n] sequence columns
            ctx = VisionLayerContext(
                layer=i,
                hidden_states=hs[a : a + 1, cols],
                patch_index=p.view_rank[c[pos]][None],
                info=p.pruner.info,
                state=p.state,
                cls_attention=lambda a=a, pos=pos: cls_attention(a, pos),
                qkv=lambda a=a, cols=cols: qkv(a, cols),
                generators=[gens[p.row]],
            )
            keep = self._call_pruner(p.pruner.prune_vision, ctx)
            if keep is None:
                sel.append(every)
                continue
            keep = keep[0][keep[0] >= 0].sort().values  # raster order, as the LLaVA-1.5 vision stage
            sel.append(pos[keep])
            pruned = True
        return sel if pruned else None

    def _assemble_tiles(
        self, feats: torch.Tensor, plan: list[_VisionTile], cur: list[torch.Tensor], layouts: list[ImageLayout]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Per image, its tiles' surviving view patches (``feats`` [A, W, Dv] at the feature layer) in packed
        order: the whole run with newline slots for an image within the budget, else without newlines."""
        n2 = self.side**2
        out = []
        for b, lay in enumerate(layouts):
            pidx = lay.packed_index().to(feats.device)
            slots, toks = [], []
            for a, p in enumerate(plan):
                if p.image != b:
                    continue
                s = pidx[p.tile * n2 + cur[a]]  # [n_a] packed slot of each patch (-1: cut by unpadding)
                slots.append(s[s >= 0])
                toks.append(feats[a, : cur[a].numel()][s >= 0])
            slot, tok = torch.cat(slots), torch.cat(toks)
            if self._reaches_whole(lay):
                full = tok.new_zeros(lay.n_packed, tok.shape[-1])  # newline slots get image_newline later
                full[slot] = tok
                src = lay.src.to(feats.device)
                out.append((full, src < 0, torch.arange(lay.n_packed, device=feats.device), None))
            else:
                order = slot.argsort()
                out.append((tok[order], torch.zeros(tok.shape[0], dtype=torch.bool, device=tok.device),
                            slot[order], None))
        return out

    def _reaches_whole(self, lay: ImageLayout) -> bool:
        """True when the image's packed run is within the budget: it reaches the LLM unpruned."""
        return not self.pruner.chooses_budget and self.pruner.budget >= lay.n_packed

    def _tile_shares(self, lay: ImageLayout) -> tuple[list[torch.Tensor], list[int], list[int | None]]:
        """Per tile of a pruned image: its view patches (`ImageLayout.view_patches`), their count, and its
        share of the budget (`split_budget` by view size; None for methods that choose their own count)."""
        views = [lay.view_patches(t) for t in range(lay.n_tiles)]
        sizes = [int(v.numel()) for v in views]
        shares = [None] * lay.n_tiles if self.pruner.chooses_budget else split_budget(self.pruner.budget, sizes)
        return views, sizes, shares

    def _tile_pruner(self, budget: int | None, rect: tuple[int, int, int, int]) -> Pruner:
        """A copy of the pruner (same parameters and seed) attached to one tile view's ModelInfo."""
        r0, r1, c0, c1 = rect
        key = (budget, r1 - r0, c1 - c0)
        if key not in self._tile_pruners:
            p = self.pruner
            clone = type(p)(budget=budget, seed=p.seed, **p.params)
            clone.attach(dataclasses.replace(self.info, num_visual_tokens=(r1 - r0) * (c1 - c0), grid_hw=(r1 - r0, c1 - c0)))
            self._tile_pruners[key] = clone
        return self._tile_pruners[key]

    def _tile_context(
        self,
        tg: int,
        rect: tuple[int, int, int, int],
        vp: torch.Tensor,
        tile_feats: torch.Tensor,
        tiles: torch.Tensor,
        layer_in: dict[int, torch.Tensor],
        layer_out: dict[int, torch.Tensor],
        cls_cache: dict[int, torch.Tensor],
        gen: torch.Generator,
        ids: torch.Tensor,
        mask: torch.Tensor,
        start: int,
        n_packed: int,
        probe: set[int],
    ) -> PreLLMContext:
        """PreLLMContext of one tile view (see the module docstring): B = 1, the tile's packed patches only."""
        m = int(vp.numel())
        n_cls = 1 if self.info.has_cls else 0
        cols = torch.cat([torch.arange(n_cls, device=vp.device), n_cls + vp])  # [n_cls + m] ViT sequence columns
        info = self.info

        def need(i: int) -> int:
            return self._probed_layer(i, layer_in, probe)

        def cls_attention(i: int) -> torch.Tensor:
            i = need(i)
            if i not in cls_cache:  # all tiles at once, [T, side**2]
                cls_cache[i] = self._cls_attention(i, layer_in[i], None)
            return cls_cache[i][tg : tg + 1, vp]

        def vision_qkv(i: int):
            q, k, v = self._vision_qkv(need(i), layer_in[need(i)])  # each [T, H, 1+n2, Dh]
            return tuple(x[tg : tg + 1][:, :, cols] for x in (q, k, v))

        # The prompt as the pruner sees it: this sample with an image run of exactly m placeholders.
        view_ids = torch.cat([ids[:, :start], ids.new_full((1, m), self.config.image_token_id),
                              ids[:, start + n_packed :]], dim=1)
        view_mask = torch.cat([mask[:, :start], mask.new_ones((1, m)), mask[:, start + n_packed :]], dim=1)
        image_start = torch.tensor([start], device=ids.device)
        r0, r1, c0, c1 = rect
        ps = self.patch_px
        return PreLLMContext(
            features=tile_feats,
            patch_index=torch.arange(m, device=tile_feats.device)[None],
            info=dataclasses.replace(info, num_visual_tokens=m, grid_hw=(r1 - r0, c1 - c0)),
            pixel_values=tiles[tg : tg + 1, :, r0 * ps : r1 * ps, c0 * ps : c1 * ps],
            input_ids=view_ids,
            attention_mask=view_mask,
            image_start=image_start,
            cls_attention=cls_attention,
            vision_hidden=lambda i: layer_out[need(i)][tg : tg + 1][:, cols],
            vision_qkv=vision_qkv,
            project=self.projector,
            text_embeddings=lambda: self.lm.embed_tokens(view_ids),
            question_texts=lambda: self._view_question(view_ids, view_mask, start + m),
            generators=[gen],
            state={},
            vision_post_norm=getattr(self.vision_tower, "post_layernorm", None),
        )

    def _view_question(self, ids: torch.Tensor, mask: torch.Tensor, after: int) -> list[str] | None:
        if self.tokenizer is None:
            return None
        keep = ids[0, after:][mask[0, after:].bool()]
        return [self.tokenizer.decode(keep, skip_special_tokens=True).strip()]

    # ---- the LLM prompt --------------------------------------------------------------------------
    def _llm_width_floor(self) -> int:
        """Largest visual-token count the in-LLM method keeps at any pruning layer (0 without one)."""
        p = self.pruner
        if "llm" not in p.stages or p.keeps_all or not self._llm_layers:
            return 0
        if isinstance(p, ProgressiveSchedule):
            return max(int(p.count_at(k)) for k in p.llm_layers())
        return int(p.budget or 0)

    def _rewrite_prompt(
        self,
        kwargs: dict[str, Any],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        starts: torch.Tensor,
        layouts: list[ImageLayout],
        per_image: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]],
    ) -> None:
        """Feed the assembled visual runs: shrink/pad each image run to a common width W (inert slots
        after the real tokens), re-pad the samples on the left, and set positions so that every real
        token keeps the position it has in its own unpruned prompt minus the image tokens dropped."""
        fw = self._fw
        dev = input_ids.device
        B, L = input_ids.shape
        n_real = [int(t[0].shape[0]) for t in per_image]
        W = max(max(n_real), self._llm_width_floor())
        lens = [L - lay.n_packed + W for lay in layouts]
        Lp = max(lens)
        src_rows = []
        for b, lay in enumerate(layouts):
            s, N, n = int(starts[b]), lay.n_packed, n_real[b]
            if n > N:
                raise ValueError(f"method {self.pruner.name!r} produced {n} tokens for an image of {N}")
            row = ([-1] * (Lp - lens[b]) + list(range(s)) + list(range(s, s + n)) + [-1] * (W - n)
                   + list(range(s + N, L)))
            src_rows.append(row)
        src = torch.tensor(src_rows, dtype=torch.long, device=dev)  # [B, L']
        real = src >= 0
        g = src.clamp(min=0)
        pad_id = self.config.text_config.pad_token_id
        if pad_id is None or pad_id == self.config.image_token_id:
            pad_id = 0 if self.config.image_token_id != 0 else 1
        new_ids = input_ids.gather(1, g).masked_fill(~real, pad_id)
        new_mask = attention_mask.gather(1, g) * real.to(attention_mask.dtype)
        pos = kwargs.get("position_ids")
        if pos is not None and pos.dim() != 2:
            raise ValueError(f"position_ids must be [B, L] for pruning, got shape {tuple(pos.shape)}")
        base = pos.expand(B, L) if pos is not None else torch.arange(L, device=dev).expand(B, L)
        s_t = starts.to(dev)[:, None]
        n_t = torch.tensor(n_real, device=dev)[:, None]
        N_t = torch.tensor([lay.n_packed for lay in layouts], device=dev)[:, None]
        dropped_before = (g - (s_t + n_t)).clamp(min=0).minimum(N_t - n_t)  # dropped image columns before each
        new_pos = torch.where(real, base.gather(1, g) - dropped_before, torch.zeros_like(g))
        kwargs["input_ids"] = new_ids
        kwargs["attention_mask"] = new_mask
        kwargs["position_ids"] = new_pos
        kwargs["pixel_values"] = None
        kwargs["image_sizes"] = None

        # Project and place newlines; one [n_b, Dt] tensor per image for the model's own scatter.
        feats_out, vis_index, vis_scores = [], [], []
        # A method with both stages may read the pre-LLM scores in the LLM (VFlowOpt): an image that
        # reached the LLM whole carries zeros (it keeps every token there: each count >= budget >= its run).
        has_scores = any(t[3] is not None for t in per_image) or {"pre_llm", "llm"} <= set(self.pruner.stages)
        newline = self.model.model.image_newline
        for tok, is_nl, index, scores in per_image:
            x = self.projector(tok[None])[0]  # [n, Dt]
            if bool(is_nl.any()):
                x = torch.where(is_nl[:, None], newline.to(x.dtype).expand_as(x), x)
            feats_out.append(x)
            n = x.shape[0]
            vis_index.append(torch.cat([index, index.new_full((W - n,), INERT)]))
            if has_scores:
                sc = scores if scores is not None else torch.zeros(n, device=x.device)
                vis_scores.append(torch.cat([sc.float(), sc.new_full((W - n,), float("-inf"))]))
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=feats_out)}

        fw.orig_len = L
        fw.prompt_len = Lp
        fw.src_cols = src
        fw.advancing = real
        fw.removed = (N_t - n_t)[:, 0]
        run_start = torch.tensor([Lp - lens[b] + int(starts[b]) for b in range(B)], device=dev)
        fw.visual_pos = run_start[:, None] + torch.arange(W, device=dev)[None]  # [B, W]
        fw.visual_index = torch.stack(vis_index)
        fw.visual_scores = torch.stack(vis_scores) if has_scores else None
        fw.key_mask = new_mask.bool()
        fw.instruction_pos = self._instruction_positions(fw.visual_pos, fw.key_mask)
        self.handle.kept_indices = [i[i >= 0] for i in fw.visual_index]
        n_layers = self.info.llm_num_layers
        counts = self.handle.token_counts
        counts["merged"] = max(int((i == -1).sum()) for i in fw.visual_index)
        counts["llm_visual"] = [max(n_real)] * n_layers
        counts["llm_visual_per_sample"] = [[n] * n_layers for n in n_real]
        counts["llm_visual_width"] = [W] * n_layers
        counts["projector_per_sample"] = list(n_real)  # newline slots of a whole run are projected too

    # ---- LLM stage / decoding ----------------------------------------------------------------------
    def _prefill_layer(self, i: int, hs: torch.Tensor, kwargs: dict) -> torch.Tensor:
        fw = self._fw
        pruned = fw.key_mask is not None and i in self._llm_layers and not self.pruner.keeps_all
        hs = super()._prefill_layer(i, hs, kwargs)
        if pruned and fw.visual_index is not None:  # pruned at i: count real tokens only
            counts = self.handle.token_counts
            real = [int((row != INERT).sum()) for row in fw.visual_index]
            width = fw.visual_index.shape[1]
            for j in range(i, self.info.llm_num_layers):
                counts["llm_visual"][j] = max(real)
                counts["llm_visual_width"][j] = width
                for b, n in enumerate(real):
                    counts["llm_visual_per_sample"][b][j] = n
        return hs

    def _decode_step_inputs(self, kwargs: dict[str, Any]) -> None:
        """Translate generate()'s bookkeeping (original prompt length) to the rewritten prompt."""
        fw = self._fw
        if not isinstance(fw, _NextForward) or fw.src_cols is None:
            return
        ids = kwargs.get("input_ids")
        n_new = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        seen = kwargs["past_key_values"].get_seq_length()  # layer 0 caches the whole rewritten prompt
        mask = kwargs.get("attention_mask")
        if mask is None:
            # generate() drops an all-ones mask; the inert slots and added pads must stay masked.
            if not bool(fw.advancing.all()):
                B = fw.src_cols.shape[0]
                new = torch.ones(B, seen - fw.prompt_len + n_new, dtype=torch.long, device=fw.src_cols.device)
                kwargs["attention_mask"] = torch.cat([fw.advancing.long(), new], dim=1)
        elif mask.dim() == 2 and mask.shape[1] >= fw.orig_len:
            head = mask[:, : fw.orig_len].gather(1, fw.src_cols.clamp(min=0)) * fw.advancing.to(mask.dtype)
            kwargs["attention_mask"] = torch.cat([head, mask[:, fw.orig_len :]], dim=1)
        pos = kwargs.get("position_ids")
        if pos is not None:
            kwargs["position_ids"] = pos - fw.removed[:, None]
            return
        # No positions given: the unpruned model would number new tokens from the cache length.
        dev = fw.src_cols.device
        orig_seen = seen - fw.prompt_len + fw.orig_len
        kwargs["position_ids"] = orig_seen + torch.arange(n_new, device=dev)[None] - fw.removed[:, None]
