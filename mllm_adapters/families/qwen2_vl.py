"""Qwen2-VL (transformers' Qwen2VLForConditionalGeneration).

What runs: ``pre_llm`` methods on the merged units' features, reading the vision blocks they declare
through probes captured while the tower runs (`mllm_adapters.engine.probes`), and ``llm`` methods with
original positions. Refused with a ValueError naming the method: CLS-based methods (no CLS), the
vision stage, compact positions, video inputs. An image's run is its (gh/2) x (gw/2) units in raster
order; positions are M-RoPE, and every kept unit and text token keeps its unpruned position
(``pre_llm_positions = "original"``). Behaviour: README.md "Qwen2-VL and Qwen2.5-VL"; the model's
internals (patch order, M-RoPE, generate): docs/qwen-internals.md; the spec's shape: docs/engine.md.
Checked by `tests/test_qwen_family.py`, `tests/test_qwen_vision_probes.py` and the conformance suite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb, apply_rotary_pos_emb_vision

from mllm_adapters.engine.layout import ImageLayout
from mllm_adapters.engine.probes import ImageEncoding, VisionBlockProbe, segment_ids
from mllm_adapters.engine.spec import FamilySpec
from mllm_adapters.families._hf_parts import LlamaStyleDecoder, PixelsThroughGenerate
from mllm_adapters.registry import register_family
from pruners.base import ModelInfo, Pruner

#: Qwen2VLImageProcessor's default pixel bound (28 * 28 * 1280 px): the most units one image can have
#: unless a checkpoint's processor sets another ``max_pixels``.
DEFAULT_MAX_UNITS = 1280


def unit_layout(grid_thw: Sequence[int], merge: int) -> ImageLayout:
    """One view whose run is the image's (gh/merge) x (gw/merge) units in raster order."""
    t, gh, gw = (int(v) for v in grid_thw)
    if t != 1:
        raise ValueError(f"image grid {tuple(grid_thw)}: only still images (t=1) are supported")
    uh, uw = gh // merge, gw // merge
    side = max(uh, uw)
    src = (torch.arange(uh)[:, None] * side + torch.arange(uw)[None, :]).reshape(-1)
    return ImageLayout(side, ((0, uh, 0, uw),), src)


