"""Qwen2.5-VL (transformers' Qwen2_5_VLForConditionalGeneration): Qwen2-VL's layout, positions and
supported methods (`mllm_adapters.families.qwen2_vl`); its ViT attends within windows in most blocks."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mllm_adapters.families.qwen2_vl import Qwen2VLSpec
from mllm_adapters.registry import register_family
from pruners.base import ModelInfo


@register_family("qwen2_5_vl")
class Qwen2_5_VLSpec(Qwen2VLSpec):
    """Qwen2.5-VL: Qwen2-VL's layout and positions; its ViT attends within windows in most blocks and
    hands the merger its units in window order, which `encode_images` puts back in raster order
    (`_raster_rows`)."""

    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)
    tiny_builders = ("build_tiny_qwen2_5_vl", "tiny_qwen2_5_vl_config")

    # ---- prefill FLOPs (the rest as Qwen2-VL's) -----------------------------------------------------------
    @classmethod
    def attention_segments(cls, config: Any, rows: int, cols: int) -> list[list[int]]:
        """Per vision block, the patch counts of its attention segments for one image of rows x cols units:
        the whole image in ``fullatt_block_indexes``, its windows (``cu_window_seqlens`` of
        `transformers.vision_utils.get_vision_window_index`: window_size px squares, the edge ones
        partial) in every other block."""
        from transformers.vision_utils import get_vision_window_index

        v = config.vision_config
        m = int(v.spatial_merge_size)
        grid = torch.tensor([[1, m * rows, m * cols]])
        _, cu = get_vision_window_index(grid, spatial_merge_size=m, window_size=int(v.window_size),
                                        patch_size=int(v.patch_size))
        windows = [int(s) for s in (cu[1:] - cu[:-1]).tolist()]
        full = {int(i) for i in v.fullatt_block_indexes}  # as the tower tests it: ``layer_num in ...``
        return [[m * m * rows * cols] if i in full else windows for i in range(int(v.depth))]

    @classmethod
    def _vision_width(cls, config: Any) -> int:
        return int(config.vision_config.hidden_size)  # Qwen2.5-VL: out_hidden_size is the merger's output

    @classmethod
    def _vision_mlp_flops(cls, config: Any, n: int) -> int:
        """SwiGLU gate / up / down (D -> intermediate_size -> D) on n patches."""
        v = config.vision_config
        return 3 * 2 * n * cls._vision_width(config) * int(v.intermediate_size)

    def _raster_rows(self, grid: torch.Tensor) -> torch.Tensor:
        """The tower runs its patches in window order (whole units moved, 4 rows each): the tower's row
        of each raster unit-major row."""
        from transformers.vision_utils import get_vision_window_index

        v, g = self.visual, self.merge**2
        window_index, _ = get_vision_window_index(grid, spatial_merge_size=v.spatial_merge_size,
                                                  window_size=v.window_size, patch_size=v.patch_size)
        unit_rows = torch.argsort(window_index)  # tower unit of each raster unit
        return (unit_rows[:, None] * g + torch.arange(g)).reshape(-1)

    def model_info(self) -> ModelInfo:
        vcfg = self.config.vision_config
        return dataclasses.replace(super().model_info(), family=self.name,
                                   vision_num_layers=int(vcfg.depth), vision_feature_layer=int(vcfg.depth) - 1)
