"""Images of several views (tiles): per-view pruning and the assembly of each image's run.

Used for any batch whose layouts (`ImageLayout`) are not all one full view (LLaVA-NeXT: a base tile
plus anyres crops, with newline slots). Part of `Engine` (a mixin). The rules (docs/engine.md):

- ``budget`` = visual tokens per image reaching the LLM. ``ModelInfo.num_visual_tokens`` is the longest
  run any image can have (extra slots included), ``grid_hw`` the patch grid of ONE view. An image whose
  own run is at most ``budget`` tokens long reaches the LLM unchanged (extra slots included).
- ``handle.kept_indices`` are positions in the image's unpruned run (0 .. N_b - 1: view 0 first, then
  the others as the layout packs them, extra slots included), in the order the LLM sees them.
- ``pre_llm`` stage, per view: every pre-LLM method runs on each view separately, as if it were a
  single-view image: only the view's patches that reach the run are shown, as a rectangular grid
  (``ctx.info.grid_hw`` = that rectangle, ``ctx.patch_index`` its raster index, ``ctx.pixel_values``
  the matching pixels); CLS attention, ViT q/k/v and hidden states come from that view's own ViT
  pass, restricted to [CLS] + those patches; the prompt in the context holds a run of exactly that
  many placeholders. The image budget is split over its views in proportion to their shown patch
  counts (`split_budget`; a view whose share is 0 contributes nothing; adaptive methods that choose
  their own count run on every view with ``budget=None``). Kept tokens are put back in packed order;
  merged tokens with an anchor sit right after it, the others follow the image's kept tokens, view by
  view. Extra slots carry no vision feature, so a pruned image reaches the LLM without them. Random
  choices are seeded per view from (seed, view pixels).
- ``vision`` stage (FlowCut: tokens cut inside the ViT), per view: the views of the whole batch run
  through the ViT layers together as one batch. After each of the method's layers the pruner is called
  once per view (B = 1) with that view's share of the image budget, on [CLS] + its current patches that
  reach the run, with a state dict of its own. A view's patches outside the run stay in its sequence
  until its first cut, then leave it. Views keeping different counts are padded to the widest row and
  the padding is masked as keys, so each view computes as if alone. A view whose share covers it runs
  whole; a view whose share is 0 is not run at all. Families with several views refuse a method
  combining the vision stage with another (`FamilySpec.check_pruner`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from mllm_adapters.engine.layout import ImageLayout, ImageRun, split_budget
from mllm_adapters.engine.state import gather_seq
from mllm_adapters.handle import BatchCounts, TokenCounts
from pruners.base import PreLLMContext, Pruner, VisionLayerContext, sample_generators

#: per image: (vision-space tokens [n, Dv], extra-slot flags [n], packed index [n] (-1 merged), scores [n] | None)
ImageTokens = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass
class _VisionTile:
    """One view the vision stage runs through the ViT (a row of the batched tile sequence)."""

    image: int  # sample in the batch
    tile: int  # tile of that image (0 = base)
    row: int  # tile in the batch's [T, 3, S, S] pixel tensor
    in_view: torch.Tensor  # [side**2] bool: the tile's patches that survive unpadding
    view_rank: torch.Tensor  # [side**2] raster index of each view patch inside the view's rectangle
    pruner: Pruner | None  # the tile's pruner (its share of the budget), None when the tile stays whole
    state: dict[str, Any]  # the tile pruner's per-forward state (e.g. FlowCut's cumulative flow)


class MultiView:
    """Per-view pruning of multi-view images (see the module docstring)."""

    @property
    def _n2(self) -> int:
        """Patches of one view's grid."""
        h, w = self.info.grid_hw
        return h * w

    def _run_vit(
        self, tiles: torch.Tensor, probe: set[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """ViT on every tile up to the feature layer: (features [T, side**2, Dv], layer inputs, layer outputs)."""
        info = self.info
        hs = self.spec.embed(tiles)  # [T, 1+n2, Dv]
        layer_in: dict[int, torch.Tensor] = {}
        layer_out: dict[int, torch.Tensor] = {}
        for i in range(info.vision_feature_layer + 1):
            h_in = hs
            hs = self._run_vision_layer(i, hs, None, i in probe)
            if i in probe:
                layer_in[i], layer_out[i] = h_in, hs
        n_cls = hs.shape[1] - self._n2
        return hs[:, n_cls:], layer_in, layer_out

    def _views_vision_and_pre_llm(
        self,
        tiles: torch.Tensor,
        first_tile: list[int],
        runs: list[ImageRun],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Per image: (vision-space tokens [n, Dv], newline flags [n], packed index [n] (-1 merged), scores [n] | None)."""
        pruner, info = self.pruner, self.info
        run_pre = "pre_llm" in pruner.stages
        probe = set(pruner.vision_probe_layers()) if run_pre else set()
        feats, layer_in, layer_out = self._run_vit(tiles, probe)
        n2 = self._n2
        layouts = [r.layout for r in runs]
        per_layer = [feats.shape[1] + (1 if info.has_cls else 0)] * (info.vision_feature_layer + 1)
        self.handle.token_counts = [
            TokenCounts(visual_in=lay.n_packed, vision=[list(per_layer) for _ in range(lay.n_tiles)], views=lay.n_tiles)
            for lay in layouts
        ]
        self.handle.batch_counts = BatchCounts(vision_width=list(per_layer))
        gens = sample_generators(pruner.seed, tiles) if run_pre else []
        cls_cache: dict[int, torch.Tensor] = {}
        out = []
        for b, r in enumerate(runs):
            lay = r.layout
            t0 = first_tile[b]
            img_feats = feats[t0 : t0 + lay.n_tiles].reshape(-1, feats.shape[-1])  # [n_tiles*n2, Dv]
            if not run_pre or self._reaches_whole(lay):
                src = lay.src.to(feats.device)
                out.append((img_feats[src.clamp(min=0)], src < 0, torch.arange(lay.n_packed, device=feats.device), None))
                continue
            pidx = lay.packed_index().to(feats.device)

            def tile_context(t, m, tile_feats, slots, vp, r=r, lay=lay, t0=t0):
                tg = t0 + t
                return self._tile_context(
                    tg, lay.rects[t], vp.to(feats.device), tile_feats, tiles, layer_in, layer_out, cls_cache, gens[tg],
                    input_ids[r.sample : r.sample + 1], attention_mask[r.sample : r.sample + 1], r.start,
                    lay.n_packed, probe,
                )

            out.append(self._prune_views(
                lay, slots_of=lambda t, vp, pidx=pidx: pidx[t * n2 + vp.to(pidx.device)],
                feats_of=lambda t, vp, slots, t0=t0: feats[t0 + t : t0 + t + 1, vp.to(feats.device)],
                context_of=tile_context))
        self._fw.vision_qkv.clear()
        return out

    # ---- vision stage, per tile ------------------------------------------------------------------
    def _vision_plan(self, first_tile: list[int], layouts: list[ImageLayout], device: torch.device) -> list[_VisionTile]:
        """The tiles the ViT runs: every tile with packed patches, except those a pruned image gives no share."""
        n2 = self._n2
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

    def _views_vision_stage(
        self, tiles: torch.Tensor, first_tile: list[int], layouts: list[ImageLayout]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Vision-stage pruning per tile (see the module docstring); same per-image output as
        `_views_vision_and_pre_llm`. The tiles of the whole batch run through the ViT together, each row
        padded to the widest (padding masked as keys, so each tile computes as if alone)."""
        info = self.info
        n_cls = 1 if info.has_cls else 0
        dev = tiles.device
        plan = self._vision_plan(first_tile, layouts, dev)
        rows = torch.tensor([p.row for p in plan], dtype=torch.long, device=dev)
        hs = self.spec.embed(tiles[rows])  # [A, n_cls + side**2, Dv]
        # per tile: raster index (in its side x side grid) of each patch in its sequence; real ones first
        cur = [torch.arange(self._n2, device=dev) for _ in plan]
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
            hs = torch.cat([hs[:, :n_cls], gather_seq(hs[:, n_cls:], cols)], dim=1)  # [A, n_cls + W', Dv]
            cur = [c[s] for c, s in zip(cur, sel)]
            real = torch.arange(width, device=dev)[None] < lengths[:, None]  # [A, W']
            mask = None if bool(real.all()) else real
        self.handle.token_counts = [
            TokenCounts(visual_in=lay.n_packed, views=lay.n_tiles,
                        vision=[per_tile[a] for a, p in enumerate(plan) if p.image == b])  # the tiles that ran
            for b, lay in enumerate(layouts)
        ]
        # tokens per tile row the batch computed (the widest tile, padding included)
        self.handle.batch_counts = BatchCounts(vision_width=widths)
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
        n2 = self._n2
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

    def _prune_views(self, lay: ImageLayout, slots_of, feats_of, context_of) -> ImageTokens:
        """The pre-LLM stage of one pruned image of several views, view by view (the module docstring's
        rules), for both ways an image is encoded (ViT tiles here, spec-encoded views in `engine/encoded.py`).

        Per view t with a non-zero share: ``slots_of(t, vp)`` [m] the packed slot of each of its cells
        (``vp`` its view patches, rectangle raster order), ``feats_of(t, vp, slots)`` [1, m, D] their
        features, ``context_of(t, m, feats, slots, vp)`` the view's PreLLMContext (only called when the share
        is below m: a view within its share is kept whole). Kept tokens go back in packed order, a merged
        token right after its anchor (-1: before the view's first cell) or, without anchors, after every
        packed slot, view by view. Returns (tokens [n, D], extra flags [n] (none reach the LLM), packed index
        [n] (-1 merged), scores [n] | None)."""
        views, sizes, shares = self._tile_shares(lay)
        keys, toks, index, scores = [], [], [], []
        any_scores = False
        tail = 0  # running key for merged tokens without an anchor (after every packed slot)
        dev = None
        for t, (vp, k_t) in enumerate(zip(views, shares)):
            m = sizes[t]
            if m == 0 or k_t == 0:
                continue
            slots = slots_of(t, vp)  # [m]
            vf = feats_of(t, vp, slots)  # [1, m, D]
            dev = vf.device
            if k_t is not None and k_t >= m:
                keep, merged, anchor, sc = torch.arange(m, device=dev)[None], None, None, None
            else:
                decision = self._call_pruner(self._tile_pruner(k_t, lay.rects[t]).prune_pre_llm,
                                             context_of(t, m, vf, slots, vp))
                self.handle.info.update(decision.info)
                keep, merged, anchor, sc = decision.keep, decision.merged, decision.merged_anchor, decision.scores
            k = keep.shape[1]
            packed = slots[keep[0]]  # [k]
            keys.append(packed * 2)
            toks.append(vf[0, keep[0]])
            index.append(packed)
            any_scores = any_scores or sc is not None
            scores.append(sc[0, :k].float() if sc is not None else torch.zeros(k, device=dev))
            if merged is not None and merged.shape[1]:
                nm = merged.shape[1]
                if anchor is not None:  # after its anchor; -1: before the view's first cell
                    a = anchor[0]
                    keys.append(torch.where(a >= 0, slots[a.clamp(min=0)] * 2 + 1, slots.min() * 2 - 1))
                else:
                    keys.append(2 * lay.n_packed + tail + torch.arange(nm, device=dev))
                    tail += nm
                toks.append(merged[0].to(vf.dtype))
                index.append(torch.full((nm,), -1, dtype=torch.long, device=dev))
                scores.append(sc[0, k:].float() if sc is not None else torch.zeros(nm, device=dev))
        order = torch.cat(keys).argsort(stable=True)
        tok = torch.cat(toks)[order]
        return (tok, torch.zeros(tok.shape[0], dtype=torch.bool, device=tok.device), torch.cat(index)[order],
                torch.cat(scores)[order] if any_scores else None)

    def _reaches_whole(self, lay: ImageLayout) -> bool:
        """True when the image's packed run is within the budget: it reaches the LLM unpruned."""
        return not self.pruner.chooses_budget and self.pruner.budget_for(lay.n_packed) >= lay.n_packed

    def _tile_shares(self, lay: ImageLayout) -> tuple[list[torch.Tensor], list[int], list[int | None]]:
        """Per tile of a pruned image: its view patches (`ImageLayout.view_patches`), their count, and its
        share of the budget (`split_budget` by view size; None for methods that choose their own count)."""
        views = [lay.view_patches(t) for t in range(lay.n_tiles)]
        sizes = [int(v.numel()) for v in views]
        shares = ([None] * lay.n_tiles if self.pruner.chooses_budget
                  else split_budget(self.pruner.budget_for(lay.n_packed), sizes))
        return views, sizes, shares

    def _tile_pruner(self, budget: int | None, rect: tuple[int, int, int, int] | None) -> Pruner:
        """A copy of the pruner (same parameters and seed) with an int ``budget``, attached to one tile
        view's ModelInfo (``rect`` None: the model's own, for the in-LLM stage)."""
        key = (budget, None) if rect is None else (budget, rect[1] - rect[0], rect[3] - rect[2])
        if key not in self._tile_pruners:
            p = self.pruner
            clone = type(p)(budget=budget, seed=p.seed, **p.params)
            if rect is None:
                clone.attach(self.info)
            else:
                r0, r1, c0, c1 = rect
                clone.attach(dataclasses.replace(self.info, num_visual_tokens=(r1 - r0) * (c1 - c0),
                                                 grid_hw=(r1 - r0, c1 - c0)))
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
        view_ids = torch.cat([ids[:, :start], ids.new_full((1, m), self.spec.image_token_id),
                              ids[:, start + n_packed :]], dim=1)
        view_mask = torch.cat([mask[:, :start], mask.new_ones((1, m)), mask[:, start + n_packed :]], dim=1)
        image_start = torch.tensor([start], device=ids.device)
        r0, r1, c0, c1 = rect
        ps = tiles.shape[-1] // self.info.grid_hw[0]  # pixels per patch
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
            project=self.spec.project,
            text_embeddings=lambda: self.spec.embed_tokens(view_ids),
            question_texts=lambda: self._question_texts(view_ids, view_mask, [start + m]),
            generators=[gen],
            state={},
            vision_post_norm=self.spec.vision_post_norm(),
            text_patch_similarity=lambda folder, prepare=None: self._text_patch_similarity(
                folder, tile_feats, lambda: self._question_texts(view_ids, view_mask, [start + m]), prepare),
        )
