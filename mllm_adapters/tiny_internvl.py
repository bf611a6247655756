"""Tiny InternVL3 (transformers' InternVLForConditionalGeneration) built from config, with an offline
word-level tokenizer and processor: what the conformance suite and the InternVL tests run on.

Architecture as the real model, sizes tiny: an InternViT with a [CLS] token (width 32, 4 heads, 4 blocks,
LayerNorm, layer scale) on 48 px tiles of 8 px patches (6 x 6 patches + CLS), pixel shuffle with
downsample ratio 0.5 (one LLM token = a 2 x 2 unit of patches, so 3 x 3 = 9 tokens per tile), the
LayerNorm + 2-layer MLP projector, and a 4-layer Qwen2 decoder with GQA (4 q / 2 kv heads, 1-D RoPE).

The processor is transformers' `InternVLProcessor` with a `GotOcr2ImageProcessor` cutting each image into
up to ``max_patches`` 48 px tiles (the grid whose aspect ratio is closest to the image's) plus a
thumbnail (the whole image resized to one tile) whenever there is more than one tile: a 40 x 60 px image
gets 2 x 1 tiles + thumbnail (27 tokens), a 30 x 80 px one 3 x 1 + thumbnail (36 tokens), a square one
a single tile (9 tokens). Prompts write one image as ``<IMG_CONTEXT>`` (`TINY_INTERNVL_IMAGE`, as the
real chat template does); the processor expands it to ``<img>`` + 9 x tiles ``<IMG_CONTEXT>`` + ``</img>``.
Nothing is downloaded.
"""

from __future__ import annotations

import torch
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    PreTrainedTokenizerFast,
)

from mllm_adapters.tiny import TINY_WORDS, _set_attn, _sharpen, _word_tokenizer, tiny_text_dims

#: Special tokens of the tiny InternVL tokenizer (ids 0..6, in this order): the real InternVL3 strings for
#: the image start / end and context (placeholder) tokens, and its video token.
INTERNVL_SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]

#: How a prompt writes one image (the processor expands it into the image's tiles' placeholders).
TINY_INTERNVL_IMAGE = "<IMG_CONTEXT>"
TINY_INTERNVL_PROMPT = f"USER: {TINY_INTERNVL_IMAGE} what is the colour ? ASSISTANT:"

#: Tile side in px, ViT patch side in px, and the most tiles the processor cuts (the thumbnail comes on top).
TINY_INTERNVL_TILE = 48
TINY_INTERNVL_PATCH = 8
TINY_INTERNVL_MAX_TILES = 4


