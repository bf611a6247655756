"""Pieces several family specs share (not a family: the registry skips ``_`` modules).

- `PixelsThroughGenerate`: while a pruner is attached, generate() hands the pixels to the forward pass
  instead of encoding the images itself first (``mm_encoder_outputs``), so the engine's vision path
  runs once, inside the forward it hooks.
- `LlamaStyleDecoder`: the LLM side of a transformers decoder stack shaped like Llama's (``self.lm``:
  ``layers[i].self_attn.{q,k,v}_proj`` after ``input_layernorm``, ``layers[i].mlp``, ``norm``,
  ``embed_tokens``, ``rotary_emb``); LLaVA's Llama and Qwen2-VL's Qwen2 decoders are.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from mllm_adapters.engine.spec import AttentionParts


class PixelsThroughGenerate:
    """`FamilySpec.prepare` / `restore` for models whose generate() would encode the images itself."""

    model: nn.Module

    def prepare(self) -> None:
        self.model._supports_mm_encoder_outputs = lambda: False

    def restore(self) -> None:
        self.model.__dict__.pop("_supports_mm_encoder_outputs", None)


class LlamaStyleDecoder:
    """`FamilySpec`'s LLM-side answers for a Llama-shaped decoder stack ``self.lm``."""

    lm: nn.Module
    #: applies RoPE tables (cos, sin) [B, L, head_dim] to q and k [B, H, L, head_dim]
    rope_fn = staticmethod(apply_rotary_pos_emb)

    def decoder_layers(self) -> nn.ModuleList:
        return self.lm.layers

    def text_attention(self, i: int) -> AttentionParts:
        layer = self.lm.layers[i]
        a = layer.self_attn
        return AttentionParts(layer.input_layernorm, a.q_proj, a.k_proj, a.v_proj, a.head_dim, a.scaling, a)

    def final_norm(self) -> nn.Module:
        return self.lm.norm

    def text_mlp(self, i: int) -> nn.Module:
        return self.lm.layers[i].mlp

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_tokens(input_ids)

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lm.rotary_emb(x, position_ids=position_ids)

    def apply_rope(self, q, k, cos, sin):
        return self.rope_fn(q, k, cos, sin)

    def rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # the formula of transformers' apply_rotary_pos_emb (Llama's and Qwen2-VL's: M-RoPE is mixed
        # into cos/sin already), for one tensor: the same ops in the same order, so bitwise its output
        return (t * cos.unsqueeze(1)) + (rotate_half(t) * sin.unsqueeze(1))
