"""Qwen3-VL on the engine (`mllm_adapters/families/qwen3_vl.py`), DeepStack included.

Beyond the conformance suite, on the tiny Qwen3-VL built from config (`mllm_adapters/tiny_qwen3_vl.py`:
three DeepStack levels added after decoder layers 0, 1, 2 of 4), with images of different sizes (8 and
12 merged units) and left padding:

- keep-all = the unpruned model, bitwise;
- pre-LLM = the unpruned model fed exactly the kept units, at their ORIGINAL M-RoPE positions, with the
  DeepStack features of those units (the model's own, for each level); also with the real model's 16 px
  patches; a merged token (pooling) gets no DeepStack feature;
- in-LLM pruning at a layer K <= the last injection layer keeps every injection aligned with the
  surviving tokens: equal to a layer-by-layer reference that drops the columns at K and adds each level
  to the kept visual tokens only;
- a batch of two different-size images equals each alone; a sample with two images (pre-LLM methods)
  next to one with none equals each alone, and in-LLM methods refuse it clearly;
- cached generate() = greedy decoding by full recompute;
- refusals (ValueError naming the method): CLS methods, the vision stage, compact positions; video;
- prefill FLOPs = FlopCounterMode exactly, with and without pruning.

Every test runs on the dense model and on its MoE variant (`Qwen3VLMoeForConditionalGeneration`, decoder
layers 0-2 mixtures of 4 experts, 2 per token, layer 3 dense; `mllm_adapters/families/qwen3_vl_moe.py`),
which shares the dense spec's hooks; its FLOPs tests also check the router and routed-expert count.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

import tests._adapter_helpers  # noqa: F401  (registers the test-only `_test_fixed_llm` pruner)
from benchmarks.flops import prefill_flops, reference_counts
from benchmarks.models import family_spec
from mllm_adapters import apply_pruner
from mllm_adapters.families.qwen3_vl import Qwen3VLSpec, deepstack_in_sequence
from mllm_adapters.families.qwen3_vl_moe import Qwen3VLMoeSpec, is_sparse_layer
from mllm_adapters.handle import TokenCounts
from mllm_adapters.registry import family_of_class
from mllm_adapters.tiny import TINY_QWEN_IMAGE
from mllm_adapters.tiny_qwen3_vl import build_tiny_qwen3_vl, tiny_qwen3_vl_config
from tests._adapter_helpers import (
    assert_refused,
    assert_video_refused,
    cached_and_recomputed,
    counted_flops,
    text_tokens,
)
from tests.conftest import random_images

SIZES = [(40, 60), (64, 48)]  # (height, width) px -> 2 x 4 and 4 x 3 merged units
UNITS = [(2, 4), (4, 3)]
PROMPTS = [f"USER: {TINY_QWEN_IMAGE} what is the colour of the circle ? ASSISTANT:",
           f"USER: {TINY_QWEN_IMAGE} how many ? ASSISTANT:"]


@pytest.fixture(scope="module", params=["dense", "moe"])
def q3(request):
    """(model, processor, images) of the tiny Qwen3-VL, or of its MoE variant, images of `SIZES`."""
    torch.set_num_threads(1)
    model, processor = build_tiny_qwen3_vl(seed=0, moe=request.param == "moe")
    # FlopCounterMode has no formula for the default grouped_mm experts (it counts them as 0 FLOPs): the eager
    # per-expert loop computes the same thing with plain matmuls it counts
    if request.param == "moe":
        model.config.text_config._experts_implementation = "eager"
    images = random_images(SIZES, 0)
    return model, processor, images


def enc(q3, idx, prompts=PROMPTS, per_sample=None):
    _, processor, images = q3
    per_sample = per_sample or [[i] for i in range(len(prompts))]
    imgs = [images[i] for s in idx for i in per_sample[s]]
    return processor(images=imgs or None, text=[prompts[s] for s in idx], return_tensors="pt", padding=True)


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def generate(model, x, steps=3):
    with torch.no_grad():
        return model.generate(**x, max_new_tokens=steps, do_sample=False)[:, -steps:]


def own_features(model, x):
    """(per image [n, Dt] main features, per level per image [n, Dt] DeepStack features) of the model."""
    with torch.no_grad():
        out = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"])
    return list(out.pooler_output), [list(level) for level in out.deepstack_features]


def kept_units_reference(model, x, kept: torch.Tensor, deepstack: bool = True) -> torch.Tensor:
    """Last-token logits of the unpruned model on sample x (one image) holding only the units ``kept``, each
    at its own M-RoPE position, with (``deepstack``) each level's features of exactly those units."""
    feats, levels = own_features(model, x)
    pos, _ = model.model.get_rope_index(x["input_ids"], x["mm_token_type_ids"], image_grid_thw=x["image_grid_thw"],
                                        attention_mask=x["attention_mask"])
    ids = x["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero()[:, 0]
    cols = torch.cat([(ids != model.config.image_token_id).nonzero()[:, 0], img[kept]]).sort().values
    ds = [lv[0][kept] if deepstack else torch.zeros_like(lv[0][kept]) for lv in levels]
    feed = BaseModelOutputWithDeepstackFeatures(pooler_output=(feats[0][kept],), deepstack_features=[(d,) for d in ds])
    with torch.no_grad():
        return model(input_ids=ids[cols][None], attention_mask=torch.ones(1, len(cols), dtype=torch.long),
                     position_ids=pos[:, :, cols], mm_encoder_outputs={"image": feed}).logits[0, -1]


# ---- the tiny model itself --------------------------------------------------------------------------------
def test_tiny_model_has_deepstack_and_its_config_is_the_builders(q3):
    model, _, _ = q3
    cfg = model.config
    spec = family_spec(cfg)
    moe = spec is Qwen3VLMoeSpec
    assert type(model).__name__ == ("Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration")
    assert list(cfg.vision_config.deepstack_visual_indexes) == [0, 1, 2] and cfg.text_config.num_hidden_layers == 4
    assert len(model.model.visual.deepstack_merger_list) == 3
    built = tiny_qwen3_vl_config(cfg.text_config.vocab_size, moe=moe).to_dict()
    assert spec.tiny_config().to_dict() == built
    assert {**spec.tiny_config().to_dict(), "text_config": None} == {**cfg.to_dict(), "text_config": None}
    if moe:
        sparse = [type(layer.mlp).__name__ == "Qwen3VLMoeTextSparseMoeBlock" for layer in model.model.language_model.layers]
        assert sparse == [is_sparse_layer(cfg.text_config, i) for i in range(4)] == [True, True, True, False]
    x = enc(q3, [0, 1])
    assert (x["input_ids"] == cfg.image_token_id).sum(1).tolist() == [8, 12]
    assert x["pixel_values"].shape == (4 * (8 + 12), 3 * 2 * 8 * 8)
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        tiny_qwen3_vl_config(60, deepstack_visual_indexes=(0, 1, 2, 3))  # 4 levels need > 4 decoder layers


def test_keep_all_equals_unpruned(q3):
    model = q3[0]
    x = enc(q3, [0, 1])
    ref = logits(model, x)
    for budget in (None, family_spec(model.config).max_visual_tokens(model.config)):
        with apply_pruner(model, "none", budget=budget) as h:
            assert torch.equal(logits(model, x), ref)
            assert [k.tolist() for k in h.kept_indices] == [list(range(8)), list(range(12))]


# ---- pre-LLM: the model on the kept units, DeepStack features included -----------------------------------
@pytest.mark.parametrize("method", ["random", "divprune", "cdpruner"])
def test_pre_llm_equals_model_on_kept_units_with_their_deepstack(q3, method):
    model = q3[0]
    x = enc(q3, [1])
    with apply_pruner(model, method, budget=4) as h:
        out = logits(model, x)[0, -1]
        (kept,) = h.kept_indices
    assert len(kept) == 4
    ref = kept_units_reference(model, x, kept)
    assert (out - ref).abs().max() <= 1e-5
    # DeepStack matters: without the kept units' level features the model gives something else
    assert (out - kept_units_reference(model, x, kept, deepstack=False)).abs().max() > 1e-3


def test_pre_llm_feeds_each_levels_features_of_the_kept_units_and_zeros_for_merged_tokens(q3):
    model = q3[0]
    x = enc(q3, [0, 1])
    _, levels = own_features(model, x)
    seen = []

    def fed(method):  # what the engine hands the model (a hook registered after the engine's own)
        with apply_pruner(model, method, budget=3) as h:
            hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["mm_encoder_outputs"]["image"]),
                                                   with_kwargs=True)
            try:
                logits(model, x)
            finally:
                hook.remove()
            return seen[-1], [k.clone() for k in h.kept_indices]

    (fed_random, kept), (fed_pool, _) = fed("random"), fed("pooling")
    assert len(fed_random.deepstack_features) == 3
    for level, mine in zip(fed_random.deepstack_features, levels):
        for b in range(2):
            assert torch.allclose(level[b], mine[b][kept[b]], atol=1e-6)
    for level in fed_pool.deepstack_features:  # pooled tokens are merged: no unit, no DeepStack feature
        assert all(lv.shape == f.shape and not lv.any() for lv, f in zip(level, fed_pool.pooler_output))


