"""Tiny LLaVA / Qwen-VL models built from configs, with an offline word-level tokenizer and processor.

Tests and smoke benchmarks use these the way transformers tests itself: random weights, real
architecture, no download. The same tokenizer/processor builders serve the embedded default model.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]

TINY_WORDS = (
    "USER ASSISTANT : ? . , what is the colour shape of a an object at row column how many are there "
    "left right red green blue yellow purple orange circle square triangle yes no zero one two three four "
    "five six seven eight nine describe image"
).split()


def _word_tokenizer(words: list[str], padding_side: str, specials: list[str],
                    named: dict[str, str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: ``specials`` (<pad> <unk> <s> </s>, then the model's own special
    tokens, added as special so a run of them splits into one id each) take ids 0.., then ``words``;
    ``named`` exposes some as tokenizer attributes (``image_token`` and its ``image_token_id``, ...)."""
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side=padding_side,
        extra_special_tokens=named,
    )
    fast.add_special_tokens({"additional_special_tokens": specials[4:]})
    return fast


def make_word_tokenizer(words: list[str], padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over `words` plus <pad> <unk> <s> </s> <image> (ids 0..4).

    `<image>` is a special added token, so LlavaProcessor's run of `<image><image>...` splits into
    one id per placeholder without spaces.
    """
    return _word_tokenizer(words, padding_side, SPECIAL_TOKENS, {"image_token": "<image>"})


def make_llava_processor(
    tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int
) -> LlavaProcessor:
    """A LlavaProcessor for square images of `image_size` px with a CLIP tower of `patch_size`."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def _sharpen(model, seed: int, fan_in=lambda p: p.shape[-1], also=lambda name: False) -> None:
    """Redraw every weight matrix (and conv kernel) ~ N(0, 1 / fan_in(p)) from a seeded generator, in
    parameter order; ``also(name)`` picks further (1-D) parameters to draw. Random init gives
    near-uniform attention, so pruning choices would be ties. The LLaVA models use ``shape[-1]``; the
    Qwen ones the true fan-in ``p[0].numel()`` (``shape[-1]`` for linear/embedding weights, C*T*P*P for
    the Conv3d patch embed)."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() >= 2 or also(name):
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in(p) ** 0.5))


def _set_attn(cfg, attn_implementation: str):
    cfg._attn_implementation = attn_implementation
    cfg.text_config._attn_implementation = attn_implementation
    cfg.vision_config._attn_implementation = attn_implementation
    return cfg


def tiny_text_dims(vocab_size: int, text_layers: int, **extra) -> dict:
    """The tiny decoder every family's tiny model shares: hidden 64, MLP 128, 4 query / 2 key-value heads,
    512 positions, pad/bos/eos = ids 0/2/3 (``extra`` adds or overrides fields, e.g. a model_type)."""
    return {**dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                   bos_token_id=2, eos_token_id=3), **extra}


def tiny_llava_config(
    vocab_size: int,
    image_size: int = 48,
    patch_size: int = 8,
    vision_layers: int = 4,
    text_layers: int = 4,
    attn_implementation: str = "eager",
) -> LlavaConfig:
    """Config of a tiny LLaVA: 6x6 patches + CLS, 4-layer ViT, 4-layer Llama with GQA (4 q / 2 kv heads)."""
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        projection_dim=32,
    )
    text = LlamaConfig(**tiny_text_dims(vocab_size, text_layers))
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=SPECIAL_TOKENS.index("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return _set_attn(cfg, attn_implementation)


def build_tiny_llava(
    seed: int = 0,
    attn_implementation: str = "eager",
    image_size: int = 48,
    patch_size: int = 8,
    vision_layers: int = 4,
    text_layers: int = 4,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LlavaForConditionalGeneration (fp32, eval mode) and its processor."""
    tokenizer = make_word_tokenizer(TINY_WORDS)
    processor = make_llava_processor(tokenizer, image_size, patch_size)
    cfg = tiny_llava_config(
        len(tokenizer), image_size, patch_size, vision_layers, text_layers, attn_implementation
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    _sharpen(model, seed)  # random init gives near-uniform attention: pruning choices would be ties
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = None  # greedy decoding runs the full max_new_tokens
    return model, processor


def tiny_llava_next_config(
    vocab_size: int,
    image_size: int = 32,
    patch_size: int = 8,
    grid_pinpoints: list[list[int]] | None = None,
    vision_layers: int = 4,
    text_layers: int = 4,
    attn_implementation: str = "eager",
) -> LlavaNextConfig:
    """Config of a tiny LLaVA-NeXT: `tiny_llava_config`'s towers with anyres tiling over ``grid_pinpoints``."""
    base = tiny_llava_config(vocab_size, image_size, patch_size, vision_layers, text_layers, attn_implementation)
    cfg = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_index=SPECIAL_TOKENS.index("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_grid_pinpoints=[list(p) for p in (grid_pinpoints or TINY_NEXT_PINPOINTS)],
    )
    cfg._attn_implementation = attn_implementation
    return cfg


#: The tiny tokenizer's vocabulary size, as `make_word_tokenizer(TINY_WORDS)` builds it.
TINY_VOCAB = len(dict.fromkeys([*SPECIAL_TOKENS, *TINY_WORDS]))


#: Tiny LLaVA-NeXT: 32 px tiles of 8 px patches (4 x 4 grid per tile); these pinpoints give 2 or 4 crops
#: plus the base tile, so an image packs into 16 + up to 8 x (8 + 1) = 88 visual tokens.
TINY_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def build_tiny_llava_next(
    seed: int = 0,
    attn_implementation: str = "eager",
    image_size: int = 32,
    patch_size: int = 8,
    grid_pinpoints: list[list[int]] | None = None,
    vision_layers: int = 4,
    text_layers: int = 4,
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A randomly initialised tiny LlavaNextForConditionalGeneration (fp32, eval mode) and its processor.

    Same towers as `build_tiny_llava` (CLIP ViT + Llama with GQA); anyres tiling with ``grid_pinpoints``
    (default `TINY_NEXT_PINPOINTS`), unpadding and ``image_newline`` as in the real model. Nothing is
    downloaded.
    """
    pinpoints = [list(p) for p in (grid_pinpoints or TINY_NEXT_PINPOINTS)]
    tokenizer = make_word_tokenizer(TINY_WORDS)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    cfg = tiny_llava_next_config(len(tokenizer), image_size, patch_size, pinpoints, vision_layers, text_layers,
                                 attn_implementation)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    _sharpen(model, seed, also=lambda name: name.endswith("image_newline"))  # the 1-D newline is drawn too
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = None
    return model, processor


# ----------------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL
# ----------------------------------------------------------------------------------------------------------

#: Special tokens of the tiny Qwen tokenizer (ids 0..7, in this order); the vision ones are the real
#: Qwen-VL strings, so `Qwen2VLProcessor` / `Qwen2_5_VLProcessor` find `<|image_pad|>` / `<|video_pad|>`.
QWEN_SPECIAL_TOKENS = [
    "<pad>", "<unk>", "<s>", "</s>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

#: Prompt format of the tiny Qwen models (no chat template): one ``<|vision_start|><|image_pad|><|vision_end|>``
#: per image, in order; the processor expands each ``<|image_pad|>`` into ``grid_t*grid_h*grid_w // merge**2``
#: copies (one per merged 2x2 unit). Words must come from `TINY_WORDS`, separated by spaces.
TINY_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
TINY_QWEN_PROMPT = f"USER: {TINY_QWEN_IMAGE} what is the colour ? ASSISTANT:"

#: Tiny Qwen image processor bounds: 8 px patches merged 2 x 2, so images resize to multiples of 16 px with
#: 32*32 <= h*w <= 96*96 px, i.e. 4 to 36 merged units (e.g. 40x60 px -> 32x64 -> 2x4 = 8 units,
#: 64x48 px -> 4x3 = 12 units, 48x48 px -> 3x3 = 9 units).
TINY_QWEN_PATCH = 8
TINY_QWEN_MIN_PIXELS = 32 * 32
TINY_QWEN_MAX_PIXELS = 96 * 96

#: Qwen2.5-VL window attention: 32 px windows = 2 x 2 merged units, so a 64x48 px image (4 x 3 units)
#: splits into 4 windows (4, 2, 4, 2 units); blocks 1 and 3 attend over the whole image.
TINY_QWEN25_WINDOW = 32
TINY_QWEN25_FULLATT = (1, 3)


def make_qwen_tokenizer(words: list[str] = TINY_WORDS, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over `words` plus `QWEN_SPECIAL_TOKENS` (ids 0..7).

    The vision tokens are special added tokens (split out before the whitespace pre-tokenizer), so the
    processor's run of ``<|image_pad|><|image_pad|>...`` becomes one id per placeholder. ``image_token``,
    ``video_token``, ``vision_start_token`` and ``vision_end_token`` are exposed as tokenizer attributes
    (with their ``*_id``), as in the real Qwen tokenizers.
    """
    return _word_tokenizer(words, padding_side, QWEN_SPECIAL_TOKENS, {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    })


def make_qwen_processor(
    tokenizer: PreTrainedTokenizerFast,
    family: str = "qwen2_vl",
    patch_size: int = TINY_QWEN_PATCH,
    min_pixels: int = TINY_QWEN_MIN_PIXELS,
    max_pixels: int = TINY_QWEN_MAX_PIXELS,
) -> Qwen2VLProcessor | Qwen2_5_VLProcessor:
    """A `Qwen2VLProcessor` (``family="qwen2_vl"``) or `Qwen2_5_VLProcessor` (``"qwen2_5_vl"``) for the tiny towers.

    Both families use `Qwen2VLImageProcessor` (smart resize to multiples of ``patch_size * 2``, pixel count
    clamped to [min_pixels, max_pixels]; merge 2, temporal patch 2) and `Qwen2VLVideoProcessor`.
    """
    common = dict(patch_size=patch_size, temporal_patch_size=2, merge_size=2,
                  min_pixels=min_pixels, max_pixels=max_pixels)
    image_processor = Qwen2VLImageProcessor(**common)
    video_processor = Qwen2VLVideoProcessor(**common)
    cls = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}[family]
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)


def _qwen_token_ids(vocab_size: int) -> dict:
    ids = {t: i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    assert vocab_size > len(ids)
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _qwen_text_config(vocab_size: int, text_layers: int) -> dict:
    """Tiny Qwen2 decoder: hidden 64, 4 q / 2 kv heads (head_dim 16), M-RoPE sections t/h/w = 2/3/3 of 8 freqs."""
    return tiny_text_dims(vocab_size, text_layers,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def tiny_qwen2_vl_config(
    vocab_size: int,
    patch_size: int = TINY_QWEN_PATCH,
    vision_layers: int = 4,
    text_layers: int = 4,
    attn_implementation: str = "eager",
) -> Qwen2VLConfig:
    """Config of a tiny Qwen2-VL: 4-block ViT (width 32, 4 heads, LayerNorm, 2-D rope) whose PatchMerger
    maps each 2x2 group to the 64-wide decoder; 4-layer Qwen2 decoder with GQA (4 q / 2 kv) and M-RoPE."""
    vision = dict(
        depth=vision_layers,
        embed_dim=32,
        hidden_size=64,  # merger output = decoder width
        mlp_ratio=2,
        num_heads=4,
        in_channels=3,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    cfg = Qwen2VLConfig(
        vision_config=vision,
        text_config=_qwen_text_config(vocab_size, text_layers),
        **_qwen_token_ids(vocab_size),
    )
    return _set_attn(cfg, attn_implementation)


def tiny_qwen2_5_vl_config(
    vocab_size: int,
    patch_size: int = TINY_QWEN_PATCH,
    window_size: int = TINY_QWEN25_WINDOW,
    fullatt_block_indexes: tuple[int, ...] = TINY_QWEN25_FULLATT,
    vision_layers: int = 4,
    text_layers: int = 4,
    attn_implementation: str = "eager",
) -> Qwen2_5_VLConfig:
    """Config of a tiny Qwen2.5-VL: 4-block ViT (width 32, 4 heads, RMSNorm, SwiGLU) with window attention
    (``window_size`` px windows; blocks in ``fullatt_block_indexes`` attend over the whole image), RMSNorm
    PatchMerger to the 64-wide decoder; 4-layer Qwen2 decoder with GQA (4 q / 2 kv) and M-RoPE."""
    vision = dict(
        depth=vision_layers,
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=64,  # merger output = decoder width
        num_heads=4,
        in_channels=3,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=window_size,
        fullatt_block_indexes=list(fullatt_block_indexes),
        tokens_per_second=2,
    )
    cfg = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=_qwen_text_config(vocab_size, text_layers),
        **_qwen_token_ids(vocab_size),
    )
    return _set_attn(cfg, attn_implementation)


def _finish_qwen(model, tokenizer, seed: int):
    _sharpen(model, seed, fan_in=lambda p: p[0].numel())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = None  # greedy decoding runs the full max_new_tokens
    return model


def build_tiny_qwen2_vl(
    seed: int = 0,
    attn_implementation: str = "eager",
    patch_size: int = TINY_QWEN_PATCH,
    vision_layers: int = 4,
    text_layers: int = 4,
    min_pixels: int = TINY_QWEN_MIN_PIXELS,
    max_pixels: int = TINY_QWEN_MAX_PIXELS,
) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """A randomly initialised tiny Qwen2VLForConditionalGeneration (fp32, eval mode) and its processor.

    Nothing is downloaded. Prompts follow `TINY_QWEN_PROMPT`: ``<|vision_start|><|image_pad|><|vision_end|>``
    per image, words from `TINY_WORDS`; call ``processor(images=..., text=..., return_tensors="pt",
    padding=True)`` (left padding). The processor returns ``input_ids``, ``attention_mask``,
    ``mm_token_type_ids``, ``pixel_values`` ([sum of patches, 3*2*8*8]) and ``image_grid_thw``.
    """
    tokenizer = make_qwen_tokenizer(TINY_WORDS)
    processor = make_qwen_processor(tokenizer, "qwen2_vl", patch_size, min_pixels, max_pixels)
    cfg = tiny_qwen2_vl_config(len(tokenizer), patch_size, vision_layers, text_layers, attn_implementation)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    return _finish_qwen(model, tokenizer, seed), processor


def build_tiny_qwen2_5_vl(
    seed: int = 0,
    attn_implementation: str = "eager",
    patch_size: int = TINY_QWEN_PATCH,
    window_size: int = TINY_QWEN25_WINDOW,
    fullatt_block_indexes: tuple[int, ...] = TINY_QWEN25_FULLATT,
    vision_layers: int = 4,
    text_layers: int = 4,
    min_pixels: int = TINY_QWEN_MIN_PIXELS,
    max_pixels: int = TINY_QWEN_MAX_PIXELS,
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """A randomly initialised tiny Qwen2_5_VLForConditionalGeneration (fp32, eval mode) and its processor.

    As `build_tiny_qwen2_vl` (same tokenizer, prompt format and image processor), with the 2.5 vision tower:
    window attention over ``window_size`` px windows (2 x 2 merged units by default) except in the blocks
    ``fullatt_block_indexes``.
    """
    tokenizer = make_qwen_tokenizer(TINY_WORDS)
    processor = make_qwen_processor(tokenizer, "qwen2_5_vl", patch_size, min_pixels, max_pixels)
    cfg = tiny_qwen2_5_vl_config(len(tokenizer), patch_size, window_size, fullatt_block_indexes,
                                 vision_layers, text_layers, attn_implementation)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    return _finish_qwen(model, tokenizer, seed), processor
