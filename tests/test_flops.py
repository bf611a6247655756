"""Analytic prefill FLOPs (benchmarks.flops) against torch's FlopCounterMode and published tables.

LLaVA-1.5 on `tiny` (conftest), LLaVA-NeXT on `build_tiny_llava_next` (32 px tiles of 8 px patches): a
40 x 60 px image gives 5 tiles and a 70-token packed run, a 30 x 80 px one 3 tiles and 52 tokens.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from benchmarks.flops import (
    equiv_tokens,
    fastv_convention_tflops,
    llm_prefill_flops,
    prefill_flops,
    reference_counts,
    vision_flops,
)
from mllm_adapters import apply_pruner
from mllm_adapters.families.llava_next import image_layout
from mllm_adapters.handle import TokenCounts
from mllm_adapters.tiny import build_tiny_llava_next
from pruners import available_pruners, get_pruner_class
from tests._adapter_helpers import counted_flops, text_tokens
from tests.conftest import PROMPTS, make_images, random_images

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


def test_unhooked_tiny_model_matches_flop_counter(tiny):
    """No pruner attached: every ViT layer runs on all tokens; GQA (4 q / 2 kv heads) in the LLM."""
    model, processor = tiny
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads
    inputs = processor(images=make_images(1), text=PROMPTS[:1], return_tensors="pt")
    measured = counted_flops(model, inputs)
    analytic = prefill_flops(model.config, text_tokens(model, inputs, 0)).total
    assert abs(analytic - measured) / measured < 0.01


METHODS = [m for m in available_pruners() if not m.startswith("_")]


def attach(model, method: str, budget, tokenizer):
    """Attach ``method`` as the conformance suite does (its ``conformance_params``: gsearch's depth-scaled
    schedule); None, after checking the refusal, for a method that refuses every model it has no files
    for (``conformance_opt_outs["*"]``: dyvte without router weights; its FLOPs are checked on the
    embedded model in tests/test_dyvte.py)."""
    cls = get_pruner_class(method)
    if "*" in cls.conformance_opt_outs:
        with pytest.raises(ValueError, match=method):
            apply_pruner(model, method, budget=budget, seed=0, tokenizer=tokenizer)
        return None
    return apply_pruner(model, method, budget=budget, seed=0, tokenizer=tokenizer, **cls.conformance_params)


@pytest.mark.parametrize("method", METHODS)
def test_pruned_tiny_model_matches_flop_counter(tiny, method):
    """Every registered method (vision, pre-LLM, in-LLM, merging): the analytic count from the
    handle's actual per-layer token counts plus the pruner's own overhead equals FlopCounterMode."""
    model, processor = tiny
    budget = None if method == "none" else 12
    inputs = processor(images=make_images(1), text=PROMPTS[:1], return_tensors="pt")
    handle = attach(model, method, budget, processor.tokenizer)
    if handle is None:
        return
    try:
        handle.count_overhead_flops = True
        measured = counted_flops(model, inputs)
        (counts,) = handle.token_counts
        f = prefill_flops(model.config, text_tokens(model, inputs, 0), counts,
                          overhead=handle.overhead_flops)
    finally:
        handle.remove()
    assert abs(f.total - measured) / measured < 0.01, (f.as_dict(), measured)
    if budget is not None:
        unpruned = prefill_flops(model.config, text_tokens(model, inputs, 0),
                                 TokenCounts(vision=counts.reference_vision)).total
        assert counts.reference_vision == [[counts.vision[0][0]] * len(counts.vision[0])]
        assert f.total - f.overhead < unpruned  # pruning must show up in the count
        assert min(counts.llm_visual) <= budget
        e = equiv_tokens(counts, model.config.text_config.num_hidden_layers, N_VIS)
        assert budget <= e < N_VIS


def test_llm_layer_count_mismatch_is_a_clear_error():
    cfg = llava_15_7b_config().text_config
    with pytest.raises(ValueError, match="32 decoder layers"):
        llm_prefill_flops(cfg, [576] * 31)
    with pytest.raises(ValueError, match="convention"):
        llm_prefill_flops(cfg, [576] * 32, convention="paper")


# ---- LLaVA-NeXT (anyres): every tile through the ViT, the image's own packed run in the LLM --------
NEXT_SIZES = [(40, 60), (30, 80)]  # (height, width) px
NEXT_TILES, NEXT_PACKED = [5, 3], [70, 52]
NEXT_METHODS = METHODS  # flowcut included: the vision stage runs per tile


@pytest.fixture(scope="module")
def nxt():
    return build_tiny_llava_next(seed=0, attn_implementation="eager")


def _next_inputs(processor, images, i: int | None = None):
    """Processor outputs of image ``i`` alone (or of both, left-padded, when ``i`` is None)."""
    sel = slice(None) if i is None else slice(i, i + 1)
    return processor(images=images[sel], text=PROMPTS[sel], return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def next_images():
    return random_images(NEXT_SIZES, 0)


@pytest.mark.parametrize("i", [0, 1])
def test_unhooked_tiny_next_matches_flop_counter(nxt, next_images, i):
    """The untouched LLaVA-NeXT model (what `reference_counts` describes): every ViT layer on every tile,
    the projector on every tile's patches (before unpadding), the LLM on text + the packed run."""
    model, processor = nxt
    inputs = _next_inputs(processor, next_images, i)
    lay = image_layout(NEXT_SIZES[i], model.config.image_grid_pinpoints, 32, 4)
    assert (lay.n_tiles, lay.n_packed) == (NEXT_TILES[i], NEXT_PACKED[i])
    measured = counted_flops(model, inputs)
    counts = reference_counts(model.config, TokenCounts(views=lay.n_tiles, visual_in=lay.n_packed))
    f = prefill_flops(model.config, text_tokens(model, inputs, 0), counts)
    assert abs(f.total - measured) / measured < 0.01, (f.as_dict(), measured)
    assert f.vision == NEXT_TILES[i] * vision_flops(model.config.vision_config)  # one tower pass per tile
    # A single-tile count (the LLaVA-1.5 shape the runner used to assume) misses most of the work.
    one_tile = prefill_flops(model.config, text_tokens(model, inputs, 0),
                             TokenCounts(llm_visual=[16] * 4))
    assert one_tile.total < 0.8 * measured