def test_pre_llm_with_the_real_models_16px_patches():
    """The 8B's patch size (16 px, 32 px units): pixel rows of 3*2*16*16, the spec's layout and DeepStack
    hold as with the tiny 8 px patches."""
    torch.set_num_threads(1)
    model, processor = build_tiny_qwen3_vl(seed=1, patch_size=16, min_pixels=64 * 64, max_pixels=128 * 128)
    image = Image.fromarray(np.random.RandomState(3).randint(0, 255, (96, 128, 3), dtype=np.uint8))
    x = processor(images=[image], text=[PROMPTS[0]], return_tensors="pt")
    assert x["image_grid_thw"].tolist() == [[1, 6, 8]] and x["pixel_values"].shape[1] == 3 * 2 * 16 * 16
    with apply_pruner(model, "divprune", budget=5) as h:
        out = logits(model, x)[0, -1]
        (kept,) = h.kept_indices
    assert len(kept) == 5
    assert (out - kept_units_reference(model, x, kept)).abs().max() <= 1e-5


# ---- in-LLM: the injections follow the surviving tokens -------------------------------------------------
def layerwise_reference(model, x, K: int, keep: torch.Tensor, aligned: bool = True) -> torch.Tensor:
    """Last-token logits of the model run decoder layer by decoder layer on sample x (one image, no
    padding): every token through layers < K, then only the text and the visual tokens ``keep`` (their
    original positions); after layer i < levels, level i's feature of each surviving visual token is added
    to it (``aligned=False``: no injection after the drop, what a misaligned model would give)."""
    lm = model.model.language_model
    feats, levels = own_features(model, x)
    ids = x["input_ids"]
    vis = ids[0] == model.config.image_token_id  # [L]
    with torch.no_grad():
        hs = lm.embed_tokens(ids).clone()
        hs[0, vis] = feats[0]
        pos, _ = model.model.get_rope_index(ids, x["mm_token_type_ids"], image_grid_thw=x["image_grid_thw"],
                                            attention_mask=x["attention_mask"])
        cos, sin = lm.rotary_emb(hs, pos)
        L = ids.shape[1]
        mask = torch.full((L, L), torch.finfo(hs.dtype).min).triu(1)[None, None]  # [1, 1, L, L] causal
        unit = torch.full((L,), -1, dtype=torch.long)
        unit[vis] = torch.arange(int(vis.sum()))  # the unit of each visual column
        for i, layer in enumerate(lm.layers):
            if i == K:
                cols = ((~vis) | torch.isin(unit, keep)).nonzero()[:, 0]
                hs, cos, sin, unit = hs[:, cols], cos[:, cols], sin[:, cols], unit[cols]
                mask = mask[:, :, cols][..., cols]
            hs = layer(hs, attention_mask=mask, position_embeddings=(cos, sin))
            if i < len(levels) and (aligned or i < K):
                at = unit >= 0
                hs[0, at] = hs[0, at] + levels[i][0][unit[at]]
        return model.lm_head(lm.norm(hs))[0, -1]


