"""Qwen2.5-VL (transformers' Qwen2_5_VLForConditionalGeneration): Qwen2-VL's layout, positions and
supported methods (`mllm_adapters.families.qwen2_vl`); its ViT attends within windows in most blocks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from mllm_adapters.engine.layout import ImageLayout
from mllm_adapters.families.qwen2_vl import Qwen2VLSpec
from mllm_adapters.registry import register_family
from pruners.base import ModelInfo


@register_family("qwen2_5_vl")
class Qwen2_5_VLSpec(Qwen2VLSpec):
    """Qwen2.5-VL: Qwen2-VL's layout and positions; its ViT attends within windows in most blocks and
    hands the merger its units in window order, which `encode_images` puts back in raster order."""

    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)
    tiny_builders = ("build_tiny_qwen2_5_vl", "tiny_qwen2_5_vl_config")

    def encode_images(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout]) -> list[torch.Tensor]:
        from transformers.vision_utils import get_vision_window_index

        grid = kwargs["image_grid_thw"]
        v = self.visual
        out = v(kwargs["pixel_values"].type(v.dtype), grid_thw=grid)
        window_index, _ = get_vision_window_index(grid, spatial_merge_size=v.spatial_merge_size,
                                                  window_size=v.window_size, patch_size=v.patch_size)
        hs = out.last_hidden_state  # [N_patches, Dv] in window order, 4 consecutive rows = one unit
        dv = hs.shape[-1]
        units = hs.reshape(-1, self.merge**2 * dv)[torch.argsort(window_index)]  # [N_units, 4 * Dv], raster
        return list(torch.split(units, (grid.prod(-1) // self.merge**2).tolist()))

    def model_info(self) -> ModelInfo:
        vcfg = self.config.vision_config
        return dataclasses.replace(super().model_info(), family=self.name,
                                   vision_num_layers=int(vcfg.depth), vision_feature_layer=int(vcfg.depth) - 1)
