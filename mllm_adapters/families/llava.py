"""LLaVA-1.5 (transformers' LlavaForConditionalGeneration): CLIP ViT + two-layer projector + Llama.

An image is one view (a side x side patch grid plus CLS); the LLM sees its feature-layer patches in
raster order as one run of side**2 placeholders. Positions are 1-D RoPE (``[B, L]``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mllm_adapters.engine.layout import ImageLayout
from mllm_adapters.engine.spec import AttentionParts, FamilySpec
from mllm_adapters.families._hf_parts import LlamaStyleDecoder, PixelsThroughGenerate
from mllm_adapters.registry import register_family
from pruners.base import ModelInfo


def _side(config: Any) -> int:
    return int(config.vision_config.image_size) // int(config.vision_config.patch_size)


@register_family("llava")
class LlavaSpec(PixelsThroughGenerate, LlamaStyleDecoder, FamilySpec):
    """CLIP-style tower (``embeddings`` + ``encoder.layers``), ``multi_modal_projector``, Llama decoder."""

    model_classes = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)
    tiny_builders = ("build_tiny_llava", "tiny_llava_config")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        core = model.model
        self.vision_tower = core.vision_tower
        self.projector = core.multi_modal_projector
        self.lm = core.language_model

    # ---- config-level facts ---------------------------------------------------------------------
    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:
        return _side(config) ** 2

    @classmethod
    def view_grid(cls, config: Any) -> tuple[int, int]:
        return _side(config), _side(config)

    @classmethod
    def layout_for(cls, config: Any, image_size: tuple[int, int] | None) -> ImageLayout:
        return ImageLayout.single_view(_side(config))  # the processor resizes every image to one view

    # ---- model facts ------------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        vcfg = self.config.vision_config
        vt = self.vision_tower
        if not hasattr(vt, "encoder") or not hasattr(vt, "embeddings"):
            raise TypeError(f"the {self.name} family supports CLIP-style vision towers (embeddings + "
                            f"encoder.layers); got {type(vt).__name__}")
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer must be a single int for pruning, got {layer!r}")
        strategy = self.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported; accepted: 'default'")
        n_layers = vcfg.num_hidden_layers
        hs_index = layer % (n_layers + 1)  # index into hidden_states (0 = embeddings)
        if hs_index == 0:
            raise ValueError("vision_feature_layer selects the embeddings; no ViT layer to prune")
        side = _side(self.config)
        return self._model_info(
            grid_hw=(side, side),
            has_cls=getattr(vt.embeddings, "class_embedding", None) is not None,
            vision_num_layers=n_layers,
            vision_feature_layer=hs_index - 1,
            vision_num_heads=vcfg.num_attention_heads,
        )

    # ---- vision side ------------------------------------------------------------------------------
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vt = self.vision_tower
        hs = vt.embeddings(pixel_values.to(vt.embeddings.patch_embedding.weight.dtype))
        return vt.pre_layrnorm(hs) if hasattr(vt, "pre_layrnorm") else hs

    def run_vision_block(self, i: int, hs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.vision_tower.encoder.layers[i](hs, mask)

    def vision_attention(self, i: int) -> AttentionParts:
        layer = self.vision_tower.encoder.layers[i]
        a = layer.self_attn
        return AttentionParts(layer.layer_norm1, a.q_proj, a.k_proj, a.v_proj, a.head_dim, a.scale, a)

    def vision_post_norm(self) -> nn.Module | None:
        return getattr(self.vision_tower, "post_layernorm", None)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.projector(tokens)

    # ---- prompt -------------------------------------------------------------------------------------
    def image_layouts(self, kwargs: dict[str, Any]) -> list[ImageLayout]:
        pixel_values = kwargs["pixel_values"]
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected [images, 3, H, W]")
        return [self.layout_for(self.config, None)] * pixel_values.shape[0]

    def feed_features(self, kwargs: dict[str, Any], features: list[torch.Tensor]) -> None:
        kwargs["pixel_values"] = None
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