@pytest.mark.parametrize("K", [1, 2, 3])
def test_in_llm_pruning_before_the_last_injection_keeps_deepstack_aligned(q3, K):
    model = q3[0]
    x = enc(q3, [1])
    keep = torch.tensor([0, 3, 5, 6, 10])
    with apply_pruner(model, "_test_fixed_llm", budget=5, layer=K, keep=keep.tolist()) as h:
        out = logits(model, x)[0, -1]
        assert h.kept_by_layer[K][0].tolist() == keep.tolist()
    ref = layerwise_reference(model, x, K, keep)
    assert (out - ref).abs().max() <= 1e-5
    unpruned = layerwise_reference(model, x, 99, keep)  # K beyond the last layer: nothing dropped
    assert torch.allclose(unpruned, logits(model, x)[0, -1], atol=1e-5)  # the reference is the model's own
    if K <= 2:  # injections after the drop: dropping them instead gives another result
        assert (out - layerwise_reference(model, x, K, keep, aligned=False)).abs().max() > 1e-3


def test_deepstack_in_sequence_reads_the_current_columns():
    mask = torch.tensor([[False, True, True, False], [True, False, True, True]])
    embeds = torch.arange(5.0)[:, None]  # rows 0, 1 of sample 0; 2, 3, 4 of sample 1
    cols = torch.tensor([[0, 2, 3, 4], [0, 3, 1, 9]])  # 4 and 9: merged tokens (virtual columns)
    new_mask, rows = deepstack_in_sequence(mask, embeds, cols)
    assert new_mask.tolist() == [[False, True, False, False], [True, True, False, False]]
    assert rows[:, 0].tolist() == [1.0, 2.0, 4.0]


