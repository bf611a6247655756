"""Services the engine offers pruners through `ModelInfo` and the contexts: the image processor's
normalisation (`ModelInfo.pixel_mean` / ``pixel_std``, read by VFlowOpt) and the CLIP text tower
(`PreLLMContext.text_patch_similarity`, read by recoverable)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlavaForConditionalGeneration
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mllm_adapters import apply_pruner
from mllm_adapters.engine.processor_stats import pixel_stats
from mllm_adapters.engine.text_tower import ClipTextSimilarity, TextTowers
from pruners.base import ModelInfo
from pruners.recoverable import RecoverableCompression, llm_embedding_similarity, question_first_line
from pruners.registry import register_pruner
from pruners.vflowopt import VFlowOpt
from tests.conftest import PROMPTS, make_images


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def saved_tiny(tiny, tmp_path_factory):
    """The tiny LLaVA saved to a folder (no preprocessor_config.json yet)."""
    model, _ = tiny
    folder = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(folder)
    return folder


def _load(folder, config: dict | None) -> LlavaForConditionalGeneration:
    if config is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(config))
    return LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


# ---- pixel normalisation -------------------------------------------------------------------------
def test_openai_clip_constants_are_the_old_vflowopt_defaults():
    """The numbers VFlowOpt hard-coded before ModelInfo carried them: LLaVA results stay identical."""
    assert tuple(OPENAI_CLIP_MEAN) == (0.48145466, 0.4578275, 0.40821073)
    assert tuple(OPENAI_CLIP_STD) == (0.26862954, 0.26130258, 0.27577711)


def test_vflowopt_uses_the_models_pixel_stats(tiny, batch):
    model, _ = tiny
    with apply_pruner(model, "vflowopt", budget=8) as h:
        assert h.pruner.params["pixel_mean"] is None and h.pruner.params["pixel_std"] is None
        assert h.pruner.info.pixel_mean == tuple(OPENAI_CLIP_MEAN)
        assert h.pruner._pixel_mean == tuple(OPENAI_CLIP_MEAN)
        assert h.pruner._pixel_std == tuple(OPENAI_CLIP_STD)
    # with the entropy term on, the model's stats give exactly the old explicit constants' result
    with apply_pruner(model, "vflowopt", budget=8, alpha=0.5) as h:
        auto = _logits(model, batch)
    with apply_pruner(model, "vflowopt", budget=8, alpha=0.5, pixel_mean=list(OPENAI_CLIP_MEAN),
                      pixel_std=list(OPENAI_CLIP_STD)) as h:
        explicit = _logits(model, batch)
    assert torch.equal(auto, explicit)
    # an explicit value still overrides the model's
    with apply_pruner(model, "vflowopt", budget=8, alpha=0.5, pixel_mean=[0.5, 0.5, 0.5]) as h:
        assert h.pruner._pixel_mean == (0.5, 0.5, 0.5) and h.pruner._pixel_std == tuple(OPENAI_CLIP_STD)


def test_checkpoint_preprocessor_config_sets_model_info(saved_tiny):
    model = _load(saved_tiny, {"image_mean": [0.5, 0.25, 0.125], "image_std": [0.2, 0.3, 0.4]})
    with apply_pruner(model, "vflowopt", budget=8, alpha=0.5) as h:
        assert h.pruner.info.checkpoint_dir == str(saved_tiny)
        assert h.pruner.info.pixel_mean == (0.5, 0.25, 0.125)
        assert h.pruner.info.pixel_std == (0.2, 0.3, 0.4)
        assert h.pruner._pixel_mean == (0.5, 0.25, 0.125)
    # a key the file does not give keeps the processor default
    model = _load(saved_tiny, {"image_mean": [0.5, 0.5, 0.5]})
    with apply_pruner(model, "vflowopt", budget=8) as h:
        assert h.pruner.info.pixel_mean == (0.5, 0.5, 0.5) and h.pruner.info.pixel_std == tuple(OPENAI_CLIP_STD)


@pytest.mark.parametrize("config,words", [
    ({"image_mean": [0.5, 0.5, 0.5], "image_std": [0, 0, 0]}, ["image_std", "> 0"]),
    ({"image_mean": [0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, ["image_mean", "3 finite floats"]),
    ({"image_mean": [0.5, "x", 0.5]}, ["image_mean", "3 finite floats"]),
    ({"image_std": [0.5, math.inf, 0.5]}, ["image_std", "3 finite floats"]),
])
def test_damaged_preprocessor_config_is_a_clear_error(saved_tiny, config, words):
    (saved_tiny / "preprocessor_config.json").write_text(json.dumps(config))
    model = LlavaForConditionalGeneration.from_pretrained(saved_tiny).eval()
    with pytest.raises(ValueError) as exc:
        apply_pruner(model, "vflowopt", budget=8)
    msg = str(exc.value)
    assert "preprocessor_config.json" in msg and str(saved_tiny) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert not model._forward_pre_hooks


def test_pixel_stats_defaults_and_unreadable_file(tmp_path):
    d_mean, d_std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    assert pixel_stats(None, d_mean, d_std) == (d_mean, d_std)
    assert pixel_stats("llava-hf/llava-1.5-7b-hf", d_mean, d_std) == (d_mean, d_std)  # hub id: not a folder
    assert pixel_stats(str(tmp_path), d_mean, d_std) == (d_mean, d_std)  # folder without the file
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        pixel_stats(str(tmp_path), d_mean, d_std)


def test_vflowopt_without_known_stats_needs_the_parameter():
    info = ModelInfo(family="llava", num_visual_tokens=16, grid_hw=(4, 4), has_cls=True, vision_num_layers=4,
                     vision_feature_layer=2, vision_num_heads=4, llm_num_layers=4, llm_hidden_size=8)
    VFlowOpt(budget=4).attach(info)  # alpha=0: the pixels are never read
    with pytest.raises(ValueError, match="pixel_mean"):
        VFlowOpt(budget=4, alpha=0.5).attach(info)
    with pytest.raises(ValueError, match="pixel_std"):
        VFlowOpt(budget=4, alpha=0.5, pixel_mean=[0.5, 0.5, 0.5]).attach(info)
    p = VFlowOpt(budget=4, alpha=0.5, pixel_mean=[0.5, 0.5, 0.5], pixel_std=[0.5, 0.5, 0.5])
    p.attach(info)
    assert p._pixel_mean == p._pixel_std == (0.5, 0.5, 0.5)


# ---- CLIP text tower -----------------------------------------------------------------------------
def _save_text_tower(folder, tokenizer, vision_hidden: int, projection: bool = True) -> None:
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=32, projection_dim=16,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    CLIPTextModelWithProjection(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if projection:
        save_file({"weight": torch.randn(16, vision_hidden)}, str(folder / "visual_projection.safetensors"))


@pytest.fixture(scope="module")
def tower_folder(tiny, tmp_path_factory):
    model, processor = tiny
    folder = tmp_path_factory.mktemp("ckpt") / "text_tower"
    _save_text_tower(folder, processor.tokenizer, model.config.vision_config.hidden_size)
    return folder


def test_text_towers_service(tiny, tower_folder, tmp_path):
    model, _ = tiny
    towers = TextTowers()
    feats = torch.randn(2, 36, model.config.vision_config.hidden_size)
    texts = ["what is the colour ?", "how many ?"]
    called = []

    def texts_fn():
        called.append(1)
        return texts

    assert towers.similarity(None, None, feats, None, texts_fn) is None  # no tower: texts never asked for
    assert towers.similarity(None, str(tmp_path), feats, None, texts_fn) is None
    assert not called
    auto = towers.similarity(None, str(tower_folder.parent), feats, None, texts_fn)
    assert auto.folder == str(tower_folder) and auto.similarity.shape == (2, 36)
    explicit = towers.similarity(str(tower_folder), None, feats, None, lambda: texts)
    assert torch.equal(explicit.similarity, auto.similarity)
    assert towers.get(str(tower_folder)) is towers.get(str(tower_folder))  # loaded once
    ref = ClipTextSimilarity(str(tower_folder)).similarity(feats, None, [question_first_line(t) for t in texts])
    got = towers.similarity(str(tower_folder), None, feats, None, lambda: texts, question_first_line)
    assert torch.equal(got.similarity, ref)
    no_text = towers.similarity(str(tower_folder), None, feats, None, lambda: None)
    assert no_text.folder == str(tower_folder) and no_text.similarity is None
    with pytest.raises(ValueError, match="config.json"):
        towers.similarity(str(tmp_path), None, feats, None, lambda: texts)
    bare = tmp_path / "bare"
    _save_text_tower(bare, tiny[1].tokenizer, model.config.vision_config.hidden_size, projection=False)
    with pytest.raises(ValueError, match="visual_projection.safetensors"):
        towers.similarity(str(bare), None, feats, None, lambda: texts)


@register_pruner("_test_recoverable_direct_tower")
class _DirectTower(RecoverableCompression):
    """Recoverable with its text similarity computed as before the engine service: the tower loaded
    by the method itself from the folder, on ``ctx.question_texts()`` and ``ctx.vision_post_norm``."""

    def text_similarity(self, ctx):
        texts = ctx.question_texts()
        if texts is None:
            return llm_embedding_similarity(ctx, self.info.num_visual_tokens), {"text_similarity": "llm_embeddings"}
        tower = ClipTextSimilarity(self.params["text_tower"])
        sim = tower.similarity(ctx.features, ctx.vision_post_norm, [question_first_line(t) for t in texts])
        return sim, {"text_similarity": "clip_text_tower", "text_tower": self.params["text_tower"]}


def test_recoverable_through_the_service_matches_the_direct_tower(tiny, batch, tower_folder):
    model, processor = tiny
    outs = {}
    for method in ("recoverable", "_test_recoverable_direct_tower"):
        with apply_pruner(model, method, budget=12, text_tower=str(tower_folder), tokenizer=processor.tokenizer) as h:
            outs[method] = (_logits(model, batch), [k.clone() for k in h.kept_indices], dict(h.info))
    (a, ka, ia), (b, kb, ib) = outs.values()
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ka, kb))
    assert ia == ib and ia["text_similarity"] == "clip_text_tower" and ia["text_tower"] == str(tower_folder)


def test_recoverable_tower_without_question_text_says_why(tiny, tower_folder):
    model, processor = tiny
    inputs = processor(images=make_images(1), text=PROMPTS[:1], return_tensors="pt")
    with apply_pruner(model, "recoverable", budget=12, text_tower=str(tower_folder)) as h:  # no tokenizer
        _logits(model, inputs)
        assert h.info["text_similarity"] == "llm_embeddings"
        assert "tokenizer" in h.info["text_similarity_note"]
    with apply_pruner(model, "recoverable", budget=12, text_tower="llm_embeddings",
                      tokenizer=processor.tokenizer) as h:
        _logits(model, inputs)
        assert h.info["text_similarity"] == "llm_embeddings" and "text_similarity_note" not in h.info
