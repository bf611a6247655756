"""LLaVA-OneVision on the engine (`mllm_adapters/families/llava_onevision.py`, tiny model of
`mllm_adapters/tiny_onevision.py`): the layout against the model's own packing (unpad, anyres-max resize,
newlines, multi-image samples), pre-LLM pruning = the model fed only the kept tokens, batches = their
samples alone, several images per sample, cached generate = recompute, FLOPs = FlopCounterMode, and the
mapping of kept indices back to image regions.

Image sizes (height, width) px on the tiny model (32 px tiles, 4 x 4 patches, anyres_max_2): 40 x 60
(2 x 2 crops, canvas 6 x 8 resized to 4 x 6), 30 x 80 (1 x 3, 4 x 10 resized to 3 x 8), 30 x 30 (1 x 1,
4 x 4, not resized).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from benchmarks.flops import prefill_flops, reference_counts
from benchmarks.models import family_spec
from mllm_adapters import apply_pruner
from mllm_adapters.families.llava_onevision import (
    LlavaOnevisionSpec,
    max_run_tokens,
    pack_rows,
    token_boxes,
)
from mllm_adapters.handle import TokenCounts
from tests._adapter_helpers import counted_flops, greedy_recompute, text_tokens

SIZES = [(40, 60), (30, 80), (30, 30)]
CANVAS = [(4, 6, True), (3, 8, True), (4, 4, False)]  # resized canvas (rows, cols) and whether resized
PROMPTS = ["USER: <image> what is the colour of the circle ? ASSISTANT:", "USER: <image> how many ? ASSISTANT:",
           "USER: <image> what shape ? ASSISTANT:"]
TOL = 1e-9  # the analytic count equals FlopCounterMode exactly (measured)


def _image(size, seed):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ov():
    torch.set_num_threads(1)
    model, processor = LlavaOnevisionSpec.build_tiny(seed=0, attn_implementation="eager")
    images = [_image(s, i) for i, s in enumerate(SIZES)]
    return model, processor, images


def _inputs(ov, idx):
    _, processor, images = ov
    return processor(images=[images[i] for i in idx], text=[PROMPTS[i] for i in idx], return_tensors="pt",
                     padding=True)


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


# ---- layout ---------------------------------------------------------------------------------------
def test_tiny_config_is_build_tiny_config(ov):
    model = ov[0]
    assert LlavaOnevisionSpec.tiny_config().to_dict() == model.config.to_dict()


@pytest.mark.parametrize("i", range(3))
def test_layout_is_the_models_packing(ov, i):
    """Token count, views, resize and newlines of each image as the model packs it; `pack_rows` on the
    projected tiles reproduces the model's own run without its newlines."""
    model = ov[0]
    x = _inputs(ov, [i])
    own = model.model.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"]).pooler_output[0]
    lay = LlavaOnevisionSpec.layout_for(model.config, SIZES[i])
    h2, w2, resized = CANVAS[i]
    assert (lay.canvas_hw, lay.resized) == ((h2, w2), resized)
    assert lay.n_packed == own.shape[0] == 16 + h2 * (w2 + 1) == int((x["input_ids"] == 4).sum())
    assert lay.rects == ((0, 4, 0, 4), (0, h2, 0, w2))
    nl = (lay.src < 0).nonzero()[:, 0]
    assert torch.equal(nl, 16 + torch.arange(1, h2 + 1) * (w2 + 1) - 1)  # a newline closes every canvas row
    assert torch.allclose(own[nl], model.model.image_newline.expand(h2, -1))
    with torch.no_grad():
        tiles = x["pixel_values"][0, : lay.vit_tiles]
        feats = model.model.multi_modal_projector(
            model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-1])
    assert torch.allclose(pack_rows(feats, lay), own[lay.src >= 0], atol=1e-6)


def test_multi_image_sample_is_not_tiled(ov):
    """A sample of two images: each is its base tile plus one newline (``batch_num_images``)."""
    model, processor, images = ov
    x = processor(images=[[images[0], images[1]]], text=["USER: <image> <image> how many ? ASSISTANT:"],
                  return_tensors="pt")
    lays = LlavaOnevisionSpec(model).image_layouts(dict(x))
    assert [(lay.n_packed, lay.vit_tiles, lay.n_tiles) for lay in lays] == [(17, 1, 1)] * 2
    assert int((x["input_ids"] == 4).sum()) == 34


