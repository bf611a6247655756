"""Images the family spec encodes itself (``FamilySpec.vision_loop = False``, Qwen2-VL): the pre-LLM
stage on each image's features, without access to the vision encoder's blocks.

Each image is pruned on its own (B = 1): ``ctx.features`` are its [1, n, Dv] features before the
projector in run order (Qwen: one per 2x2 merged unit), ``ctx.info.grid_hw`` its unit grid,
``ctx.pixel_values`` its [1, 3, H, W] pixels and ``ctx.project`` the family's projector. The blocks the
pruner declared in ``vision_probe_layers()`` are read from the probes the spec captured while encoding
(`mllm_adapters.engine.probes`: q/k/v, outputs, attention pooled to units with windows respected). CLS
attention exists only where the probes carry [CLS] rows (InternVL: ``n_cls = 1`` per tile), pooled to
feature tokens as the spec declares (`FamilySpec.cls_unit_reduce`); elsewhere methods needing it are
refused when attached. An image whose run is within the budget reaches the LLM whole. An image of several
views or with extra slots (LLaVA-OneVision: base tile and resized canvas, newlines) is pruned view by
view with the rules of `engine/views.py` (`_encoded_views`); the spec's `view_rgb` gives each view's
pixels, and its probes' rows are the run's non-extra slots in order. Part of `Engine` (a mixin).
"""

from __future__ import annotations

import dataclasses

import torch

from mllm_adapters.engine.layout import ImageRun
from mllm_adapters.engine.probes import VisionBlockProbe, cls_feature_attention, feature_attention
from mllm_adapters.handle import BatchCounts, TokenCounts
from pruners.base import PreLLMContext, sample_generators


def _unavailable(what: str):
    def fail(*args, **kwargs):
        raise ValueError(f"{what} is not available for this model family (its vision encoder has no [CLS] token)")
    return fail


