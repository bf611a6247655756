"""InternVL3 on the engine (`mllm_adapters/families/internvl.py`), beyond the conformance suite.

On the tiny InternVL3 of `mllm_adapters/tiny_internvl.py` (48 px tiles of 8 px patches, pixel shuffle 0.5:
9 units per tile; up to 4 tiles + thumbnail), with images of different sizes: 40 x 60 px -> 2 x 1 tiles
+ thumbnail (27 tokens), 30 x 80 px -> 3 x 1 + thumbnail (36 tokens), 48 x 48 px -> one tile (9 tokens).
Checked here:

- the layout: tiles per image from the prompt equal the processor's, `layout_for` from the size equals
  them, the engine's unit features are the model's own pixel-shuffled tokens (unit-major patch order);
- pre-LLM pruning = the unpruned model fed exactly the kept tokens (compact 1-D positions, ``<img>`` and
  ``</img>`` kept), for one- and several-tile images;
- a batch of two different-size images = each alone (logits, kept sets, greedy tokens);
- cached generate() = greedy decoding by full recompute with the prefill's decisions replayed;
- the [CLS] attention per unit = a direct computation from the tower's own eager attention weights
  (``output_attentions``): each unit's 4 patch columns summed (and mean / max as documented);
- the refused methods raise a ValueError naming the method;
- prefill FLOPs of the unhooked and of pruned models equal FlopCounterMode's count.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.flops import prefill_flops, reference_counts, sample_cost
from benchmarks.models import family_spec
from mllm_adapters import apply_pruner
from mllm_adapters.engine.probes import cls_feature_attention
from mllm_adapters.families.internvl import InternVLSpec, unit_major_patches
from mllm_adapters.handle import TokenCounts
from mllm_adapters.tiny_internvl import TINY_INTERNVL_IMAGE, build_tiny_internvl
from pruners import get_pruner_class, register_pruner
from pruners.base import PreLLMContext, PreLLMDecision, Pruner
from tests._adapter_helpers import cached_and_recomputed, counted_flops, text_tokens
from tests.conftest import random_images

SIZES = [(40, 60), (30, 80), (48, 48)]  # (height, width) px
TILES = [3, 4, 1]  # tiles the processor cuts each into (thumbnail included)
UNITS = 9  # tokens per tile
PROMPTS = [f"USER: {TINY_INTERNVL_IMAGE} what is the colour of the circle ? ASSISTANT:",
           f"USER: {TINY_INTERNVL_IMAGE} how many ? ASSISTANT:",
           f"USER: {TINY_INTERNVL_IMAGE} describe image ASSISTANT:"]
REFUSED = ["flowcut", "visionzip", "prumerge", "prumerge_plus", "recoverable"]


@register_pruner("_test_internvl_cls")
class RecordCLS(Pruner):
    """Test-only pre-LLM pruner: records each call's CLS attention and pooled ViT attention at the feature
    layer, keeps the first ``budget`` tokens."""

    stages = ("pre_llm",)
    requires_cls = True
    calls: list[dict[str, torch.Tensor]] = []

    def vision_probe_layers(self) -> list[int]:
        return [self.info.vision_feature_layer]

    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        layer = self.info.vision_feature_layer
        RecordCLS.calls.append({"cls": ctx.cls_attention(layer), "attn": ctx.vision_attention(layer),
                                "pixels": ctx.pixel_values, "grid": torch.tensor(ctx.info.grid_hw)})
        n = ctx.features.shape[1]
        return PreLLMDecision(keep=torch.arange(min(self.budget, n))[None])


@pytest.fixture(scope="module")
def ivl():
    torch.set_num_threads(1)
    model, processor = build_tiny_internvl(seed=0)
    images = random_images(SIZES, 0)
    return model, processor, images


def enc(ivl, idx):
    _, processor, images = ivl
    return processor(images=[images[i] for i in idx], text=[PROMPTS[i] for i in idx], return_tensors="pt",
                     padding=True)


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def generate(model, x, steps=3):
    with torch.no_grad():
        return model.generate(**x, max_new_tokens=steps, do_sample=False)[:, -steps:]


# ---- layout ----------------------------------------------------------------------------------------------
def test_tiles_and_layouts_match_the_processor(ivl):
    model = ivl[0]
    spec = InternVLSpec(model)
    for i, size in enumerate(SIZES):
        x = enc(ivl, [i])
        assert x["pixel_values"].shape[0] == TILES[i]
        (lay,) = spec.image_layouts(dict(x))
        assert (lay.n_tiles, lay.n_packed) == (TILES[i], TILES[i] * UNITS)
        assert int((x["input_ids"] == model.config.image_token_id).sum()) == lay.n_packed
        by_size = InternVLSpec.layout_for(model.config, size)
        assert (by_size.side, by_size.rects) == (lay.side, lay.rects) and torch.equal(by_size.src, lay.src)
    assert InternVLSpec.max_visual_tokens(model.config) == (4 + 1) * UNITS


def test_unit_features_are_the_models_own_tokens(ivl):
    """Pixel shuffle: the engine's units, projected, equal the model's tokens; unit j is patches
    (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1) side by side (`unit_major_patches`)."""
    model = ivl[0]
    spec = InternVLSpec(model)
    x = enc(ivl, [0, 1])
    layouts = spec.image_layouts(dict(x))
    with torch.no_grad():
        encoding = spec.encode_images(dict(x), layouts, [3])
        own = model.model.get_image_features(pixel_values=x["pixel_values"]).pooler_output  # [T, 9, Dt]
        hs, _ = spec._tower(x["pixel_values"])
        projected = [spec.project(f) for f in encoding.features]
    assert torch.allclose(torch.cat(projected), own.reshape(-1, own.shape[-1]), atol=1e-5)
    order = unit_major_patches(6, 2)
    assert order[:8].tolist() == [0, 1, 6, 7, 2, 3, 8, 9]
    units = hs[:, 1:][:, order].reshape(hs.shape[0], 9, -1)  # [T, 9, 4 Dv] by the patch order
    assert torch.equal(units, spec._shuffle(hs[:, 1:]))
    # one probe per tile: the CLS row first, then the tile's 36 patch rows unit-major
    for j, lay in enumerate(layouts):
        assert len(encoding.view_probes[j]) == lay.n_tiles
        p = encoding.view_probes[j][0][3]
        assert (p.n_cls, p.q.shape[1], p.hidden.shape[0]) == (1, 37, 37)


# ---- pre-LLM = the model on the kept tokens ----------------------------------------------------------------
@pytest.mark.parametrize("method", ["fastervlm", "random", "pooling", "vispruner"])
@pytest.mark.parametrize("i", [0, 2])  # three tiles, one tile
def test_pre_llm_equals_model_on_kept_tokens(ivl, method, i):
    model = ivl[0]
    x = enc(ivl, [i])
    budget = 5
    fed = []
    with apply_pruner(model, method, budget=budget) as h:
        # registered after the engine's own pre-hook: sees what the engine hands the model
        rec = model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw.get("mm_encoder_outputs")),
                                              with_kwargs=True)
        try:
            out = logits(model, x)[0, -1]
        finally:
            rec.remove()
        kept = h.kept_indices[0].clone()
    tokens = fed[0]["image"].pooler_output.reshape(-1, model.config.text_config.hidden_size)  # what the LLM got
    n = tokens.shape[0]
    assert n <= budget
    with torch.no_grad():
        own = model.model.get_image_features(pixel_values=x["pixel_values"]).pooler_output.reshape(-1, tokens.shape[1])
    if kept.numel() == n:  # no merged tokens: the model's own tokens at the kept positions
        assert (tokens - own[kept]).abs().max() <= 1e-5
    ids, mask = x["input_ids"], x["attention_mask"]
    img = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
    cols = torch.ones(ids.shape[1], dtype=torch.bool)
    cols[img[n:]] = False  # the run shrunk to n placeholders; <img> / </img> and the text unchanged
    assert ids[0, cols].tolist().count(model.config.image_token_id) == n
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    with torch.no_grad():
        ref = model(input_ids=ids[:, cols], attention_mask=mask[:, cols],
                    mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=tokens[None])}).logits[0, -1]
    assert (out - ref).abs().max() <= 1e-5


# ---- batch = samples alone -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fastervlm", "fopru", "fastv", "pdrop"])
def test_batch_of_two_sizes_equals_batches_of_one(ivl, method):
    model = ivl[0]
    x = enc(ivl, [0, 1])
    with apply_pruner(model, method, budget=6) as h:
        both = logits(model, x)[:, -1]
        kept = [k.clone() for k in h.kept_indices]
        gen = generate(model, x)
        assert [c.views for c in h.token_counts] == TILES[:2]
        for i in range(2):
            one = logits(model, enc(ivl, [i]))[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept[i])
            assert torch.equal(generate(model, enc(ivl, [i]))[0], gen[i])


# ---- cached generate = recompute ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fastervlm", "fastv", "vflowopt"])
def test_cached_generate_equals_recompute(ivl, method, monkeypatch):
    cached, ref = cached_and_recomputed(ivl[0], enc(ivl, [0, 1]), method, {"budget": 6}, 3, monkeypatch)
    assert (cached - ref).abs().max() <= 1e-4


# ---- CLS attention per unit -------------------------------------------------------------------------------
def test_cls_attention_per_unit_is_the_sum_of_its_patches(ivl):
    """Per tile, ``ctx.cls_attention`` = the tower's own [CLS] attention row at the feature layer
    (eager ``output_attentions``, head mean) with each unit's 4 patch columns summed; the CLS row of the
    pooled ``vision_attention`` is the same; mean and max are the documented alternatives."""
    model = ivl[0]
    x = enc(ivl, [0])
    RecordCLS.calls.clear()
    with apply_pruner(model, "_test_internvl_cls", budget=4):
        logits(model, x)
    assert len(RecordCLS.calls) == TILES[0]  # one call per tile (budget split 2, 1, 1 over the tiles)
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values=x["pixel_values"], output_attentions=True)
    att = out.attentions[-1].float().mean(1)[:, 0, 1:]  # [T, 36] CLS -> patch, head mean
    direct = att.view(-1, 3, 2, 3, 2).sum((2, 4)).reshape(-1, 9)  # [T, 9]: unit (r, c) = patches (2r+a, 2c+b)
    for t, call in enumerate(RecordCLS.calls):
        assert call["cls"].shape == (1, 9) and call["grid"].tolist() == [3, 3]
        assert torch.allclose(call["cls"][0], direct[t], atol=1e-6)
        assert torch.allclose(call["attn"][0, 0, 1:], call["cls"][0], atol=1e-6)  # pooled attention's CLS row
        assert torch.allclose(call["attn"][0].sum(-1), torch.ones(10), atol=1e-5)  # rows still sum to 1
        assert torch.equal(call["pixels"][0], x["pixel_values"][t])
    spec = InternVLSpec(model)
    enc_ = spec.encode_images(dict(x), spec.image_layouts(dict(x)), [3])
    p = enc_.view_probes[0][0][3]
    cols = att[0].view(3, 2, 3, 2).permute(0, 2, 1, 3).reshape(9, 4)
    assert torch.allclose(cls_feature_attention(p, 9, "mean"), cols.mean(1), atol=1e-6)
    assert torch.allclose(cls_feature_attention(p, 9, "max"), cols.amax(1), atol=1e-6)
    with pytest.raises(ValueError, match="cls_unit_reduce"):
        cls_feature_attention(p, 9, "median")


# ---- refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", REFUSED)
def test_refused_methods_name_the_method(ivl, method):
    model = ivl[0]
    with pytest.raises(ValueError, match=method):
        apply_pruner(model, method, budget=6)
    assert "*:internvl" in get_pruner_class(method).conformance_opt_outs
    h = getattr(model, "_prunebench_handle", None)
    assert h is None or h.removed


def test_bad_inputs_are_rejected(ivl):
    model = ivl[0]
    x = enc(ivl, [0])
    with apply_pruner(model, "random", budget=4):
        with pytest.raises(ValueError, match="pixel_values"):
            logits(model, {**x, "pixel_values": x["pixel_values"][:2]})
    with pytest.raises(ValueError, match="image_size"):
        InternVLSpec.layout_for(model.config, None)


def test_recall_cover(ivl):
    model = ivl[0]
    grid, cover = InternVLSpec.recall_cover(model.config, SIZES[0])  # 2 x 1 tiles + thumbnail
    assert grid == (3, 6) and cover.shape == (18, 2)
    assert sorted(cover[:, 0].tolist()) == list(range(18))  # every crop unit covers one cell
    assert cover[:, 1].min() >= 18 and cover[:, 1].max() < 27  # the thumbnail's units
    assert InternVLSpec.recall_cover(model.config, SIZES[2]) == ((3, 3), None)


# ---- FLOPs = FlopCounterMode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("i", [0, 1, 2])
def test_unhooked_flops_equal_the_flop_counter(ivl, i):
    model = ivl[0]
    x = enc(ivl, [i])
    counts = reference_counts(model.config, TokenCounts(feature_grids=[(3, 3)] * TILES[i]))
    f = prefill_flops(model.config, text_tokens(model, x, 0), counts)
    assert f.total == counted_flops(model, x), f.as_dict()
    spec = family_spec(model.config)
    assert f.vision == TILES[i] * spec.tile_vision_flops(model.config)
    assert f.projector == spec.projector_flops(model.config, TILES[i] * UNITS)


@pytest.mark.parametrize("method", ["none", "fastervlm", "random", "pooling", "fastv", "pdrop", "vflowopt"])
@pytest.mark.parametrize(("i", "budget"), [(0, 5), (1, 5), (2, 100)])
def test_pruned_flops_equal_the_flop_counter(ivl, method, i, budget):
    """The sample's counts (plus the inert slots the engine pads in-LLM runs with, ``llm_visual_width``)
    and the pruner's own overhead give FlopCounterMode's total exactly."""
    model, processor, _ = ivl
    budget = None if method == "none" else min(budget, 45)
    x = enc(ivl, [i])
    h = apply_pruner(model, method, budget=budget, seed=0, tokenizer=processor.tokenizer)
    try:
        h.count_overhead_flops = True
        measured = counted_flops(model, x)
        (c,), batch, overhead = list(h.token_counts), h.batch_counts, h.overhead_flops
    finally:
        h.remove()
    assert c.views == TILES[i] and c.feature_grids == [(3, 3)] * TILES[i]
    computed = dataclasses.replace(c, llm_visual=batch.llm_visual_width or c.llm_visual)
    f = prefill_flops(model.config, text_tokens(model, x, 0), computed, overhead=overhead)
    assert f.total == measured, (f.as_dict(), measured, c, batch)
    cost = sample_cost(model.config, text_tokens(model, x, 0), c, overhead=overhead)
    assert cost.reference == counted_flops(model, x)  # the same sample through the unhooked model