def test_max_visual_tokens_bounds_every_image(ov):
    """`max_visual_tokens` is at least every image's run (a sweep of sizes), on the tiny and the 7B configs."""
    from transformers import LlavaOnevisionConfig

    model = ov[0]
    real = LlavaOnevisionConfig()  # llava-hf/llava-onevision-qwen2-7b-ov-hf's tower and pinpoints
    assert real.vision_aspect_ratio == "anyres_max_9"
    for cfg in (model.config, real):
        n_max = LlavaOnevisionSpec.max_visual_tokens(cfg)
        seen = max(LlavaOnevisionSpec.layout_for(cfg, (h, w)).n_packed
                   for h in range(8, 2400, 97) for w in range(8, 2400, 89))
        assert seen <= n_max
    side = 384 // 14
    assert LlavaOnevisionSpec.max_visual_tokens(real) == max_run_tokens(real.image_grid_pinpoints, 384, side, 9)
    assert LlavaOnevisionSpec.layout_for(real, (2304, 2304)).n_packed == 729 + 81 * 82  # 162 x 162 resized to 81


# ---- pruning invariants ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["random", "divprune", "pooling", "fopru"])
def test_pre_llm_equals_model_on_kept_tokens(ov, method):
    """Per sample, the pruned logits equal the unpruned model on a prompt holding exactly the tokens the LLM
    received (compact positions); kept tokens are the model's own tokens at ``handle.kept_indices``."""
    model, processor, _ = ov
    x = _inputs(ov, [0, 1, 2])
    seen = []
    with apply_pruner(model, method, budget=10) as h:
        # registered after the engine's own top-level hook: sees what the engine hands the model
        rec = model.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("mm_encoder_outputs")),
                                              with_kwargs=True)
        try:
            out = _logits(model, x)[:, -1]
        finally:
            rec.remove()
        kept = [k.clone() for k in h.kept_indices]
    fed = list(seen[0]["image"].pooler_output)
    own = model.model.get_image_features(pixel_values=x["pixel_values"], image_sizes=x["image_sizes"]).pooler_output
    for b in range(3):
        assert fed[b].shape[0] <= 10
        assert torch.equal(kept[b], kept[b].sort().values)
        if method in ("random", "divprune"):  # no merged tokens
            assert torch.allclose(fed[b], own[b][kept[b]], atol=1e-6)
        tok = processor.tokenizer([PROMPTS[b].replace("<image>", "<image>" * fed[b].shape[0])], return_tensors="pt")
        with torch.no_grad():
            ref = model(**tok, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[fed[b]])}).logits
        assert (out[b] - ref[0, -1]).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["random", "vflowopt", "fastv", "pdrop"])
def test_batch_equals_samples_alone(ov, method):
    """Images of different sizes (resized and not) in one left-padded batch: each sample's logits and kept
    set are its own alone."""
    model = ov[0]
    x = _inputs(ov, [0, 1, 2])
    with apply_pruner(model, method, budget=9) as h:
        both = _logits(model, x)[:, -1]
        kept = [k.clone() for k in h.kept_indices]
        for i in range(3):
            one = _logits(model, _inputs(ov, [i]))[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept[i])


