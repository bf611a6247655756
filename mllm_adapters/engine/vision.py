"""The vision-block loop: the ViT run block by block, vision-stage pruning between blocks, q/k/v and
CLS attention for pruners, and the pre-LLM stage of a uniform batch (every image one view).

Part of `Engine` (a mixin: ``self.spec``, ``self.pruner``, ``self.info``, ``self.handle``, ``self._fw``).
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from mllm_adapters.engine.state import gather_seq
from mllm_adapters.handle import BatchCounts, TokenCounts
from pruners.base import PreLLMContext, VisionLayerContext
from pruners.ops import attention_rows


class VisionLoop:
    """ViT blocks run by the engine, with the hooks pruners read from."""

    def _vision_and_pre_llm(self, pixel_values, input_ids, attention_mask, image_start):
        """Run the ViT up to the feature layer (vision-stage pruning between layers), then the pre-LLM pruner,
        on a batch of single-view images.

        Returns (features [B, n, Dv], patch_index [B, n], merged [B, m, Dv] | None, anchor [B, m] | None,
        scores [B, n + m] | None).
        """
        info, pruner = self.info, self.pruner
        hs = self.spec.embed(pixel_values)
        B, T, _ = hs.shape
        n_cls = T - info.num_visual_tokens
        patch_index = torch.arange(info.num_visual_tokens, device=hs.device).expand(B, -1)
        probe = set(pruner.vision_probe_layers()) if pruner.stages else set()
        layer_in: dict[int, torch.Tensor] = {}
        layer_out: dict[int, torch.Tensor] = {}
        vision_counts = []
        per_sample: list[list[int]] | None = None  # per-sample counts once a vision pruner goes ragged
        patch_mask: torch.Tensor | None = None  # [B, N] True = real patch (None: all real)
        layer_mask: dict[int, torch.Tensor | None] = {}
        prune_vision = "vision" in pruner.stages and not pruner.keeps_all
        capture = probe | (set(self._vision_layers) if prune_vision else set())
        for i in range(info.vision_feature_layer + 1):
            vision_counts.append(hs.shape[1])
            if per_sample is not None:
                real = (n_cls + patch_mask.sum(1)).tolist() if patch_mask is not None else [hs.shape[1]] * B
                for b in range(B):
                    per_sample[b].append(int(real[b]))
            h_in = hs
            key_mask = None if patch_mask is None else torch.cat(
                [torch.ones(B, n_cls, dtype=torch.bool, device=hs.device), patch_mask], dim=1)  # [B, T]
            hs = self._run_vision_layer(i, hs, self._vision_additive_mask(key_mask, hs.dtype), i in capture)
            if i in probe:
                layer_in[i], layer_out[i], layer_mask[i] = h_in, hs, key_mask
            if prune_vision and i in self._vision_layers:
                ctx = VisionLayerContext(
                    layer=i,
                    hidden_states=hs,
                    patch_index=patch_index,
                    info=info,
                    state=self._fw.pruner_state,
                    cls_attention=(lambda i=i, h=h_in, m=key_mask: self._cls_attention(i, h, m)),
                    qkv=(lambda i=i, h=h_in: self._vision_qkv(i, h)),
                    generators=self._fw.generators,
                    patch_mask=patch_mask,
                )
                keep = self._call_pruner(pruner.prune_vision, ctx)
                if i not in probe:
                    self._fw.vision_qkv.pop(i, None)
                if keep is not None:
                    # Raster order; -1 entries (a sample keeping fewer tokens) sort last and become padding.
                    valid = keep >= 0
                    order = torch.where(valid, keep, keep.new_full((), hs.shape[1]) + 1).argsort(dim=1, stable=True)
                    keep, valid = keep.gather(1, order).clamp(min=0), valid.gather(1, order)
                    hs = torch.cat([hs[:, :n_cls], gather_seq(hs[:, n_cls:], keep)], dim=1)
                    patch_index = patch_index.gather(1, keep)
                    patch_mask = None if bool(valid.all()) else valid
                    if patch_mask is not None and per_sample is None:
                        per_sample = [list(vision_counts) for _ in range(B)]
        reference = [[vision_counts[0]] * len(vision_counts)]  # the keep-all run: every layer on the full view
        self.handle.token_counts = [
            TokenCounts(visual_in=info.num_visual_tokens, reference_vision=reference,
                        vision=[list(per_sample[b] if per_sample is not None else vision_counts)])
            for b in range(B)
        ]
        self.handle.batch_counts = BatchCounts(vision_width=vision_counts)  # the padded lengths computed
        if patch_mask is not None:
            raise ValueError(
                f"vision-stage method {pruner.name!r} left samples with different patch counts at the feature "
                f"layer ({patch_mask.sum(1).tolist()}); every sample must reach the same count"
            )
        features = hs[:, n_cls:]
        merged = anchor = scores = None
        if "pre_llm" in pruner.stages and not pruner.keeps_all:

            def need(i: int) -> int:
                return self._probed_layer(i, layer_in, probe)

            ctx = PreLLMContext(
                features=features,
                patch_index=patch_index,
                info=info,
                pixel_values=pixel_values,
                input_ids=input_ids,
                attention_mask=attention_mask,
                image_start=image_start,
                cls_attention=lambda i: self._cls_attention(need(i), layer_in[need(i)], layer_mask[need(i)]),
                vision_hidden=lambda i: layer_out[need(i)],
                vision_qkv=lambda i: self._vision_qkv(need(i), layer_in[need(i)]),
                project=self.spec.project,
                text_embeddings=lambda: self.spec.embed_tokens(input_ids),
                question_texts=lambda: self._question_texts(input_ids, attention_mask,
                                                            image_start + info.num_visual_tokens),
                generators=self._fw.generators,
                state=self._fw.pruner_state,
                vision_post_norm=self.spec.vision_post_norm(),
                text_patch_similarity=lambda folder, prepare=None, _x=features: self._text_patch_similarity(
                    folder, _x, lambda: self._question_texts(input_ids, attention_mask, image_start + info.num_visual_tokens),
                    prepare),
            )
            decision = self._call_pruner(pruner.prune_pre_llm, ctx)
            keep, order = decision.keep.sort(dim=1)
            if decision.scores is not None:
                k = keep.shape[1]
                scores = torch.cat([decision.scores[:, :k].gather(1, order), decision.scores[:, k:]], dim=1)
            if decision.merged_anchor is not None:  # -1: before every patch
                a = decision.merged_anchor
                anchor = torch.where(a >= 0, patch_index.gather(1, a.clamp(min=0)), torch.full_like(a, -1))
            features, patch_index = gather_seq(features, keep), patch_index.gather(1, keep)
            merged = decision.merged
            self.handle.info.update(decision.info)
        self._fw.vision_qkv.clear()  # do not hold ViT q/k/v through decoding
        return features, patch_index, merged, anchor, scores

    @staticmethod
    def _assemble(features, patch_index, merged, anchor, scores):
        """Tokens for the LLM, their grid index (-1 for merged tokens) and scores, in raster order."""
        if merged is None or merged.shape[1] == 0:
            return features, patch_index, scores
        fill = torch.full(merged.shape[:2], -1, dtype=torch.long, device=merged.device)
        tokens = torch.cat([features, merged.to(features.dtype)], dim=1)
        index = torch.cat([patch_index, fill], dim=1)
        if anchor is not None:
            # Sort by (grid position, merged-after-kept): a recycled token sits at its anchor.
            key = torch.cat([patch_index * 2, anchor * 2 + 1], dim=1)
            order = key.argsort(dim=1, stable=True)
            tokens, index = gather_seq(tokens, order), index.gather(1, order)
            scores = scores.gather(1, order) if scores is not None else None
        return tokens, index, scores

    def _probed_layer(self, i: int, layer_in: dict, probe) -> int:
        """ViT layer ``i`` (negative counts from the end) if the pruner declared it in
        ``vision_probe_layers()``; a ValueError naming the method otherwise."""
        i = i % self.info.vision_num_layers
        if i not in layer_in:
            raise ValueError(
                f"method {self.pruner.name!r} asked for ViT layer {i} but declared vision_probe_layers()="
                f"{sorted(probe)}; declare every layer it reads"
            )
        return i

    def _run_vision_layer(self, i: int, hs: torch.Tensor, mask: torch.Tensor | None, capture: bool) -> torch.Tensor:
        """Run ViT layer i; with ``capture``, keep the q/k/v its own attention computed (forward hooks on
        the projections), so pruners read them without recomputing three projections per layer."""
        if not capture:
            return self.spec.run_vision_block(i, hs, mask)
        parts, out = self.spec.vision_attention(i), {}
        mods = {"q": parts.q, "k": parts.k, "v": parts.v}
        me = threading.get_ident()  # the modules are shared: keep only this thread's projections

        def grab(name: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                if threading.get_ident() == me:
                    out[name] = output
            return hook

        hooks = [m.register_forward_hook(grab(n)) for n, m in mods.items()]
        try:
            hs_out = self.spec.run_vision_block(i, hs, mask)
        finally:
            for h in hooks:
                h.remove()
        B, T, _ = hs.shape
        self._fw.vision_qkv[i] = tuple(out[n].view(B, T, -1, parts.head_dim).transpose(1, 2) for n in mods)
        return hs_out

    def _vision_qkv(self, i: int, h_in: torch.Tensor):
        """(q, k, v) [B, H, T, Dh] of ViT layer i (captured during its forward, else recomputed from its input)."""
        cached = self._fw.vision_qkv.get(i)
        if cached is not None and cached[0].shape[2] == h_in.shape[1]:
            return cached
        parts = self.spec.vision_attention(i)
        x = parts.norm(h_in)
        B, T, _ = x.shape
        shape = (B, T, -1, parts.head_dim)
        q = parts.q(x).view(shape).transpose(1, 2)
        k = parts.k(x).view(shape).transpose(1, 2)
        v = parts.v(x).view(shape).transpose(1, 2)
        return q, k, v

    def _cls_attention(self, i: int, h_in: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N] head-mean softmax attention of the CLS query over all (real) keys, patch columns only."""
        if not self.info.has_cls:
            raise ValueError("this model's vision encoder has no [CLS] token")
        q, k, _ = self._vision_qkv(i, h_in)
        rows = attention_rows(q[:, :, :1], k, key_mask=key_mask, scale=self.spec.vision_attention(i).scale)  # [B, 1, T]
        return rows[:, 0, 1:]

    @staticmethod
    def _vision_additive_mask(key_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """[B, 1, 1, T] additive ViT attention mask hiding padded keys (None when every key is real)."""
        if key_mask is None:
            return None
        neg = torch.finfo(dtype).min
        return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill(~key_mask, neg)[:, None, None]