@pytest.mark.parametrize("method", NEXT_METHODS)
@pytest.mark.parametrize(("i", "budget"), [(0, 30), (1, 60)])  # below the image's run / above it
def test_pruned_tiny_next_matches_flop_counter(nxt, next_images, method, i, budget):
    """Every method the NeXT adapter runs: the handle's counts for this sample (`TokenCounts`) plus the
    pruner's overhead equal FlopCounterMode, once the inert slots the adapter computes to pad a run to
    the method's largest kept count are added (``batch_counts.llm_visual_width``), and for FlowCut the
    padding of its tiles to the widest one in the ViT (``batch_counts.vision_width``, tokens per tile row). Neither is counted in the
    reported figure (they are artifacts of the padding, like batch padding)."""
    model, processor = nxt
    budget = None if method == "none" else budget
    inputs = _next_inputs(processor, next_images, i)
    n_text = text_tokens(model, inputs, 0)
    handle = attach(model, method, budget, processor.tokenizer)
    if handle is None:
        return
    try:
        handle.count_overhead_flops = True
        measured = counted_flops(model, inputs)
        (c,) = handle.token_counts
        batch = handle.batch_counts
        overhead = handle.overhead_flops
    finally:
        handle.remove()
    assert c.views == NEXT_TILES[i] and c.visual_in == NEXT_PACKED[i]
    computed = dataclasses.replace(c, llm_visual=batch.llm_visual_width or c.llm_visual)
    if c.vision is not None:  # each tile that ran, at the padded width the batch computed
        computed = dataclasses.replace(computed, vision=[batch.vision_width] * len(c.vision))
    f_computed = prefill_flops(model.config, n_text, computed, overhead=overhead)
    assert abs(f_computed.total - measured) / measured < 0.01, (f_computed.as_dict(), measured, c)
    f = prefill_flops(model.config, n_text, c, overhead=overhead)
    assert (f.projector, f.overhead) == (f_computed.projector, f_computed.overhead)
    assert f.vision <= f_computed.vision and f.llm <= f_computed.llm
    assert f.vision == f_computed.vision or "vision" in get_pruner_class(method).stages
    ref = prefill_flops(model.config, n_text, reference_counts(model.config, c))
    if budget is None:
        assert f.as_dict() == ref.as_dict()  # the untouched model is its own reference
        return
    assert max(c.llm_visual) <= NEXT_PACKED[i]  # real tokens only, never more than the image has
    if budget < NEXT_PACKED[i]:
        assert min(c.llm_visual) <= budget
        assert f.total - f.overhead < ref.total  # pruning must show up in the count
    elif "llm" not in get_pruner_class(method).stages:
        assert c.llm_visual == [NEXT_PACKED[i]] * 4  # within budget: the image reaches the LLM whole


def test_sample_counts_of_a_ragged_next_batch(nxt, next_images):
    """A batch of the two images: each sample's figures are its own (tiles, run, kept tokens), and the
    sum over the batch equals the two single-image counts."""
    model, processor = nxt
    batch = _next_inputs(processor, next_images)
    with apply_pruner(model, "random", budget=30, seed=0) as handle, torch.inference_mode():
        model(**batch, logits_to_keep=1)
        per = list(handle.token_counts)
    assert [c.views for c in per] == NEXT_TILES and [c.visual_in for c in per] == NEXT_PACKED
    assert [c.llm_visual for c in per] == [[30] * 4, [30] * 4] and [c.projector for c in per] == [30, 30]
    for b, c in enumerate(per):
        with apply_pruner(model, "random", budget=30, seed=0) as handle, torch.inference_mode():
            model(**_next_inputs(processor, next_images, b), logits_to_keep=1)
            (alone,) = handle.token_counts
        assert c == alone
        assert prefill_flops(model.config, 10, c).as_dict() == prefill_flops(model.config, 10, alone).as_dict()
