"""Qwen3-VL MoE (transformers' Qwen3VLMoeForConditionalGeneration: Qwen3-VL-30B-A3B, 235B-A22B): the dense
Qwen3-VL spec (`mllm_adapters.families.qwen3_vl`) with its decoder's mixtures of experts counted.

The vision tower, DeepStack, M-RoPE and the decoder's attention (q/k norms) are the dense model's, so every
hook of `Qwen3VLSpec` applies unchanged, and the same methods are supported and refused. What differs is
the decoder MLP of the layers the config makes sparse (``(i + 1) % decoder_sparse_step == 0`` and ``i`` not
in ``mlp_only_layers``): a softmax router over ``num_experts`` experts picks ``num_experts_per_tok`` per
token, each a SwiGLU of width ``moe_intermediate_size``. Routing is per token, so pruning visual tokens
removes their expert work as it removes their dense MLP work; `llm_mlp_flops` counts it: router
2 n D E plus k experts per token, k 6 n D M_e. docs/qwen3-vl.md has the details; tests:
`tests/test_qwen3_vl_family.py` (run on both variants) and the conformance suite.
"""

from __future__ import annotations

from typing import Any

from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import apply_rotary_pos_emb

from mllm_adapters.families.qwen3_vl import Qwen3VLSpec
from mllm_adapters.registry import register_family


def is_sparse_layer(text_config: Any, layer: int) -> bool:
    """Whether decoder layer ``layer`` has a mixture of experts (the rule of ``Qwen3VLMoeTextDecoderLayer``)."""
    return (layer not in (text_config.mlp_only_layers or []) and int(text_config.num_experts) > 0
            and (layer + 1) % int(text_config.decoder_sparse_step) == 0)


@register_family("qwen3_vl_moe")
class Qwen3VLMoeSpec(Qwen3VLSpec):
    """Qwen3-VL MoE: the dense Qwen3-VL spec; prefill FLOPs count the router and the routed experts."""

    model_classes = ("Qwen3VLMoeForConditionalGeneration",)
    model_types = ("qwen3_vl_moe",)
    tiny_builders = ("mllm_adapters.tiny_qwen3_vl:build_tiny_qwen3_vl_moe",
                     "mllm_adapters.tiny_qwen3_vl:tiny_qwen3_vl_moe_config")
    rope_fn = staticmethod(apply_rotary_pos_emb)  # the MoE module's own (the same interleaved M-RoPE tables)

    @classmethod
    def llm_mlp_flops(cls, config: Any, layer: int, n_tokens: int) -> int | None:
        """Layer ``layer``'s MLP on ``n_tokens`` tokens: a sparse layer's router (D -> E) and its k experts
        per token (gate and up D -> M_e, down M_e -> D); a dense layer (``mlp_only_layers``): None, the
        dense SwiGLU of width ``intermediate_size``."""
        t = config.text_config
        if not is_sparse_layer(t, layer):
            return None
        d, n = int(t.hidden_size), int(n_tokens)
        router = 2 * n * d * int(t.num_experts)
        experts = int(t.num_experts_per_tok) * 3 * 2 * n * d * int(t.moe_intermediate_size)
        return router + experts
