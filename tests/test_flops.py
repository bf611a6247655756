"""Analytic prefill FLOPs (benchmarks.flops) against torch's FlopCounterMode and published tables."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from benchmarks.flops import equiv_tokens, fastv_convention_tflops, llm_prefill_flops, prefill_flops
from pruners import apply_pruner, available_pruners
from tests.conftest import PROMPTS, make_images

N_VIS = 36


def llava_15_7b_config() -> LlavaConfig:
    """LLaVA-1.5-7B's architecture built in code (no download): CLIP ViT-L/14-336 + Vicuna-7B."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    return LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_token_id=32000)


def test_llava_15_7b_fastv_convention_reproduces_published_tables():
    text = llava_15_7b_config().text_config
    got = [round(fastv_convention_tflops(text, n), 3) for n in (576, 192, 128, 64)]
    assert got == [2.986, 0.976, 0.649, 0.323]
    got3 = [round(fastv_convention_tflops(text, n, convention="sparsevlm"), 3) for n in (576, 192, 128, 64)]
    assert got3 == [3.817, 1.253, 0.833, 0.416]


def test_llava_15_7b_real_count_is_about_twice_the_multiply_adds():
    """2 FLOPs per multiply-add and SwiGLU's third matrix: the real count of 576 visual tokens exceeds
    twice FastV's 2ndm count by exactly the third FFN matrix (no GQA in Vicuna-7B, no LM head)."""
    cfg = llava_15_7b_config().text_config
    real = llm_prefill_flops(cfg, [576] * 32, lm_head=False)
    d, m = 4096, 11008
    assert real == 2 * llm_prefill_flops(cfg, [576] * 32, convention="fastv") + 2 * 32 * 576 * d * m
    # With ~60 text tokens the full prefill lands near the 8.5 TFLOPs Recoverable Compression reports.
    full = prefill_flops(llava_15_7b_config(), n_text=60).total / 1e12
    assert 8.0 < full < 9.5


def _counted(model, inputs) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(**inputs, logits_to_keep=1)
    return counter.get_total_flops()


def _n_text(inputs, b: int, image_token_id: int) -> int:
    return int(inputs["attention_mask"][b].sum()) - int((inputs["input_ids"][b] == image_token_id).sum())


def test_unhooked_tiny_model_matches_flop_counter(tiny):
    """No pruner attached: every ViT layer runs on all tokens; GQA (4 q / 2 kv heads) in the LLM."""
    model, processor = tiny
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads
    inputs = processor(images=make_images(1), text=PROMPTS[:1], return_tensors="pt")
    measured = _counted(model, inputs)
    analytic = prefill_flops(model.config, _n_text(inputs, 0, model.config.image_token_id)).total
    assert abs(analytic - measured) / measured < 0.01


METHODS = [m for m in available_pruners() if not m.startswith("_")]


@pytest.mark.parametrize("method", METHODS)
def test_pruned_tiny_model_matches_flop_counter(tiny, method):
    """Every registered method (vision, pre-LLM, in-LLM, merging): the analytic count from the
    handle's actual per-layer token counts plus the pruner's own overhead equals FlopCounterMode."""
    model, processor = tiny
    budget = None if method == "none" else 12
    inputs = processor(images=make_images(1), text=PROMPTS[:1], return_tensors="pt")
    handle = apply_pruner(model, method, budget=budget, seed=0, tokenizer=processor.tokenizer)
    try:
        handle.count_overhead_flops = True
        measured = _counted(model, inputs)
        counts = dict(handle.token_counts)
        f = prefill_flops(model.config, _n_text(inputs, 0, model.config.image_token_id), counts,
                          overhead=handle.overhead_flops)
    finally:
        handle.remove()
    assert abs(f.total - measured) / measured < 0.01, (f.as_dict(), measured)
    if budget is not None:
        unpruned = prefill_flops(model.config, _n_text(inputs, 0, model.config.image_token_id),
                                 {"vision": [counts["vision"][0]] * len(counts["vision"])}).total
        assert f.total - f.overhead < unpruned  # pruning must show up in the count
        assert min(counts["llm_visual"]) <= budget
        e = equiv_tokens(counts, model.config.text_config.num_hidden_layers, N_VIS)
        assert budget <= e < N_VIS


def test_llm_layer_count_mismatch_is_a_clear_error():
    cfg = llava_15_7b_config().text_config
    with pytest.raises(ValueError, match="32 decoder layers"):
        llm_prefill_flops(cfg, [576] * 31)
    with pytest.raises(ValueError, match="convention"):
        llm_prefill_flops(cfg, [576] * 32, convention="paper")
