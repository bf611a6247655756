"""Images the family spec encodes itself (``FamilySpec.vision_loop = False``, Qwen2-VL): the pre-LLM
stage on each image's features, without access to the vision encoder's blocks.

Each image is pruned on its own (B = 1): ``ctx.features`` are its [1, n, Dv] features before the
projector in run order (Qwen: one per 2x2 merged unit), ``ctx.info.grid_hw`` its unit grid and
``ctx.project`` the family's projector. CLS attention, ViT hidden states and q/k/v are not available
(methods needing them are refused when attached). An image whose run is within the budget reaches the
LLM whole. Part of `Engine` (a mixin).
"""

from __future__ import annotations

import dataclasses

import torch

from mllm_adapters.engine.layout import ImageRun
from mllm_adapters.handle import BatchCounts, TokenCounts
from pruners.base import PreLLMContext, sample_generators


def _unavailable(what: str):
    def fail(*args, **kwargs):
        raise ValueError(f"{what} is not available for this model family (the engine does not run its vision "
                         "encoder block by block)")
    return fail


class EncodedImages:
    """The pre-LLM stage on spec-encoded image features."""

    def _encoded_pre_llm(self, kwargs, runs: list[ImageRun], input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> list[tuple]:
        layouts = [r.layout for r in runs]
        feats = self.spec.encode_images(kwargs, layouts)  # per image [n_i, Dv]
        pruner = self.pruner
        run_pre = "pre_llm" in pruner.stages and not pruner.keeps_all
        self.handle.token_counts = [TokenCounts(visual_in=lay.n_packed, views=lay.n_tiles, spec_encoded=True,
                                                feature_grids=[(r1 - r0, c1 - c0) for r0, r1, c0, c1 in lay.rects])
                                    for lay in layouts]  # the spec's encoder ran on every view's whole grid
        self.handle.batch_counts = BatchCounts()
        pixels = self.spec.image_pixels(kwargs, layouts) if run_pre else []
        out = []
        for j, (r, f) in enumerate(zip(runs, feats)):
            n = f.shape[0]
            every = torch.arange(n, device=f.device)
            no_extra = torch.zeros(n, dtype=torch.bool, device=f.device)
            if not run_pre or self._reaches_whole(r.layout):
                out.append((f, no_extra, every, None))
                continue
            ids, mask = input_ids[r.sample : r.sample + 1], attention_mask[r.sample : r.sample + 1]
            start = torch.tensor([r.start], device=ids.device)
            r0, r1, c0, c1 = r.layout.rects[0]
            info = dataclasses.replace(self.info, num_visual_tokens=n, grid_hw=(r1 - r0, c1 - c0))
            ctx = PreLLMContext(
                features=f[None],
                patch_index=every[None],
                info=info,
                pixel_values=pixels[j][None],
                input_ids=ids,
                attention_mask=mask,
                image_start=start,
                cls_attention=_unavailable("CLS attention"),
                vision_hidden=_unavailable("ViT hidden states"),
                vision_qkv=_unavailable("ViT q/k/v"),
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
