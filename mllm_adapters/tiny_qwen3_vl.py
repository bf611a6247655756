"""A tiny Qwen3-VL built from config (random weights, no download), its offline processor, and its config.

The family spec `mllm_adapters.families.qwen3_vl` names these in ``tiny_builders``. The shapes mirror the
real model's structure at toy widths: a 4-block ViT (LayerNorm, GELU MLP, fused qkv, 2-D rope) with a
learned 4 x 4 position-embedding table interpolated to each image's patch grid, no window attention, a
PatchMerger for the final features and three DeepStack mergers (after ViT blocks 0, 1 and 2) whose
features are added into the outputs of decoder layers 0, 1 and 2 at the visual positions; a 4-layer
Qwen3 decoder (q/k RMSNorm, GQA 4 q / 2 kv heads, head_dim 16) with interleaved M-RoPE.

The tokenizer and prompt format are the tiny Qwen ones (`mllm_adapters.tiny.make_qwen_tokenizer`,
``TINY_QWEN_IMAGE``); the image processor is transformers' `Qwen2VLImageProcessor` (the one Qwen3-VL
checkpoints use) with 8 px patches by default, so images resize to multiples of 16 px within
`TINY_QWEN_MIN_PIXELS`..`TINY_QWEN_MAX_PIXELS` (40 x 60 px -> 2 x 4 = 8 units, 64 x 48 px -> 4 x 3 = 12).
``patch_size=16`` builds the real model's patch size (32 px units; pass larger pixel bounds).

The MoE variant (`build_tiny_qwen3_vl_moe`, transformers' Qwen3VLMoeForConditionalGeneration, as
Qwen3-VL-30B-A3B) is the same model with the decoder MLPs of layers 0-2 replaced by sparse mixtures of
`TINY_QWEN3_MOE` experts (a softmax top-k router, SwiGLU experts) and layer 3 kept dense
(``mlp_only_layers``), so both kinds of decoder MLP are exercised.
"""

from __future__ import annotations

import torch
from transformers import (
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from mllm_adapters.tiny import (
    QWEN_SPECIAL_TOKENS,
    TINY_QWEN_MAX_PIXELS,
    TINY_QWEN_MIN_PIXELS,
    TINY_QWEN_PATCH,
    TINY_WORDS,
    _qwen_token_ids,
    _set_attn,
    _sharpen,
    make_qwen_tokenizer,
    tiny_text_dims,
)

#: The tiny Qwen tokenizer's vocabulary size, as `make_qwen_tokenizer(TINY_WORDS)` builds it (8 special tokens
#: then the words), what `tiny_qwen3_vl_config` must be given to describe `build_tiny_qwen3_vl`'s model.
TINY_QWEN3_VOCAB = len(dict.fromkeys([*QWEN_SPECIAL_TOKENS, *TINY_WORDS]))
#: ViT blocks whose output feeds a DeepStack merger (the 8B: 8, 16, 24 of 27 blocks); level i is added
#: after decoder layer i.
TINY_QWEN3_DEEPSTACK = (0, 1, 2)
#: learned position-embedding table of the tiny ViT: 4 x 4 (the 8B: 48 x 48 = 2304), bilinearly
#: interpolated to each image's patch grid
TINY_QWEN3_POS_EMBED = 16
#: interleaved M-RoPE sections (t, h, w) of the 8 rotary frequencies of head_dim 16 (the 8B: 24/20/20 of 64)
TINY_QWEN3_MROPE = (4, 2, 2)
#: the tiny MoE decoder's mixtures (Qwen3-VL-30B-A3B: 128 experts, 8 per token, width 768, every layer sparse):
#: 4 experts, 2 per token, width 32; decoder layer 3 keeps the dense MLP (intermediate_size 128)
TINY_QWEN3_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                      mlp_only_layers=[3])


