"""Configs, builders, fast forward paths and export of the embedded default model.

The model is a plain `LlavaForConditionalGeneration` (CLIP ViT with CLS, 192 px / 16 px patches =
12 x 12 = 144 visual tokens, features from ViT layer -2 with the 'default' strategy, an 8-layer Llama)
plus a `CLIPTextModelWithProjection` text tower trained contrastively with the ViT. The fast paths
here (`vision_features`, `llm_logits`) are exactly what LLaVA's forward does, split so that training
can freeze the tower and evaluation can prune the projected patch features before the LLM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from benchmarks.tasks.shapes import generator as G
from mllm_adapters.tiny import SPECIAL_TOKENS, make_llava_processor, make_word_tokenizer

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "embedded"
IMAGE_SIZE = G.IMAGE_SIZE  # 192
PATCH_SIZE = 16
GRID = IMAGE_SIZE // PATCH_SIZE  # 12
NUM_PATCHES = GRID * GRID  # 144
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
IMAGE_TOKEN = "<image>"
EOS_TOKEN = "</s>"
# CLIP normalisation, identical to CLIPImageProcessor's defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def make_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """The word-level tokenizer over the shapes vocabulary (ids 0..4 are SPECIAL_TOKENS)."""
    return make_word_tokenizer(G.vocabulary(), padding_side=padding_side)


def vision_config() -> CLIPVisionConfig:
    """CLIP ViT: 192 px, 16 px patches (144 + CLS), hidden 128, 4 layers, 4 heads."""
    return CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        projection_dim=128,
    )


def text_tower_config(vocab_size: int) -> CLIPTextConfig:
    """CLIP text tower: hidden 128, 2 layers; pooled at the first </s> (eos id 3)."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        projection_dim=128,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
    )


LLM_HEAD_DIM = 32
LLM_HEADS = 4  # default LLM size; --llm-heads / --llm-mlp of train.py grow it
LLM_MLP = 384


def llava_config(vocab_size: int, heads: int = LLM_HEADS, mlp: int = LLM_MLP) -> LlavaConfig:
    """LLaVA config: the ViT above, feature layer -2 ('default' drops CLS), 8-layer Llama (hidden 128,
    ``heads`` attention heads of dimension 32, MLP width ``mlp``)."""
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=mlp,
        num_hidden_layers=8,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=LLM_HEAD_DIM,
        max_position_embeddings=512,
        rope_theta=10000.0,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config(),
        text_config=text,
        image_token_id=SPECIAL_TOKENS.index(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """[B, 3, 192, 192] CLIP-normalised pixels, equal to the processor's for 192 px RGB images
    (checked by tests) but without its per-image overhead."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0  # [B,H,W,3]
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)  # [B, 3, H, W]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def vision_hidden(vision_tower, pixels: torch.Tensor, output_attentions: bool = False):
    """Run the CLIP tower with all hidden states (and attentions when asked)."""
    return vision_tower(pixel_values=pixels, output_hidden_states=True, output_attentions=output_attentions)


def vision_features(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 144, D_llm] projected patch features: hidden_states[-2] without CLS -> projector (LLaVA)."""
    out = vision_hidden(model.model.vision_tower, pixels)
    feats = out.hidden_states[model.config.vision_feature_layer][:, 1:]  # [B, 144, Dv]
    return model.model.multi_modal_projector(feats)


def llm_logits(
    model: LlavaForConditionalGeneration,
    image_feats: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """[B, L, V] logits of the LLM on ``input_ids`` whose image-token run holds exactly
    ``image_feats.shape[1]`` placeholders per row (image_feats: [B, k, D_llm], raster order).

    Position ids follow the attention mask (left padding allowed), as in `generate`.
    """
    counts = (input_ids == model.config.image_token_id).sum(1)  # [B]
    if not bool((counts == image_feats.shape[1]).all()):
        raise ValueError(
            f"each row of input_ids must hold {image_feats.shape[1]} image tokens, got {counts.tolist()}"
        )
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
    return llm_forward(model, image_feats.flatten(0, 1), input_ids, attention_mask, position_ids).logits


def llm_forward(
    model: LlavaForConditionalGeneration,
    image_feats: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    output_attentions: bool = False,
):
    """The LLM on ``input_ids`` with its image placeholders filled, in row-major order, by
    ``image_feats`` ([total placeholders, D_llm]: rows may hold different counts, as in token-dropout
    training). Returns the language model's output with ``logits`` ([B, L, V]) added."""
    embeds = model.get_input_embeddings()(input_ids)  # [B, L, D]
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1)  # [B, L, 1]
    embeds = embeds.masked_scatter(mask, image_feats.to(embeds.dtype))
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                     position_ids=position_ids, output_attentions=output_attentions)
    out.logits = model.lm_head(out.last_hidden_state)
    return out


def build_llava(seed: int = 0, heads: int = LLM_HEADS, mlp: int = LLM_MLP) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised embedded LLaVA (fp32) and its processor (LLM sizes as in `llava_config`)."""
    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = llava_config(len(tok), heads, mlp)
    model = LlavaForConditionalGeneration(cfg)
    return model, make_llava_processor(tok, IMAGE_SIZE, PATCH_SIZE)


def build_text_tower(seed: int = 0) -> CLIPTextModelWithProjection:
    tok = make_tokenizer()
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(text_tower_config(len(tok)))


def export(
    model: LlavaForConditionalGeneration,
    text_tower: CLIPTextModelWithProjection,
    visual_projection: torch.Tensor,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Save a loadable model folder: LLaVA (safetensors, ``dtype``), processor, ``prunebench.json``,
    and ``text_tower/`` (CLIPTextModelWithProjection + tokenizer + ``visual_projection.safetensors``,
    the [proj_dim, Dv] matrix mapping the ViT's pooled CLS output into the shared embedding space)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = model.to(dtype)
    m.generation_config.pad_token_id = SPECIAL_TOKENS.index("<pad>")
    m.generation_config.eos_token_id = SPECIAL_TOKENS.index("</s>")
    m.generation_config.bos_token_id = SPECIAL_TOKENS.index("<s>")
    m.save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    tok = make_tokenizer()
    make_llava_processor(tok, IMAGE_SIZE, PATCH_SIZE).save_pretrained(out)
    meta = {
        "prompt_template": PROMPT_TEMPLATE,
        "answer_end_token": EOS_TOKEN,
        "max_new_tokens": 2,
        "task": "shapes",
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "grid_hw": [GRID, GRID],
        "text_tower": "text_tower",
    }
    (out / "prunebench.json").write_text(json.dumps(meta, indent=2) + "\n")
    tt = out / "text_tower"
    text_tower.to(dtype).save_pretrained(tt, safe_serialization=True)
    text_tower.to(torch.float32)
    make_tokenizer(padding_side="right").save_pretrained(tt)
    save_file({"weight": visual_projection.detach().to(dtype).contiguous()}, str(tt / "visual_projection.safetensors"))
    return out


def load(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """(model, processor, prunebench meta) from ``path`` (default: the shipped asset folder)."""
    from transformers import AutoProcessor

    p = Path(path) if path is not None else ASSET_DIR
    model = LlavaForConditionalGeneration.from_pretrained(p, dtype=dtype, attn_implementation=attn_implementation)
    processor = AutoProcessor.from_pretrained(p)
    meta = json.loads((p / "prunebench.json").read_text())
    return model.eval(), processor, meta
