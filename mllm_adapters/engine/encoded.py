"""Images the family spec encodes itself (``FamilySpec.vision_loop = False``, Qwen2-VL): the pre-LLM
stage on each image's features, without access to the vision encoder's blocks.

Each image is pruned on its own (B = 1): ``ctx.features`` are its [1, n, Dv] features before the
projector in run order (Qwen: one per 2x2 merged unit), ``ctx.info.grid_hw`` its unit grid,
``ctx.pixel_values`` its [1, 3, H, W] pixels and ``ctx.project`` the family's projector. The blocks the
pruner declared in ``vision_probe_layers()`` are read from the probes the spec captured while encoding
(`mllm_adapters.engine.probes`: q/k/v, outputs, attention pooled to units with windows respected). There
is no CLS attention (methods needing it are refused when attached). An image whose run is within the
budget reaches the LLM whole. Part of `Engine` (a mixin).
"""

from __future__ import annotations

import dataclasses

import torch

from mllm_adapters.engine.layout import ImageRun
from mllm_adapters.engine.probes import VisionBlockProbe, feature_attention
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
                pixel_values=rgb[j][None],
                input_ids=ids,
                attention_mask=mask,
                image_start=start,
                cls_attention=_unavailable("CLS attention"),
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