def test_several_images_per_sample(ov):
    """A sample with two (untiled) images next to one with a tiled image: a pre-LLM method keeps per image,
    equal to each sample alone; an in-LLM method refuses the two-image sample."""
    model, processor, images = ov
    texts = ["USER: <image> <image> how many ? ASSISTANT:", "USER: <image> what shape ? ASSISTANT:"]

    def inputs(samples):
        imgs = [[images[0], images[1]], [images[2]]]
        return processor(images=[imgs[s] for s in samples], text=[texts[s] for s in samples], return_tensors="pt",
                         padding=True)

    with apply_pruner(model, "divprune", budget=6) as h:
        both = _logits(model, inputs([0, 1]))[:, -1]
        kept = [k.clone() for k in h.kept_indices]
        assert [len(k) for k in kept] == [6, 6, 6]
        assert [c.views for c in h.token_counts] == [2, 2]  # two single-tile images; base + one crop
        for s, js in ((0, [0, 1]), (1, [2])):
            one = _logits(model, inputs([s]))[:, -1]
            assert (one[0] - both[s]).abs().max() <= 1e-4
            assert all(torch.equal(a, kept[j]) for a, j in zip(h.kept_indices, js))
    with apply_pruner(model, "fastv", budget=6) as h:  # in-LLM: the two images of sample 0 ranked together
        both = _logits(model, inputs([0, 1]))[:, -1]
        kept = [k.clone() for k in h.kept_indices]
        assert len(kept) == 3 and sum(len(k) for k in kept[:2]) == 12 and len(kept[2]) == 6  # 6 per image, summed
        for s, js in ((0, [0, 1]), (1, [2])):
            one = _logits(model, inputs([s]))[:, -1]
            assert (one[0] - both[s]).abs().max() <= 1e-4
            assert all(torch.equal(a, kept[j]) for a, j in zip(h.kept_indices, js))