def make_internvl_tokenizer(words: list[str] = TINY_WORDS, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``words`` plus `INTERNVL_SPECIAL_TOKENS` (ids 0..7).

    The image tokens are special added tokens (a run of ``<IMG_CONTEXT>`` splits into one id each) and are
    exposed as the attributes `InternVLProcessor` reads (``start_image_token``, ``end_image_token``,
    ``context_image_token``, ``video_token`` and their ``*_id``), as in the real InternVL3 tokenizer.
    """
    return _word_tokenizer(words, padding_side, INTERNVL_SPECIAL_TOKENS, {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    })


def tokens_per_tile(tile: int, patch: int, downsample_ratio: float = 0.5) -> int:
    """LLM tokens of one tile: (tile / patch * downsample_ratio) ** 2 (the config's ``image_seq_length``)."""
    side = tile // patch
    return int(round(side * downsample_ratio)) ** 2


def make_internvl_processor(
    tokenizer: PreTrainedTokenizerFast,
    image_size: int = TINY_INTERNVL_TILE,
    patch_size: int = TINY_INTERNVL_PATCH,
    max_tiles: int = TINY_INTERNVL_MAX_TILES,
) -> InternVLProcessor:
    """An `InternVLProcessor` cutting images into 1..``max_tiles`` ``image_size`` px tiles (+ thumbnail)."""
    image_processor = GotOcr2ImageProcessor(
        size={"height": image_size, "width": image_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
    )
    # InternVLProcessor requires a video processor (frames would reach the model as one-tile images)
    video_processor = InternVLVideoProcessor(size={"height": image_size, "width": image_size})
    return InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                             image_seq_length=tokens_per_tile(image_size, patch_size))


def tiny_internvl_config(
    vocab_size: int,
    image_size: int = TINY_INTERNVL_TILE,
    patch_size: int = TINY_INTERNVL_PATCH,
    max_tiles: int = TINY_INTERNVL_MAX_TILES,
    vision_layers: int = 4,
    text_layers: int = 4,
    attn_implementation: str = "eager",
) -> InternVLConfig:
    """Config of a tiny InternVL3: InternViT with CLS (width 32, 4 heads, ``vision_layers`` blocks) on
    ``image_size`` px tiles of ``patch_size`` px patches, pixel shuffle 0.5, MLP projector, a ``text_layers``-layer
    Qwen2 decoder (width 64, 4 q / 2 kv heads); the feature layer is the last (-1), CLS dropped.

    ``max_dynamic_patch`` (InternVL's own name for the processor's ``max_patches``) is recorded on the
    config so config-level questions (`InternVLSpec.layout_for`, ``max_visual_tokens``) see the tiny
    processor's tiling; hub checkpoints' configs lack it and the spec uses InternVL3's 12."""
    ids = {t: i for i, t in enumerate(INTERNVL_SPECIAL_TOKENS)}
    if vocab_size <= len(ids):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(ids)} special tokens")
    vision = dict(
        hidden_size=32,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=[image_size, image_size],
        patch_size=[patch_size, patch_size],
        norm_type="layer_norm",
        use_mean_pooling=True,
        use_absolute_position_embeddings=True,
        layer_scale_init_value=0.1,
    )
    text = tiny_text_dims(vocab_size, text_layers, model_type="qwen2", tie_word_embeddings=True)
    cfg = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=tokens_per_tile(image_size, patch_size),
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        max_dynamic_patch=max_tiles,
        min_dynamic_patch=1,
    )
    return _set_attn(cfg, attn_implementation)


def _fan_in(p: torch.Tensor) -> int:
    """Fan-in of a weight for `_sharpen`: C*P*P for the conv patch embedding, else the last dim (linear
    inputs, embedding width, and the width of the [CLS] token and position embeddings)."""
    return p[0].numel() if p.dim() == 4 else p.shape[-1]


def build_tiny_internvl(
    seed: int = 0,
    attn_implementation: str = "eager",
    image_size: int = TINY_INTERNVL_TILE,
    patch_size: int = TINY_INTERNVL_PATCH,
    max_tiles: int = TINY_INTERNVL_MAX_TILES,
    vision_layers: int = 4,
    text_layers: int = 4,
) -> tuple[InternVLForConditionalGeneration, InternVLProcessor]:
    """A randomly initialised tiny InternVLForConditionalGeneration (fp32, eval mode) and its processor.

    Prompts follow `TINY_INTERNVL_PROMPT` (``<IMG_CONTEXT>`` per image, words from `TINY_WORDS`); call
    ``processor(images=..., text=..., return_tensors="pt", padding=True)`` (left padding). The processor
    returns ``input_ids``, ``attention_mask`` and ``pixel_values`` [tiles of every image, 3, tile, tile]
    (each image's tiles in grid order, then its thumbnail).
    """
    tokenizer = make_internvl_tokenizer(TINY_WORDS)
    processor = make_internvl_processor(tokenizer, image_size, patch_size, max_tiles)
    cfg = tiny_internvl_config(len(tokenizer), image_size, patch_size, max_tiles, vision_layers, text_layers, attn_implementation)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    # Random init gives near-uniform attention (pruning choices would be ties); the [CLS] token and the
    # position embeddings start at zero in transformers' init, so they are drawn too.
    _sharpen(model, seed, fan_in=_fan_in)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = None  # greedy decoding runs the full max_new_tokens
    return model, processor
