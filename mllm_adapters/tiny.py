"""Tiny LLaVA models built from configs, with an offline word-level tokenizer and processor.

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
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]

TINY_WORDS = (
    "USER ASSISTANT : ? . , what is the colour shape of a an object at row column how many are there "
    "left right red green blue yellow purple orange circle square triangle yes no zero one two three four "
    "five six seven eight nine describe image"
).split()


def make_word_tokenizer(words: list[str], padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over `words` plus <pad> <unk> <s> </s> <image> (ids 0..4).

    `<image>` is a special added token, so LlavaProcessor's run of `<image><image>...` splits into
    one id per placeholder without spaces.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
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
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


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
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=SPECIAL_TOKENS.index("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    cfg._attn_implementation = attn_implementation
    cfg.text_config._attn_implementation = attn_implementation
    cfg.vision_config._attn_implementation = attn_implementation
    return cfg


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
    # Random init gives near-uniform attention; sharpen it so pruning choices are not ties.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
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
    with torch.no_grad():  # sharpen attention as in build_tiny_llava (image_newline is 1-D: drawn too)
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("image_newline"):
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = None
    return model, processor