@pytest.mark.parametrize("method", ["vflowopt", "random", "divprune"])
def test_cached_generate_equals_recompute(ov, method):
    """generate() with the pruned KV cache equals greedy decoding by full recompute, on a batch of a resized
    and an unresized image. These methods choose from the image (and, for vflowopt's in-LLM drops, from its
    pre-LLM scores), never from the last token, so the recompute makes the same choices at every step."""
    model = ov[0]
    x = _inputs(ov, [0, 2])
    with apply_pruner(model, method, budget=9):
        gen = model.generate(**x, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    cached = torch.stack(gen.logits, 1)
    ref = greedy_recompute(model, x, 3, method, {"budget": 9})
    assert (cached - ref).abs().max() <= 1e-4


def test_refusals(ov):
    """CLS methods and the vision stage refuse at attach, naming the method; so do videos and overrides."""
    model = ov[0]
    for method in ("visionzip", "fastervlm", "flowcut", "prumerge"):
        with pytest.raises(ValueError, match=method):
            apply_pruner(model, method, budget=8)
    with pytest.raises(ValueError, match="vispruner"):
        apply_pruner(model, "vispruner", budget=8)
    x = _inputs(ov, [0])
    with apply_pruner(model, "random", budget=8), pytest.raises(ValueError, match="vision_aspect_ratio"):
        _logits(model, {**x, "vision_aspect_ratio": "anyres_max_4"})


# ---- FLOPs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(3))
def test_unhooked_flops_match_flop_counter(ov, i):
    """No pruner: SigLIP on every tile, the projector on every tile's patches, the LLM on the whole run."""
    model = ov[0]
    x = _inputs(ov, [i])
    lay = LlavaOnevisionSpec.layout_for(model.config, SIZES[i])
    counts = reference_counts(model.config, TokenCounts(visual_in=lay.n_packed, views=lay.vit_tiles))
    assert counts.projector == lay.vit_tiles * 16
    f = prefill_flops(model.config, text_tokens(model, x), counts)
    measured = counted_flops(model, x)
    assert abs(f.total - measured) / measured < TOL, (f.as_dict(), measured)


@pytest.mark.parametrize("method,budget", [("none", None), ("random", 10), ("vflowopt", 10), ("fastv", 10),
                                           ("pdrop", 12), ("divprune", 60)])  # 60: above both runs
@pytest.mark.parametrize("i", [0, 2])
def test_pruned_flops_match_flop_counter(ov, method, budget, i):
    """A pruned prefill's counts (plus the pruner's own overhead) give FlopCounterMode's total; the tower and
    projector are the untouched model's (they run in full before the run is pruned)."""
    model, processor, _ = ov
    x = _inputs(ov, [i])
    h = apply_pruner(model, method, budget=budget, tokenizer=processor.tokenizer)
    try:
        h.count_overhead_flops = True
        measured = counted_flops(model, x)
        (c,), batch, overhead = list(h.token_counts), h.batch_counts, h.overhead_flops
    finally:
        h.remove()
    lay = LlavaOnevisionSpec.layout_for(model.config, SIZES[i])
    assert (c.visual_in, c.views, c.projector, c.feature_grids) == (lay.n_packed, lay.vit_tiles, lay.vit_tiles * 16, None)
    computed = dataclasses.replace(c, llm_visual=batch.llm_visual_width or c.llm_visual)
    f = prefill_flops(model.config, text_tokens(model, x), computed, overhead=overhead)
    assert abs(f.total - measured) / measured < TOL, (f.as_dict(), measured, c)
    ref = prefill_flops(model.config, text_tokens(model, x), reference_counts(model.config, c))
    assert (f.vision, f.projector) == (ref.vision, ref.projector)
    if budget is not None and budget < lay.n_packed:
        assert min(c.llm_visual) <= budget and f.llm < ref.llm


# ---- index mapping -------------------------------------------------------------------------------------
def test_token_boxes_and_recall_cover(ov):
    """Each kept index maps to an image region: base tokens to a 1/side cell of the whole image; canvas
    tokens of an unresized canvas to exactly one crop patch of the image, of a resized one to h/h2 x w/w2
    patches; newlines to none. `recall_cover` lists, per grid cell, tokens whose box holds its centre."""
    model = ov[0]
    cfg = model.config
    for size, (h2, w2, _resized) in zip(SIZES, CANVAS):
        lay = LlavaOnevisionSpec.layout_for(cfg, size)
        boxes = token_boxes(cfg, size)
        assert boxes.shape == (lay.n_packed, 4)
        assert torch.isnan(boxes[lay.src < 0]).all() and not torch.isnan(boxes[lay.src >= 0]).any()
        assert torch.allclose(boxes[:16, 2] - boxes[:16, 0], torch.full((16,), 0.25, dtype=torch.float64))
        canvas = boxes[(lay.src >= lay.side**2)]
        assert ((canvas[:, 2] > canvas[:, 0]) & (canvas[:, 3] > canvas[:, 1])).all()
        # the canvas tokens tile the image but for what unpadding cut (under one canvas patch per side)
        area = float(((canvas[:, 2] - canvas[:, 0]) * (canvas[:, 3] - canvas[:, 1])).sum())
        assert 0.85 < area <= 1.0 + 1e-9
        grid, cover = LlavaOnevisionSpec.recall_cover(cfg, size)
        assert grid == (max(h2, 4), max(w2, 4)) and cover.shape == (grid[0] * grid[1], 2)
        assert (cover[:, 0] >= 0).all() and (cover[:, 1] >= 0).mean(dtype=torch.float32) > 0.9
        gh, gw = grid
        cy = ((torch.arange(gh) + 0.5) / gh)[:, None].expand(gh, gw).reshape(-1).double()
        cx = ((torch.arange(gw) + 0.5) / gw)[None, :].expand(gh, gw).reshape(-1).double()
        for col in (0, 1):
            hit = cover[:, col] >= 0
            b = boxes[cover[hit, col]]
            assert ((b[:, 0] <= cy[hit]) & (cy[hit] < b[:, 2]) & (b[:, 1] <= cx[hit]) & (cx[hit] < b[:, 3])).all()
    # the 30 x 30 image (1 x 1 crop, no resize): canvas token (i, j) is exactly patch cell (i, j) of the image
    boxes = token_boxes(cfg, (30, 30))
    lay = LlavaOnevisionSpec.layout_for(cfg, (30, 30))
    canvas = boxes[lay.src >= lay.side**2]
    g = torch.arange(4, dtype=torch.float64) / 4
    assert torch.allclose(canvas[:, 0], g[:, None].expand(4, 4).reshape(-1))
    assert torch.allclose(canvas[:, 1], g[None, :].expand(4, 4).reshape(-1))


def test_benchmark_facts(ov):
    """What `benchmarks/` asks of the spec, from the config alone."""
    model = ov[0]
    spec = family_spec(model.config)
    assert spec is LlavaOnevisionSpec
    assert spec.view_grid(model.config) == (4, 4)
    with apply_pruner(model, "none") as h:
        info = h.pruner.info
    assert (info.has_cls, info.grid_hw, info.num_visual_tokens) == (False, (4, 4), spec.max_visual_tokens(model.config))
    assert info.vision_feature_layer == model.config.vision_config.num_hidden_layers - 1