@register_family("qwen2_vl")
class Qwen2VLSpec(PixelsThroughGenerate, LlamaStyleDecoder, FamilySpec):
    """Qwen2-VL: ViT (fused qkv) + PatchMerger + Qwen2 decoder with M-RoPE."""

    model_classes = ("Qwen2VLForConditionalGeneration",)
    model_types = ("qwen2_vl",)
    tiny_builders = ("build_tiny_qwen2_vl", "tiny_qwen2_vl_config")
    forward_args = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "labels",
                    "use_cache", "pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw",
                    "mm_token_type_ids")
    size_dependent = True
    keeps_call_state = True  # rope_deltas lives on the model
    vision_loop = False
    pre_llm_positions = "original"
    compact_llm_positions = False
    prompt_aligned_inputs = ("mm_token_type_ids",)
    prompt_image = "<|vision_start|><|image_pad|><|vision_end|>"
    rope_fn = staticmethod(apply_rotary_pos_emb)  # Qwen2-VL's (M-RoPE mixed into cos/sin already)
    vision_rope_fn = staticmethod(apply_rotary_pos_emb_vision)
    vision_probes = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.visual = model.model.visual
        self.lm = model.model.language_model
        self.merge = int(self.config.vision_config.spatial_merge_size)

    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:
        return DEFAULT_MAX_UNITS

    @classmethod
    def view_grid(cls, config: Any) -> tuple[int, int]:
        raise NotImplementedError("Qwen2-VL views have no fixed grid: each image has its own")

    @classmethod
    def layout_for(cls, config: Any, image_size: tuple[int, int] | None) -> ImageLayout:
        raise NotImplementedError("Qwen2-VL layouts come from the processor's image_grid_thw")

    @classmethod
    def image_grids(cls, config: Any, inputs: dict[str, Any]) -> list[tuple[int, int]] | None:
        """Per image its merged-unit grid (rows, cols), from the processor's ``image_grid_thw``."""
        grid = inputs.get("image_grid_thw")
        if grid is None:
            return None
        merge = int(config.vision_config.spatial_merge_size)
        return [(int(h) // merge, int(w) // merge) for _, h, w in grid.tolist()]

    # ---- prefill FLOPs (what `benchmarks.flops` asks; two FLOPs per multiply-add, matmuls only) ----------
    @classmethod
    def vision_flops(cls, config: Any, counts: Any) -> int:
        """The vision tower on every image of one sample (`TokenCounts.feature_grids`: per image its
        rows x cols merged units, i.e. gh x gw = merge*rows x merge*cols patches), always in full: pre-LLM
        pruning acts on the tower's output. Per image of N = gh*gw patches `image_vision_flops`; when the
        engine had `encode_images` run it, the tower's blocks without its merger (the engine projects the
        units reaching the LLM, counted as the projector). The untouched model's merger is the projector."""
        if counts.vision:
            raise ValueError(f"{cls.model_classes[0]}: the vision tower never runs pruned (counts.vision must be None)")
        if counts.feature_grids is None:
            raise ValueError(f"{cls.model_classes[0]}: FLOPs need each image's grid (TokenCounts.feature_grids, "
                             "which the engine records); an image's size is not fixed by the config")
        grids = [(int(r), int(c)) for r, c in counts.feature_grids]
        return sum(cls.image_vision_flops(config, r, c) for r, c in grids)

    @classmethod
    def image_vision_flops(cls, config: Any, rows: int, cols: int) -> int:
        """The tower on one image of rows x cols merged units (N = merge**2 * rows * cols patches, width D):
        patch embedding (Conv3d, kernel C x T x P x P) 2 N C T P^2 D; per block fused qkv 6 N D^2, proj 2 N D^2,
        scores and values 4 D sum_s s^2 over the block's attention segments (`attention_segments`) and
        the MLP (`_vision_mlp_flops`). Rotary tables and norms are not matmuls."""
        v = config.vision_config
        m = int(v.spatial_merge_size)
        n = m * m * rows * cols
        d = cls._vision_width(config)
        p = int(v.patch_size)
        total = 2 * n * int(v.in_channels) * int(v.temporal_patch_size) * p * p * d  # patch embedding
        for segments in cls.attention_segments(config, rows, cols):
            total += 2 * n * d * 3 * d + 2 * n * d * d  # fused qkv, proj
            total += 2 * 2 * d * sum(s * s for s in segments)  # q k^T and p v per segment, all heads
            total += cls._vision_mlp_flops(config, n)
        return total

    @classmethod
    def attention_segments(cls, config: Any, rows: int, cols: int) -> list[list[int]]:
        """Per vision block, the patch counts of the segments its attention runs over for one image of
        rows x cols units (Qwen2-VL: the whole image in every block, ``cu_seqlens``)."""
        v = config.vision_config
        m = int(v.spatial_merge_size)
        return [[m * m * rows * cols] for _ in range(int(v.depth))]

    @classmethod
    def _vision_width(cls, config: Any) -> int:
        return int(config.vision_config.embed_dim)  # Qwen2-VL: hidden_size is the merger's output

    @classmethod
    def _vision_mlp_flops(cls, config: Any, n: int) -> int:
        """fc1 / fc2 (D -> mlp_ratio * D -> D) on n patches."""
        v = config.vision_config
        d = cls._vision_width(config)
        return 2 * 2 * n * d * int(d * float(v.mlp_ratio))

    @classmethod
    def projector_flops(cls, config: Any, n_tokens: int) -> int:
        """The PatchMerger on ``n_tokens`` units reaching the LLM: Linear(4D, 4D) and Linear(4D, D_text)
        (4 = merge**2 patches per unit), 2 n (16 D^2 + 4 D D_text)."""
        m = int(config.vision_config.spatial_merge_size)
        dm = cls._vision_width(config) * m * m
        dt = int(config.text_config.hidden_size)
        return 2 * int(n_tokens) * (dm * dm + dm * dt)

    def model_info(self) -> ModelInfo:
        vcfg = self.config.vision_config
        return self._model_info(
            grid_hw=(1, 1),  # per image: its own unit grid (ctx.info.grid_hw in the pre-LLM context)
            has_cls=False,
            vision_num_layers=int(vcfg.depth),
            vision_feature_layer=int(vcfg.depth) - 1,
            vision_num_heads=int(vcfg.num_heads),
        )

    def check_pruner(self, pruner: Pruner) -> None:
        if "vision" in pruner.stages:
            raise ValueError(f"method {pruner.name!r} prunes inside the vision encoder, which is not supported for "
                             f"{self.model_classes[0]}; supported stages: 'pre_llm' (on merged units) and 'llm'")

    # ---- images ------------------------------------------------------------------------------------
    def image_layouts(self, kwargs: dict[str, Any]) -> list[ImageLayout]:
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_grid_thw") is not None:
            raise ValueError(f"{self.model_classes[0]}: video inputs are not supported for pruning")
        grid = kwargs.get("image_grid_thw")
        if grid is None:
            raise ValueError(f"{self.model_classes[0]} needs image_grid_thw (from its processor) next to pixel_values")
        return [unit_layout(g, self.merge) for g in grid.tolist()]

    def _patches(self, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        grid = kwargs["image_grid_thw"]
        return list(torch.split(kwargs["pixel_values"], grid.prod(-1).tolist()))

    def image_pixels(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout]) -> list[torch.Tensor]:
        return self._patches(kwargs)  # per image its [gh*gw, C*T*P*P] patch rows

    def image_rgb(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout]) -> list[torch.Tensor]:
        """Per image its [C, gh*P, gw*P] normalised pixels, put back together from the processor's patch
        rows (unit-major, each row [C, T, P, P]; the first of the T copies of a still image)."""
        v, m = self.config.vision_config, self.merge
        c, t, p = int(v.in_channels), int(v.temporal_patch_size), int(v.patch_size)
        out = []
        for rows, (_, gh, gw) in zip(self._patches(kwargs), kwargs["image_grid_thw"].tolist()):
            x = rows.view(gh // m, gw // m, m, m, c, t, p, p)[..., 0, :, :]  # [uh, uw, m, m, C, P, P]
            out.append(x.permute(4, 0, 2, 5, 1, 3, 6).reshape(c, gh * p, gw * p))  # [C, H, W]
        return out

    def encode_images(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout],
                      probe_layers: Sequence[int] = ()) -> ImageEncoding:
        """Per image [n_units, 4 * Dv]: the merger's input, each unit's 4 patch states side by side, in
        raster order; and per image the probes of ``probe_layers`` (rows unit-major, raster order)."""
        grid = kwargs["image_grid_thw"]
        hs, captured = self._tower(kwargs["pixel_values"], grid, probe_layers)  # [N_patches, Dv], tower order
        order = self._raster_rows(grid)  # tower row of each raster row (unit-major: 4 rows = one unit)
        sizes = grid.prod(-1).tolist()
        dv = hs.shape[-1]
        features = [h.reshape(-1, self.merge**2 * dv) for h in torch.split(hs[order], sizes)]
        probes: list[dict[int, VisionBlockProbe]] = [{} for _ in sizes]
        for layer, probe in captured.items():
            whole = probe.rows(order)
            for j, rows in enumerate(torch.arange(hs.shape[0]).split(sizes)):
                probes[j][layer] = whole.rows(rows)
        return ImageEncoding(features, probes)

    def _raster_rows(self, grid: torch.Tensor) -> torch.Tensor:
        """[N_patches] the tower's row of each row in raster unit-major order (Qwen2-VL: the same)."""
        return torch.arange(int(grid.prod(-1).sum()))

    def _tower(self, pixel_values: torch.Tensor, grid: torch.Tensor,
               probe_layers: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, VisionBlockProbe]]:
        """The vision tower's blocks on every patch [N_patches, Dv], without its own PatchMerger pass (the
        engine projects only the units that reach the LLM, `project`): the merger's forward is bypassed
        for this call (the model is used by one thread at a time, `keeps_call_state`). Blocks in
        ``probe_layers`` are captured as they run (rows in the tower's order, all images)."""
        merger = self.visual.merger
        merger.forward = lambda x: x  # the tower's forward ends with the merger; its output is unused here
        seen: dict[int, dict[str, Any]] = {i: {} for i in probe_layers}
        hooks = []
        for i in probe_layers:
            block, cap = self.visual.blocks[i], seen[i]

            def on_attn(module, args, kwargs, cap=cap):
                cap["segments"] = kwargs["cu_seqlens"]
                cap["rope"] = kwargs["position_embeddings"]

            def on_qkv(module, args, output, cap=cap):
                cap["qkv"] = output

            def on_block(module, args, output, cap=cap):
                cap["hidden"] = output

            hooks += [block.attn.register_forward_pre_hook(on_attn, with_kwargs=True),
                      block.attn.qkv.register_forward_hook(on_qkv), block.register_forward_hook(on_block)]
        try:
            hs = self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid).last_hidden_state
        finally:
            del merger.forward
            for h in hooks:
                h.remove()
        return hs, {i: self._probe(i, cap) for i, cap in seen.items()}

    def _probe(self, i: int, cap: dict[str, Any]) -> VisionBlockProbe:
        """Block i's capture as a probe: q/k/v as its attention computes them (fused qkv, vision RoPE)."""
        attn = self.visual.blocks[i].attn
        qkv = cap["qkv"]
        n = qkv.shape[0]
        q, k, v = qkv.reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # each [n, H, Dh]
        cos, sin = cap["rope"]
        q, k = self.vision_rope_fn(q, k, cos, sin)
        return VisionBlockProbe(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cap["hidden"],
                                segment_ids(cap["segments"], n), float(attn.scaling))

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The PatchMerger on [.., n, 4 * Dv] unit features -> [.., n, Dt]."""
        lead = tokens.shape[:-1]
        dv = tokens.shape[-1] // self.merge**2
        return self.visual.merger(tokens.reshape(-1, dv)).reshape(*lead, -1)

    def feed_features(self, kwargs: dict[str, Any], features: list[torch.Tensor]) -> None:
        kwargs["pixel_values"] = None
        kwargs["image_grid_thw"] = None
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}

    def prompt_positions(self, kwargs: dict[str, Any], input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
        pos = kwargs.get("position_ids")
        if pos is not None:
            return pos  # generate's [4, B, L]: the text row and the three M-RoPE rows
        mm = kwargs.get("mm_token_type_ids")
        if mm is None:
            raise ValueError(f"{self.model_classes[0]} needs mm_token_type_ids (from its processor) for its M-RoPE "
                             "positions")
        pos, _ = self.model.model.get_rope_index(input_ids, mm, image_grid_thw=kwargs["image_grid_thw"],
                                                 attention_mask=attention_mask)
        return pos  # [3, B, L]