# ---- batches: different sizes, two images in a sample, none ------------------------------------------------
@pytest.mark.parametrize("method,params", [("random", {}), ("pooling", {}), ("fastv", {"layer": 1}),
                                           ("pdrop", {}), ("sparsevlm", {})])
def test_batch_of_two_sizes_equals_two_batches_of_one(q3, method, params):
    model = q3[0]
    x = enc(q3, [0, 1])
    with apply_pruner(model, method, budget=4, **params) as h:
        both = logits(model, x)[:, -1]
        kept = [k.clone() for k in h.kept_indices]
        gen = generate(model, x)
        for i in range(2):
            one = enc(q3, [i])
            assert (logits(model, one)[0, -1] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept[i])
            assert torch.equal(generate(model, one)[0], gen[i])


@pytest.mark.parametrize("method", ["random", "divprune", "pooling", "fastv"])
def test_two_images_in_a_sample_and_none(q3, method):
    model = q3[0]
    prompts = [f"USER: {TINY_QWEN_IMAGE} {TINY_QWEN_IMAGE} what is the colour ? ASSISTANT:",
               "USER: how many ? ASSISTANT:", PROMPTS[1]]
    per_sample = [[0, 1], [], [1]]
    with apply_pruner(model, method, budget=4) as h:
        samples = [0, 1, 2]  # fastv (in-LLM) ranks both images' tokens of sample 0 together
        x = enc(q3, samples, prompts, per_sample)
        both = logits(model, x)[:, -1]
        kept = [k.clone() for k in h.kept_indices]
        assert len(kept) == sum(len(per_sample[s]) for s in samples)  # one entry per image
        j = 0
        for i, s in enumerate(samples):
            one = logits(model, enc(q3, [s], prompts, per_sample))[0, -1]
            assert (one - both[i]).abs().max() <= 1e-4
            n = len(per_sample[s])
            assert all(torch.equal(a, b) for a, b in zip(h.kept_indices, kept[j : j + n]))
            j += n