class EncodedImages:
    """The pre-LLM stage on spec-encoded image features."""

    def _probe_of(self, probes: dict[int, VisionBlockProbe], layer: int) -> VisionBlockProbe:
        """The probe of ViT block ``layer`` (negative counts from the end), which the pruner must have
        declared in ``vision_probe_layers()``."""
        i = layer % self.info.vision_num_layers
        if i not in probes:
            declared = sorted(self.pruner.vision_probe_layers())
            raise ValueError(f"method {self.pruner.name!r} asked for ViT layer {i} but declared "
                             f"vision_probe_layers()={declared}; declare every layer it reads")
        return probes[i]

    def _encoded_pre_llm(self, kwargs, runs: list[ImageRun], input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> list[tuple]:
        layouts = [r.layout for r in runs]
        pruner = self.pruner
        run_pre = "pre_llm" in pruner.stages and not pruner.keeps_all
        probe = sorted({i % self.info.vision_num_layers for i in pruner.vision_probe_layers()}) if run_pre else []
        encoding = self.spec.encode_images(kwargs, layouts, probe)
        feats = encoding.features  # per image [n_i, Dv]
        self.handle.token_counts = [TokenCounts(visual_in=lay.n_packed, views=lay.n_tiles, spec_encoded=True,
                                                feature_grids=[(r1 - r0, c1 - c0) for r0, r1, c0, c1 in lay.rects])
                                    for lay in layouts]  # the spec's encoder ran on every view's whole grid
        self.handle.batch_counts = BatchCounts()
        pixels = self.spec.image_pixels(kwargs, layouts) if run_pre else []
        rgb = self.spec.image_rgb(kwargs, layouts) if run_pre else []
        multi = [lay.n_tiles > 1 or bool((lay.src < 0).any()) for lay in layouts]
        view_rgb = self.spec.view_rgb(kwargs, layouts) if run_pre and any(multi) else []
        out = []
        for j, (r, f) in enumerate(zip(runs, feats)):
            n = f.shape[0]
            every = torch.arange(n, device=f.device)
            no_extra = torch.zeros(n, dtype=torch.bool, device=f.device)
            if not run_pre or self._reaches_whole(r.layout):
                out.append((f, no_extra, every, None))
                continue
            if multi[j]:  # several views or extra slots: per view, as `engine/views.py` (LLaVA-OneVision)
                own = encoding.view_probes[j] if encoding.view_probes is not None else None
                out.append(self._encoded_views(r, f, encoding.probes[j], view_rgb[j], input_ids, attention_mask,
                                               own))
                continue
            ids, mask = input_ids[r.sample : r.sample + 1], attention_mask[r.sample : r.sample + 1]
            start = torch.tensor([r.start], device=ids.device)
            r0, r1, c0, c1 = r.layout.rects[0]
            info = dataclasses.replace(self.info, num_visual_tokens=n, grid_hw=(r1 - r0, c1 - c0))
            ctx = PreLLMContext(
                features=f[None],
                patch_index=every[None],
                info=info,
                pixel_values=rgb[j][None],
                input_ids=ids,
                attention_mask=mask,
                image_start=start,
                cls_attention=self._encoded_cls(encoding.probes[j], n),
                vision_hidden=lambda i, p=encoding.probes[j]: self._probe_of(p, i).hidden[None],
                vision_qkv=lambda i, p=encoding.probes[j]: tuple(x[None] for x in self._probe_of(p, i).qkv),
                vision_attention=lambda i, p=encoding.probes[j], n=n: feature_attention(self._probe_of(p, i), n)[None],
                project=self.spec.project,
                text_embeddings=lambda ids=ids: self.spec.embed_tokens(ids),
                question_texts=lambda ids=ids, mask=mask, a=r.start + n: self._question_texts(ids, mask, [a]),
                generators=sample_generators(pruner.seed, pixels[j][None]),
                state={},
                vision_post_norm=None,
            )
            image_pruner = self._tile_pruner(pruner.budget_for(r.n_packed), r.layout.rects[0])
            decision = self._call_pruner(image_pruner.prune_pre_llm, ctx)
            self.handle.info.update(decision.info)
            keep, order = decision.keep[0].sort()
            tok, index = f[keep], keep
            scores = None
            if decision.scores is not None:
                k = keep.shape[0]
                scores = torch.cat([decision.scores[0, :k][order], decision.scores[0, k:]]).float()
            if decision.merged is not None and decision.merged.shape[1]:
                m = decision.merged[0].to(f.dtype)
                tok = torch.cat([tok, m])
                index = torch.cat([index, index.new_full((m.shape[0],), -1)])
            out.append((tok, torch.zeros(tok.shape[0], dtype=torch.bool, device=f.device), index, scores))
        return out

    def _encoded_cls(self, probes: dict[int, VisionBlockProbe], n: int):
        """``cls_attention(layer)`` [1, n] of a spec-encoded image or view: its probe's [CLS] row pooled to the
        n feature tokens by the spec's `FamilySpec.cls_unit_reduce`; unavailable without a [CLS] token."""
        reduce = self.spec.cls_unit_reduce
        if not self.info.has_cls or reduce is None:
            return _unavailable("CLS attention")
        return lambda i: cls_feature_attention(self._probe_of(probes, i), n, reduce)[None]

    def _encoded_views(self, r: ImageRun, f: torch.Tensor, probes: dict[int, VisionBlockProbe],
                       rgb: list[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       own: list[dict[int, VisionBlockProbe]] | None = None) -> tuple:
        """The pre-LLM stage of one spec-encoded image of several views or with extra slots, view by view
        with the rules of `engine/views.py`: the image budget split over the views by size, each view's
        pruner (B = 1) on the view's features [1, m, D] in its rectangle's raster order (``grid_hw`` that
        rectangle, ``pixel_values`` the view's pixels, the prompt with a run of exactly m placeholders),
        ViT signals from the image's probes restricted to the view's rows (the probes' rows are the run's
        non-extra slots in order). Kept tokens go back in packed order, merged ones after their anchor (or
        after the image's kept tokens); extra slots do not reach the LLM. Returns (tokens [n, D], extra flags
        [n], packed index [n] (-1 merged), scores [n] | None)."""
        lay, dev = r.layout, f.device
        pidx = lay.packed_index().to(dev)
        row_of_slot = torch.cumsum((lay.src >= 0).long(), 0).to(dev) - 1  # [N] probe row of each real slot
        S2 = lay.side**2
        ids, mask = input_ids[r.sample : r.sample + 1], attention_mask[r.sample : r.sample + 1]
        return self._prune_views(
            lay, slots_of=lambda t, vp: pidx[t * S2 + vp.to(dev)],  # rectangle raster order
            feats_of=lambda t, vp, slots: f[slots][None],
            context_of=lambda t, m, vf, slots, vp: self._encoded_view_context(
                r, t, m, vf, slots, row_of_slot, probes, rgb[t], ids, mask, None if own is None else own[t]))

    def _encoded_view_context(self, r: ImageRun, t: int, m: int, vf: torch.Tensor, slots: torch.Tensor,
                              row_of_slot: torch.Tensor, probes: dict[int, VisionBlockProbe], rgb: torch.Tensor,
                              ids: torch.Tensor, mask: torch.Tensor,
                              own: dict[int, VisionBlockProbe] | None = None) -> PreLLMContext:
        """PreLLMContext of view ``t`` of a spec-encoded image (see `_encoded_views`); ``own``: the view's own
        probes (`ImageEncoding.view_probes`), else the image's restricted to the view's rows."""
        if own is not None:
            view_probes = own
        else:
            rows = row_of_slot[slots]  # [m] probe rows of the view's cells
            view_probes = {i: p.rows(rows.to(p.q.device)) for i, p in probes.items()}
        start, n_packed = r.start, r.n_packed
        view_ids = torch.cat([ids[:, :start], ids.new_full((1, m), self.spec.image_token_id),
                              ids[:, start + n_packed :]], dim=1)
        view_mask = torch.cat([mask[:, :start], mask.new_ones((1, m)), mask[:, start + n_packed :]], dim=1)
        r0, r1, c0, c1 = r.layout.rects[t]
        info = dataclasses.replace(self.info, num_visual_tokens=m, grid_hw=(r1 - r0, c1 - c0))
        return PreLLMContext(
            features=vf,
            patch_index=torch.arange(m, device=vf.device)[None],
            info=info,
            pixel_values=rgb[None],
            input_ids=view_ids,
            attention_mask=view_mask,
            image_start=torch.tensor([start], device=ids.device),
            cls_attention=self._encoded_cls(view_probes, m),
            vision_hidden=lambda i, p=view_probes: self._probe_of(p, i).hidden[None],
            vision_qkv=lambda i, p=view_probes: tuple(x[None] for x in self._probe_of(p, i).qkv),
            vision_attention=lambda i, p=view_probes: feature_attention(self._probe_of(p, i), m)[None],
            project=self.spec.project,
            text_embeddings=lambda: self.spec.embed_tokens(view_ids),
            question_texts=lambda: self._question_texts(view_ids, view_mask, [start + m]),
            generators=sample_generators(self.pruner.seed, rgb[None]),
            state={},
            vision_post_norm=None,
        )