def make_qwen3_vl_processor(tokenizer, patch_size: int = TINY_QWEN_PATCH, min_pixels: int = TINY_QWEN_MIN_PIXELS,
                            max_pixels: int = TINY_QWEN_MAX_PIXELS) -> Qwen3VLProcessor:
    """A `Qwen3VLProcessor` over the tiny Qwen tokenizer: `Qwen2VLImageProcessor` (smart resize to multiples
    of ``patch_size * 2``, pixel count clamped to [min_pixels, max_pixels]; merge 2, temporal patch 2) and
    `Qwen3VLVideoProcessor` with the same geometry; pixels normalised with mean = std = 0.5."""
    for name, value in (("patch_size", patch_size), ("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels={min_pixels} must not exceed max_pixels={max_pixels}")
    # mean = std = 0.5 per channel, as Qwen3-VL checkpoints' preprocessor_config.json (not CLIP's statistics)
    common = dict(patch_size=patch_size, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                  image_std=[0.5] * 3)
    image_processor = Qwen2VLImageProcessor(**common, min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen3VLVideoProcessor(**common, size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)


def tiny_qwen3_vl_config(
    vocab_size: int,
    patch_size: int = TINY_QWEN_PATCH,
    vision_layers: int = 4,
    text_layers: int = 4,
    deepstack_visual_indexes: tuple[int, ...] = TINY_QWEN3_DEEPSTACK,
    attn_implementation: str = "eager",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    moe: bool = False,
) -> Qwen3VLConfig | Qwen3VLMoeConfig:
    """Config of the tiny Qwen3-VL (module docstring); ``moe``: of its MoE variant (`TINY_QWEN3_MOE`).
    ``min_pixels`` / ``max_pixels`` are the processor's and do not change the config (accepted so a runner
    config passes the same keys to both builders).

    The DeepStack levels must be distinct ViT blocks and fewer than the decoder layers (level i is added
    after decoder layer i)."""
    levels = tuple(int(i) for i in deepstack_visual_indexes)
    if len(set(levels)) != len(levels) or any(not 0 <= i < vision_layers for i in levels):
        raise ValueError(f"deepstack_visual_indexes={deepstack_visual_indexes!r} must be distinct ViT blocks in "
                         f"0..{vision_layers - 1}")
    if len(levels) >= text_layers:
        raise ValueError(f"deepstack_visual_indexes: {len(levels)} DeepStack levels need more than that many decoder "
                         f"layers (text_layers={text_layers})")
    vision = dict(
        depth=vision_layers,
        hidden_size=32,
        intermediate_size=64,
        hidden_act="gelu_pytorch_tanh",
        num_heads=4,
        in_channels=3,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,  # merger output = decoder width
        num_position_embeddings=TINY_QWEN3_POS_EMBED,
        deepstack_visual_indexes=list(levels),
    )
    text = tiny_text_dims(vocab_size, text_layers, head_dim=16,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "mrope_section": list(TINY_QWEN3_MROPE), "mrope_interleaved": True})
    if moe:
        if any(i >= text_layers for i in TINY_QWEN3_MOE["mlp_only_layers"]):
            raise ValueError(f"text_layers={text_layers}: the tiny MoE decoder needs more than "
                             f"{max(TINY_QWEN3_MOE['mlp_only_layers'])} layers (its dense layer)")
        text = {**text, **TINY_QWEN3_MOE}
    config_class = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    cfg = config_class(vision_config=vision, text_config=text, **_qwen_token_ids(vocab_size))
    return _set_attn(cfg, attn_implementation)


def tiny_qwen3_vl_moe_config(vocab_size: int, **kwargs) -> Qwen3VLMoeConfig:
    """Config of the tiny Qwen3-VL MoE (`tiny_qwen3_vl_config` with ``moe=True``; same keyword arguments)."""
    return tiny_qwen3_vl_config(vocab_size, **kwargs, moe=True)


def build_tiny_qwen3_vl(
    seed: int = 0,
    attn_implementation: str = "eager",
    patch_size: int = TINY_QWEN_PATCH,
    vision_layers: int = 4,
    text_layers: int = 4,
    deepstack_visual_indexes: tuple[int, ...] = TINY_QWEN3_DEEPSTACK,
    min_pixels: int = TINY_QWEN_MIN_PIXELS,
    max_pixels: int = TINY_QWEN_MAX_PIXELS,
    moe: bool = False,
) -> tuple[Qwen3VLForConditionalGeneration | Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor]:
    """A randomly initialised tiny Qwen3VLForConditionalGeneration (fp32, eval mode) and its processor.

    Prompts follow `mllm_adapters.tiny.TINY_QWEN_PROMPT` (``<|vision_start|><|image_pad|><|vision_end|>`` per
    image, words from `TINY_WORDS`); ``processor(images=..., text=..., return_tensors="pt", padding=True)``
    pads on the left and returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``
    ([sum of patches, 3*2*P*P]) and ``image_grid_thw``. Every weight matrix, the conv kernel and the
    position-embedding table are redrawn with fan-in scaling (`_sharpen`), so attention is far from uniform.
    ``moe``: the MoE variant (Qwen3VLMoeForConditionalGeneration); its router and expert weights are redrawn
    the same way (an expert tensor [E, out, in] with fan-in ``in``).
    """
    tokenizer = make_qwen_tokenizer(TINY_WORDS)
    processor = make_qwen3_vl_processor(tokenizer, patch_size, min_pixels, max_pixels)
    cfg = tiny_qwen3_vl_config(len(tokenizer), patch_size, vision_layers, text_layers, deepstack_visual_indexes,
                               attn_implementation, moe=moe)
    torch.manual_seed(seed)
    model = (Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration)(cfg).eval()
    # true fan-in: Linear [out, in] and the Conv3d kernel: p[0].numel(); an expert stack [E, out, in]: in
    _sharpen(model, seed, fan_in=lambda p: p.shape[-1] if p.dim() == 3 else p[0].numel())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = None  # greedy decoding runs the full max_new_tokens
    return model, processor


def build_tiny_qwen3_vl_moe(seed: int = 0, **kwargs) -> tuple[Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor]:
    """The tiny Qwen3-VL MoE and its processor (`build_tiny_qwen3_vl` with ``moe=True``; same keywords)."""
    return build_tiny_qwen3_vl(seed, **kwargs, moe=True)