def test_two_images_in_a_sample_equal_the_model_on_their_kept_units(q3):
    """Both images of one sample pruned, each with its own DeepStack features at its kept units."""
    model = q3[0]
    prompt = [f"USER: {TINY_QWEN_IMAGE} {TINY_QWEN_IMAGE} what is the colour ? ASSISTANT:"]
    x = enc(q3, [0], prompt, [[0, 1]])
    with apply_pruner(model, "divprune", budget=3) as h:
        out = logits(model, x)[0, -1]
        kept = [k.clone() for k in h.kept_indices]
    feats, levels = own_features(model, x)
    pos, _ = model.model.get_rope_index(x["input_ids"], x["mm_token_type_ids"], image_grid_thw=x["image_grid_thw"],
                                        attention_mask=x["attention_mask"])
    ids = x["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero()[:, 0]
    run = torch.cat([kept[0], 8 + kept[1]])  # the second image's run follows the first's 8 units
    cols = torch.cat([(ids != model.config.image_token_id).nonzero()[:, 0], img[run]]).sort().values
    feed = BaseModelOutputWithDeepstackFeatures(
        pooler_output=(feats[0][kept[0]], feats[1][kept[1]]),
        deepstack_features=[(lv[0][kept[0]], lv[1][kept[1]]) for lv in levels])
    with torch.no_grad():
        ref = model(input_ids=ids[cols][None], attention_mask=torch.ones(1, len(cols), dtype=torch.long),
                    position_ids=pos[:, :, cols], mm_encoder_outputs={"image": feed}).logits[0, -1]
    assert (out - ref).abs().max() <= 1e-5


# ---- cached generate = recompute -----------------------------------------------------------------------------
@pytest.mark.parametrize("method,params", [("random", {}), ("pooling", {}), ("fastv", {"layer": 1}),
                                           ("fastv", {"layer": 2}), ("pdrop", {})])
def test_cached_generate_equals_recompute(q3, method, params, monkeypatch):
    """generate() with the pruned KV cache (DeepStack injected at prefill only) equals greedy decoding by
    full recompute, the prefill's pruner decisions replayed at every step."""
    cached, ref = cached_and_recomputed(q3[0], enc(q3, [0, 1]), method, {"budget": 4, **params}, 3, monkeypatch)
    assert (cached - ref).abs().max() <= 1e-4


# ---- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,params,match", [
    ("vtc_cls", {}, r"\[CLS\]"), ("visionzip", {}, r"\[CLS\]"), ("recoverable", {}, r"\[CLS\]"),
    ("vispruner", {}, r"\[CLS\]"), ("prumerge", {}, r"\[CLS\]"),
    ("flowcut", {}, "vision"),
    ("transprune", {"positions": "compact"}, "positions='compact'"),
])
def test_unsupported_methods_refuse_clearly(q3, method, params, match):
    assert_refused(q3[0], method, match, **params)


def test_video_is_refused(q3):
    assert_video_refused(q3[0], enc(q3, [0]))


def test_each_variant_has_its_family():
    assert family_of_class("Qwen3VLForConditionalGeneration") is Qwen3VLSpec
    assert family_of_class("Qwen3VLMoeForConditionalGeneration") is Qwen3VLMoeSpec
    dense, moe = Qwen3VLSpec.tiny_config(), Qwen3VLMoeSpec.tiny_config()
    assert Qwen3VLSpec.llm_mlp_flops(dense, 0, 10) is None and Qwen3VLMoeSpec.llm_mlp_flops(moe, 3, 10) is None
    d, e = moe.text_config.hidden_size, moe.text_config.moe_intermediate_size
    assert Qwen3VLMoeSpec.llm_mlp_flops(moe, 0, 10) == 2 * 10 * d * 4 + 2 * 6 * 10 * d * e  # router + 2 of 4 experts


