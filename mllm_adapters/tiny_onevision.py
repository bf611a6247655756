"""A tiny LLaVA-OneVision built from config (random weights, no download) and its offline processor.

The real checkpoint (llava-hf/llava-onevision-qwen2-7b-ov-hf): SigLIP so400m (384 px tiles of 14 px
patches, 27 x 27 = 729 tokens per tile, no CLS, 26 layers, feature layer -1, strategy "full"), a
two-layer projector, Qwen2-7B; anyres over 36 pinpoints (1..6 x 1..6 tiles of 384 px) with
``vision_aspect_ratio = "anyres_max_9"``: the unpadded crop canvas is resized (bilinear) when it holds
more than 1.1**2 x 9 tiles' worth of patches.

The tiny model keeps every one of those mechanisms at a size the conformance suite runs in seconds:
32 px tiles of 8 px patches (4 x 4 = 16 tokens per tile), a 4-layer SigLIP tower (width 32), a 4-layer
Qwen2 decoder (width 64, GQA 4 q / 2 kv heads), pinpoints up to 3 tiles in a row, and
``anyres_max_2`` so that most images' canvases are resized: e.g. a 40 x 60 px image takes the 2 x 2
pinpoint, unpads to 6 x 8 canvas patches and is resized to 4 x 6 (16 + 4 x 7 = 44 tokens); a 30 x 80 px
image takes 1 x 3, unpads to 4 x 10, resized to 3 x 8 (16 + 3 x 9 = 43 tokens); a 30 x 30 px image takes
1 x 1 and keeps its 4 x 4 canvas (16 + 4 x 5 = 36 tokens, no resize).
"""

from __future__ import annotations

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from mllm_adapters.tiny import TINY_WORDS, _sharpen, _word_tokenizer, tiny_text_dims

#: Special tokens of the tiny OneVision tokenizer (ids 0..5): the LLaVA ones plus ``<video>``, which the
#: OneVision processor also looks up.
OV_SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>"]
#: The tiny OneVision tokenizer's vocabulary size (`TINY_WORDS` after `OV_SPECIAL_TOKENS`): one more than
#: `mllm_adapters.tiny.TINY_VOCAB`, for ``<video>``.
TINY_OV_VOCAB = len(dict.fromkeys([*OV_SPECIAL_TOKENS, *TINY_WORDS]))

#: 32 px tiles: a 4 x 4 patch grid per tile.
TINY_OV_TILE = 32
TINY_OV_PATCH = 8
#: Pinpoints (height, width) px: 1 x 1, 1 x 2, 2 x 1, 2 x 2, 1 x 3 and 3 x 1 tiles of 32 px.
TINY_OV_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
#: Canvases above 1.1**2 x 2 tiles' worth of patches are resized (real checkpoint: anyres_max_9).
TINY_OV_ASPECT = "anyres_max_2"


def make_onevision_tokenizer(words: list[str] = TINY_WORDS, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``words`` plus `OV_SPECIAL_TOKENS`; ``image_token`` / ``video_token``
    are exposed as tokenizer attributes (with their ids), as the OneVision processor reads them."""
    return _word_tokenizer(list(words), padding_side, OV_SPECIAL_TOKENS,
                           {"image_token": "<image>", "video_token": "<video>"})


def make_onevision_processor(tokenizer: PreTrainedTokenizerFast, tile_px: int = TINY_OV_TILE,
                             patch_px: int = TINY_OV_PATCH, pinpoints: list[list[int]] | None = None,
                             vision_aspect_ratio: str = TINY_OV_ASPECT) -> LlavaOnevisionProcessor:
    """A `LlavaOnevisionProcessor` for ``tile_px`` tiles of ``patch_px`` patches (SigLIP: no CLS, strategy
    "full"), anyres over ``pinpoints`` with the model's ``vision_aspect_ratio``."""
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": tile_px, "width": tile_px},
        image_grid_pinpoints=[list(p) for p in (pinpoints or TINY_OV_PINPOINTS)],
        image_mean=[0.5, 0.5, 0.5],  # SigLIP's normalisation, as the real checkpoint's processor
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": tile_px, "width": tile_px}),
        num_image_tokens=(tile_px // patch_px) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
    )


def tiny_onevision_config(
    vocab_size: int,
    image_size: int = TINY_OV_TILE,
    patch_size: int = TINY_OV_PATCH,
    grid_pinpoints: list[list[int]] | None = None,
    vision_aspect_ratio: str = TINY_OV_ASPECT,
    vision_layers: int = 4,
    text_layers: int = 4,
    attn_implementation: str = "eager",
) -> LlavaOnevisionConfig:
    """Config of the tiny OneVision: SigLIP tower (width 32, 4 heads, no pooling head), feature layer -1
    with strategy "full" (as the real checkpoint), two-layer projector, Qwen2 decoder (width 64, 4 q /
    2 kv heads, head_dim 16)."""
    ids = {t: i for i, t in enumerate(OV_SPECIAL_TOKENS)}
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(**tiny_text_dims(vocab_size, text_layers, max_position_embeddings=1024, pad_token_id=ids["<pad>"],
                                        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], tie_word_embeddings=False))
    cfg = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        image_grid_pinpoints=[list(p) for p in (grid_pinpoints or TINY_OV_PINPOINTS)],
        projector_hidden_act="gelu",
    )
    cfg._attn_implementation = attn_implementation
    cfg.text_config._attn_implementation = attn_implementation
    cfg.vision_config._attn_implementation = attn_implementation
    return cfg


def build_tiny_onevision(
    seed: int = 0,
    attn_implementation: str = "eager",
    image_size: int = TINY_OV_TILE,
    patch_size: int = TINY_OV_PATCH,
    grid_pinpoints: list[list[int]] | None = None,
    vision_aspect_ratio: str = TINY_OV_ASPECT,
    vision_layers: int = 4,
    text_layers: int = 4,
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A randomly initialised tiny LlavaOnevisionForConditionalGeneration (fp32, eval mode) and its processor.

    Prompts are LLaVA's ("USER: <image> what is the colour ? ASSISTANT:", words from `TINY_WORDS`); call
    ``processor(images=..., text=..., return_tensors="pt", padding=True)`` (left padding). It returns
    ``input_ids``, ``attention_mask``, ``pixel_values`` [B, max tiles, 3, 32, 32], ``image_sizes`` and
    ``batch_num_images``. Nothing is downloaded.
    """
    tokenizer = make_onevision_tokenizer(TINY_WORDS)
    processor = make_onevision_processor(tokenizer, image_size, patch_size, grid_pinpoints, vision_aspect_ratio)
    cfg = tiny_onevision_config(len(tokenizer), image_size, patch_size, grid_pinpoints, vision_aspect_ratio, vision_layers,
                                text_layers, attn_implementation)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    # random init gives near-uniform attention (pruning choices would be ties); the 1-D newline is drawn too
    _sharpen(model, seed, also=lambda name: name.endswith("image_newline"))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = None  # greedy decoding runs the full max_new_tokens
    return model, processor