def test_remove_restores_the_deepstack_process(q3):
    model = q3[0]
    lm = model.model.language_model
    with apply_pruner(model, "fastv", budget=4):
        assert "_deepstack_process" in lm.__dict__
    assert "_deepstack_process" not in lm.__dict__
    assert not any("forward" in m.__dict__ for m in model.model.visual.deepstack_merger_list)


# ---- FLOPs: analytic = FlopCounterMode -----------------------------------------------------------------------
FLOP_METHODS = {"none": {}, "random": {}, "divprune": {}, "pooling": {}, "fastv": {}, "pdrop": {},
                "vflowopt": {}}


@pytest.mark.parametrize("i", [0, 1])
def test_unhooked_flops_match_flop_counter(q3, i):
    """No pruner: the tower on the image's whole patch grid with its three DeepStack mergers on every unit,
    the PatchMerger on every unit, the Qwen3 decoder on text + all units."""
    model = q3[0]
    inputs = enc(q3, [i])
    rows, cols = UNITS[i]
    counts = reference_counts(model.config, TokenCounts(feature_grids=[(rows, cols)]))
    f = prefill_flops(model.config, text_tokens(model, inputs, 0), counts)
    measured = counted_flops(model, inputs)
    assert f.total == measured, (f.as_dict(), measured)  # exactly: every matmul is counted
    spec = family_spec(model.config)
    assert spec is (Qwen3VLMoeSpec if type(model).__name__.startswith("Qwen3VLMoe") else Qwen3VLSpec)
    n = rows * cols
    merger = spec.projector_flops(model.config, n)
    assert f.vision == spec.image_vision_flops(model.config, rows, cols) + 3 * merger and f.projector == merger


@pytest.mark.parametrize("method", list(FLOP_METHODS))
@pytest.mark.parametrize(("i", "budget"), [(0, 4), (1, 4), (1, 100)])
def test_pruned_flops_match_flop_counter(q3, method, i, budget):
    """Every method's prefill (its own overhead included) is what its sample's counts give: the tower in
    full, the DeepStack mergers on the units reaching the LLM unmerged, the PatchMerger on every token
    reaching it, the decoder on the computed widths (``batch_counts.llm_visual_width``)."""
    model, processor, _ = q3
    budget = None if method == "none" else budget
    inputs = enc(q3, [i])
    handle = apply_pruner(model, method, budget=budget, seed=0, tokenizer=processor.tokenizer, **FLOP_METHODS[method])
    try:
        handle.count_overhead_flops = True
        measured = counted_flops(model, inputs)
        (c,), batch, overhead = list(handle.token_counts), handle.batch_counts, handle.overhead_flops
    finally:
        handle.remove()
    rows, cols = UNITS[i]
    n = rows * cols
    assert (c.visual_in, c.feature_grids) == (n, [(rows, cols)])
    computed = dataclasses.replace(c, llm_visual=batch.llm_visual_width or c.llm_visual)
    f = prefill_flops(model.config, text_tokens(model, inputs, 0), computed, overhead=overhead)
    assert f.total == measured, (f.as_dict(), measured, c, batch)
    spec = family_spec(model.config)
    n_kept = (c.projector if c.projector is not None else n) - c.merged
    assert f.vision == spec.image_vision_flops(model.config, rows, cols) + 3 * spec.projector_flops(model.config, n_kept)
    if method == "pooling" and budget < n:
        assert c.merged == c.projector and n_kept == 0  # pooled tokens get no DeepStack merger pass
    ref = prefill_flops(model.config, text_tokens(model, inputs, 0), reference_counts(model.config, c))
    if budget is not None and budget < n:
        assert f.total - f.overhead < ref.total
