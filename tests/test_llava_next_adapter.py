"""The LLaVA-NeXT adapter (mllm_adapters/llava_next.py) on a tiny LlavaNextForConditionalGeneration.

Tiny model: 32 px tiles of 8 px patches (4 x 4 per tile), pinpoints 32x64 / 64x32 / 64x64. The two test
images pack into different runs: 40 x 60 px -> 4 crops, canvas rows unpadded, 16 + 6 x 9 = 70 tokens;
30 x 80 px -> 2 crops, 16 + 4 x 9 = 52 tokens. So a batch of the two is ragged in visual tokens.

- the adapter's packing table reproduces transformers' own packing (unpad, image_newline);
- keep-all reproduces the unpruned logits, both untouched (budget None / the model's maximum) and
  through the adapter's own path (budget = every token of these images);
- pre-LLM pruning equals the unpruned model run on only the kept tokens;
- a batch of two (ragged, left-padded) equals two batches of one, generation included;
- same seed, same result; generate() at each stage; cached decoding equals full recompute;
- FlowCut (vision stage) per tile: its share of the budget, on the tile's patches that survive
  unpadding, checked against FlowCut's signals computed by hand on each tile;
- a vision-stage method combined with other stages, and bad inputs, raise clear errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mllm_adapters import apply_pruner
from mllm_adapters.engine.layout import split_budget
from mllm_adapters.families.llava_next import image_layout, max_packed_tokens
from mllm_adapters.tiny import build_tiny_llava, build_tiny_llava_next
from pruners import register_pruner
from pruners.base import Pruner
from pruners.flowcut import flow_scores
from tests._adapter_helpers import ProjectorInputs, greedy_recompute

PROMPTS = [
    "USER: <image> what is the colour of the circle ? ASSISTANT:",
    "USER: <image> how many ? ASSISTANT:",
]
SIZES = [(40, 60), (30, 80)]  # (height, width) px
N_PACKED = [70, 52]
N_MAX = 16 + 8 * 9  # base tile + the 64 x 64 pinpoint's 8 x 8 canvas with 8 newlines

# (method, budget, params): every non-vision method, pre-LLM ones at a budget below both images,
# in-LLM ones also at 60 (between the images: the 52-token image keeps everything, inert slots fill).
PRE_LLM = [("random", 30, {}), ("divprune", 30, {}), ("pooling", 30, {}), ("vtc_cls", 30, {}),
           ("visionzip", 30, {}), ("recoverable", 30, {}), ("random", 60, {})]
IN_LLM = [("fastv", 30, {}), ("fastv", 60, {}), ("fastv", 30, {"positions": "compact"}), ("pdrop", 20, {}),
          ("transprune", 20, {})]
BOTH = [("vflowopt", 20, {})]
VISION = [("flowcut", 30, {}), ("flowcut", 60, {}), ("flowcut", 10, {})]  # 60: tiles kept whole next to pruned ones
ALL = PRE_LLM + IN_LLM + BOTH + VISION


@register_pruner("_test_vision_and_llm")
class VisionAndLLM(Pruner):
    """Test-only: a method with a vision and an llm stage (refused on LLaVA-NeXT)."""

    stages = ("vision", "llm")


def make_image(size: tuple[int, int], seed: int) -> Image.Image:
    h, w = size
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def nxt():
    torch.set_num_threads(1)
    return build_tiny_llava_next(seed=0, attn_implementation="eager")


@pytest.fixture(scope="module")
def images():
    return [make_image(s, i) for i, s in enumerate(SIZES)]


@pytest.fixture(scope="module")
def batch(nxt, images):
    _, processor = nxt
    return processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)


def single(processor, images, i: int):
    return processor(images=images[i : i + 1], text=PROMPTS[i : i + 1], return_tensors="pt", padding=True)


def logits_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def hf_packed_features(model, inputs) -> list[torch.Tensor]:
    """transformers' own per-image packed visual tokens [N_b, Dt] (after projector and newlines)."""
    with torch.no_grad():
        return list(model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output)


def reference_on_tokens(model, processor, feats: list[torch.Tensor]) -> torch.Tensor:
    """Last-token logits of the UNPRUNED model on prompts whose image runs hold exactly ``feats`` [n_b, Dt]."""
    out = []
    for b, f in enumerate(feats):  # one at a time: per-sample references need no padding
        tok = processor.tokenizer([PROMPTS[b].replace("<image>", "<image>" * f.shape[0])], return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                           mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[f])}).logits
        out.append(logits[0, -1])
    return torch.stack(out)


# ---- packing ------------------------------------------------------------------------------------
def test_batch_is_ragged(batch):
    assert (batch["input_ids"] == 4).sum(1).tolist() == N_PACKED


@pytest.mark.parametrize("size", [(40, 60), (30, 80), (64, 64), (60, 40), (80, 30), (20, 20), (33, 65), (100, 31)])
def test_layout_reproduces_transformers_packing(nxt, size):
    model, processor = nxt
    inputs = processor(images=[make_image(size, 7)], text=["USER: <image> what ? ASSISTANT:"], return_tensors="pt")
    cfg = model.config
    lay = image_layout(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size, 4)
    assert lay.n_packed == int((inputs["input_ids"] == cfg.image_token_id).sum())
    assert lay.n_packed <= max_packed_tokens(cfg.image_grid_pinpoints, cfg.vision_config.image_size, 4) == N_MAX
    (ref,) = hf_packed_features(model, inputs)
    pv = inputs["pixel_values"][0, : lay.n_tiles]
    with torch.no_grad():
        hs = model.model.vision_tower(pv, output_hidden_states=True).hidden_states[cfg.vision_feature_layer][:, 1:]
        proj = model.model.multi_modal_projector(hs).reshape(-1, ref.shape[-1])  # [tiles * 16, Dt]
    ours = torch.where((lay.src < 0)[:, None], model.model.image_newline.expand(lay.n_packed, -1),
                       proj[lay.src.clamp(min=0)])
    assert (ours - ref).abs().max() <= 1e-6
    # each tile's rectangle lists exactly the packed patches of that tile
    pidx = lay.packed_index()
    for t in range(lay.n_tiles):
        shown = set((t * 16 + lay.view_patches(t)).tolist())
        assert shown == {i for i in range(t * 16, (t + 1) * 16) if pidx[i] >= 0}


def test_split_budget():
    assert split_budget(10, [16, 16, 16]) == [4, 3, 3]  # ties go to the earlier tile
    assert split_budget(30, [16, 8, 8, 12, 12]) == [9, 4, 4, 7, 6]  # remainders .57 .29 .29 .43 .43
    assert sum(split_budget(7, [16, 0, 5])) == 7 and split_budget(7, [16, 0, 5])[1] == 0
    assert split_budget(100, [3, 4]) == [3, 4]


# ---- keep-all -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,budget", [("none", None), ("random", None), ("random", N_MAX), ("fastv", None),
                                           ("pdrop", None), ("vflowopt", None), ("visionzip", N_MAX),
                                           ("flowcut", None), ("flowcut", N_MAX)])
def test_keep_all_is_untouched(nxt, batch, method, budget):
    model, _ = nxt
    ref = logits_of(model, batch)
    with apply_pruner(model, method, budget=budget) as h:
        out = logits_of(model, batch)
        assert [len(k) for k in h.kept_indices] == N_PACKED
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method", ["random", "divprune", "pooling", "vtc_cls", "visionzip", "vflowopt", "flowcut"])
def test_budget_of_every_token_reproduces_unpruned(nxt, batch, method):
    """budget = the larger image's run (< the model's maximum): the adapter's own vision, packing and prompt
    rewrite run (the smaller image gets inert slots) and must give the unpruned logits."""
    model, _ = nxt
    ref = logits_of(model, batch)[:, -1]
    with apply_pruner(model, method, budget=max(N_PACKED)) as h:
        out = logits_of(model, batch)[:, -1]
        assert [k.tolist() for k in h.kept_indices] == [list(range(n)) for n in N_PACKED]
        assert [c.llm_visual for c in h.token_counts] == [[n] * 4 for n in N_PACKED]
    assert (out - ref).abs().max() <= 1e-5


# ---- pre-LLM = model on the kept tokens --------------------------------------------------------------
@pytest.mark.parametrize("method,budget", [("random", 30), ("divprune", 30), ("vtc_cls", 30), ("random", 60),
                                           ("divprune", 9)])
def test_pre_llm_equals_model_on_kept_tokens(nxt, batch, method, budget):
    model, processor = nxt
    with apply_pruner(model, method, budget=budget, seed=3) as h:
        out = logits_of(model, batch)[:, -1]
        kept = [k.clone() for k in h.kept_indices]
    packed = hf_packed_features(model, batch)
    for b, k in enumerate(kept):
        assert bool((k[1:] > k[:-1]).all())  # packed order
        if N_PACKED[b] <= budget:
            assert k.tolist() == list(range(N_PACKED[b]))  # an image within the budget reaches the LLM whole
        else:
            assert len(k) == budget
            lay = image_layout(SIZES[b], model.config.image_grid_pinpoints, 32, 4)
            assert bool((lay.src[k] >= 0).all())  # a pruned image loses its newline tokens
    ref = reference_on_tokens(model, processor, [packed[b][kept[b]] for b in range(2)])
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("method,budget", [("pooling", 30), ("visionzip", 30), ("recoverable", 30)])
def test_merging_pre_llm_equals_model_on_its_tokens(nxt, batch, method, budget):
    """Merging methods: the LLM sees exactly the assembled tokens (their count = the budget for visionzip/
    recoverable, at most the budget for pooling); the logits equal the unpruned model on them."""
    model, processor = nxt
    with apply_pruner(model, method, budget=budget) as h, ProjectorInputs(model) as rec:
        out = logits_of(model, batch)[:, -1]
        assert max(c.merged for c in h.token_counts) > 0
    toks = [t[0] for t in rec.calls[-2:]]  # [n_b, Dv] per image
    for t in toks:
        assert t.shape[0] <= budget and (method == "pooling" or t.shape[0] == budget)
    with torch.no_grad():
        feats = [model.model.multi_modal_projector(t) for t in toks]
    assert (out - reference_on_tokens(model, processor, feats)).abs().max() <= 1e-5


def test_pre_llm_tile_split_and_pooling_grid(nxt, batch):
    """The budget is split over tiles by their shown patches; pooling pools each tile's own rectangle."""
    model, _ = nxt
    lay = image_layout(SIZES[0], model.config.image_grid_pinpoints, 32, 4)
    sizes = [int(lay.view_patches(t).numel()) for t in range(lay.n_tiles)]
    assert sizes == [16, 12, 12, 12, 12]  # base tile, then 4 crops each losing one unpadded row
    shares = split_budget(30, sizes)
    with apply_pruner(model, "random", budget=30) as h:
        logits_of(model, batch)
        kept = h.kept_indices[0]
    pidx = lay.packed_index()
    tile_of = {int(pidx[i]): i // 16 for i in range(len(pidx)) if pidx[i] >= 0}
    assert [sum(tile_of[int(k)] == t for k in kept) for t in range(lay.n_tiles)] == shares
    with apply_pruner(model, "pooling", budget=30) as h:
        logits_of(model, batch)
        assert h.info["pooled_grid"] in ([2, 2], [2, 3], [3, 2], [1, 5], [3, 3])


# ---- vision stage (FlowCut) per tile -------------------------------------------------------------
def _flowcut_tile_by_hand(model, tile: torch.Tensor, view: torch.Tensor, share: int):
    """FlowCut on one tile, written out for the tiny ViT (feature layer 2: scored after layers 0 and 1,
    cut to ``share`` after layer 1), restricted to the tile's ``view`` patches (raster indices).
    Returns (kept view patches as tile raster indices, features of layer 2 on [CLS] + them [k, Dv])."""
    vt = model.model.vision_tower
    layers = vt.encoder.layers
    with torch.no_grad():
        hs = vt.pre_layrnorm(vt.embeddings(tile[None]))  # [1, 1 + 16, Dv]
        cum = None
        for i in (0, 1):
            attn = layers[i].self_attn
            x = layers[i].layer_norm1(hs)
            q, k, v = (proj(x).view(1, 17, -1, attn.head_dim).transpose(1, 2)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # each [1, H, 17, Dh]
            relation = ((q[:, :, :1] @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)[:, 0, 1:]  # [1, 16]
            cols = torch.cat([torch.tensor([0]), 1 + view])
            score = flow_scores(relation[:, view], v[:, :, cols], 1)  # [1, m]
            cum = score if cum is None else 0.5 * cum + 0.5 * score
            hs = layers[i](hs, None)
        kept = view[cum[0].topk(share).indices.sort().values]
        hs = layers[2](torch.cat([hs[:, :1], hs[:, 1 + kept]], dim=1), None)
    return kept, hs[0, 1:]


@pytest.mark.parametrize("budget", [30, 10])
def test_flowcut_per_tile_share_view_and_signals(nxt, batch, budget):
    """Each tile keeps exactly its share of the budget (split as for pre-LLM methods) among its patches that
    survive unpadding; the kept set and the features the projector receives equal FlowCut written out by
    hand on that tile alone; the image's kept count is the budget, in packed order, without newlines."""
    model, _ = nxt
    with apply_pruner(model, "flowcut", budget=budget) as h, ProjectorInputs(model) as rec:
        logits_of(model, batch)
        kept = [k.clone() for k in h.kept_indices]
        per_tile = [c.vision for c in h.token_counts]
    toks = [t[0] for t in rec.calls[-2:]]  # [n_b, Dv] per image, as fed to the projector
    pixels = batch["pixel_values"]
    for b, size in enumerate(SIZES):
        lay = image_layout(size, model.config.image_grid_pinpoints, 32, 4)
        views = [lay.view_patches(t) for t in range(lay.n_tiles)]
        shares = split_budget(budget, [int(v.numel()) for v in views])
        assert len(kept[b]) == budget == toks[b].shape[0]
        assert bool((kept[b][1:] > kept[b][:-1]).all()) and bool((lay.src[kept[b]] >= 0).all())
        pidx = lay.packed_index()
        want_slots, want_feats = [], []
        for t, (view, share) in enumerate(zip(views, shares)):
            assert per_tile[b][t] == [17, 17, 1 + share]  # ViT layers 0, 1 whole; layer 2 on CLS + the share
            tile_kept, feats = _flowcut_tile_by_hand(model, pixels[b, t], view, share)
            want_slots.append(pidx[t * 16 + tile_kept])
            want_feats.append(feats)
        slots = torch.cat(want_slots)
        order = slots.argsort()
        assert kept[b].tolist() == slots[order].tolist()
        assert (toks[b] - torch.cat(want_feats)[order]).abs().max() <= 1e-5


def test_flowcut_tile_without_a_share_is_not_run(nxt, batch):
    """Budget 3 over the 40 x 60 image's 5 tiles of 16/12/12/12/12 view patches: shares 1/1/1/0/0, so its
    last two tiles never enter the ViT; the 30 x 80 image's 3 tiles get 1 each."""
    model, _ = nxt
    with apply_pruner(model, "flowcut", budget=3) as h:
        logits_of(model, batch)
        assert [len(k) for k in h.kept_indices] == [3, 3]
        assert [c.vision for c in h.token_counts] == [[[17, 17, 2]] * 3] * 2


# ---- in-LLM ------------------------------------------------------------------------------------
def test_fastv_keeps_the_most_attended_packed_tokens(nxt, batch):
    """FastV over a ragged batch: per sample, the top-k of the last token's head-mean attention at layer
    K-1 over that image's packed run (eager attention of the unpruned model); inert slots never win."""
    model, _ = nxt
    with torch.no_grad():
        att = model(**batch, output_attentions=True).attentions[1]  # [B, H, L, L]
    ids = batch["input_ids"]
    start = (ids == model.config.image_token_id).float().argmax(1)
    with apply_pruner(model, "fastv", budget=25, layer=2) as h:
        logits_of(model, batch)
        kept = h.kept_indices
        assert [c.llm_visual for c in h.token_counts] == [[n, n, 25, 25] for n in N_PACKED]
    for b in range(2):
        row = att[b, :, -1, start[b] : start[b] + N_PACKED[b]].mean(0)
        assert set(kept[b].tolist()) == set(row.topk(25).indices.tolist())


def test_llm_stage_small_image_keeps_all_its_tokens(nxt, batch):
    model, _ = nxt
    with apply_pruner(model, "fastv", budget=60) as h:
        logits_of(model, batch)
        assert [len(k) for k in h.kept_indices] == [60, 52]
        assert h.token_counts[1].llm_visual == [52] * 4
        assert h.batch_counts.llm_visual_width == [70, 70, 60, 60]


# ---- batch of two = two batches of one ---------------------------------------------------------------
@pytest.mark.parametrize("method,budget,params", ALL)
def test_batch_of_two_equals_two_batches_of_one(nxt, batch, images, method, budget, params):
    model, processor = nxt
    with apply_pruner(model, method, budget=budget, **params) as h:
        both = logits_of(model, batch)[:, -1]
        kept_both = [k.clone() for k in h.kept_indices]
        for i in range(2):
            one = logits_of(model, single(processor, images, i))[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept_both[i])
        gen_both = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
        for i in range(2):
            gen_one = model.generate(**single(processor, images, i), max_new_tokens=3, do_sample=False)[:, -3:]
            assert torch.equal(gen_one[0], gen_both[i])


@pytest.mark.parametrize("method", ["random", "flowcut"])
def test_same_seed_same_result(nxt, batch, method):
    model, _ = nxt
    runs = []
    for seed in (0, 0, 1):
        with apply_pruner(model, method, budget=20, seed=seed) as h:
            out = logits_of(model, batch)
            runs.append(([k.tolist() for k in h.kept_indices], out))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    if method == "random":
        assert runs[0][0] != runs[2][0]
    else:  # FlowCut draws nothing at random
        assert runs[0][0] == runs[2][0]


# ---- generation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method,budget,params",
                         [PRE_LLM[0], PRE_LLM[4], IN_LLM[0], IN_LLM[3], IN_LLM[4], BOTH[0], VISION[0]])
def test_generate_runs_at_every_stage(nxt, batch, method, budget, params):
    model, _ = nxt
    with apply_pruner(model, method, budget=budget, **params) as h:
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
        assert gen.shape == (2, batch["input_ids"].shape[1] + 4)
        assert all(len(k) <= budget for k in h.kept_indices)


def _cached_loop(model, inputs, steps: int) -> torch.Tensor:
    """Greedy decoding with the KV cache and no position_ids (positions from the cache length)."""
    out = []
    with torch.no_grad():
        res = model(**inputs, use_cache=True)
        mask = inputs["attention_mask"]
        for step in range(steps):
            logits = res.logits[:, -1]
            out.append(logits)
            if step == steps - 1:
                break
            nxt = logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            res = model(input_ids=nxt, attention_mask=mask, past_key_values=res.past_key_values, use_cache=True)
    return torch.stack(out, 1)


@pytest.mark.parametrize(
    "method,params",
    [("random", {"budget": 30}), ("random", {"budget": 60}), ("visionzip", {"budget": 30}), ("flowcut", {"budget": 30}),
     ("_test_fixed_llm", {"budget": 10, "keep": [0, 3, 5, 8, 13, 21, 34, 50, 55, 60]}),
     ("_test_fixed_llm", {"budget": 10, "keep": [0, 3, 5, 8, 13, 21, 34, 50, 55, 60], "positions": "compact"})],
)
@pytest.mark.parametrize("which", ["batch", "unpadded"])
def test_cached_decoding_equals_recompute(nxt, batch, images, method, params, which):
    """generate() (positions given) and a manual cached loop (positions from the cache) both equal
    greedy decoding by full recompute. The fixed in-LLM pruner keeps slots 55 and 60 of the 70-wide run:
    inert slots of the 52-token image, which must stay masked. "unpadded" is a ragged batch whose prompts
    have the same length (the 52-token image's question is 18 words longer): no padding, so generate()
    drops the all-ones attention mask although the rewritten prompt has inert slots."""
    model, processor = nxt
    if which == "batch":
        inputs = batch
    else:
        longer = PROMPTS[0].replace("ASSISTANT:", "what " * (N_PACKED[0] - N_PACKED[1]) + "ASSISTANT:")
        inputs = processor(images=images, text=[PROMPTS[0], longer], return_tensors="pt", padding=True)
        assert bool(inputs["attention_mask"].all())
    steps = 4
    with apply_pruner(model, method, **params):
        gen = model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        loop = _cached_loop(model, inputs, steps)
    cached = torch.stack(gen.logits, 1)  # [B, steps, V]
    ref = greedy_recompute(model, inputs, steps, method, params)
    assert (cached - ref).abs().max() <= 1e-4
    assert (loop - ref).abs().max() <= 1e-4


def test_fixed_llm_keep_with_inert_slots_equals_alone(nxt, batch, images):
    """Keeping inert slots changes nothing for the real tokens: sample 2 (52 tokens) in a 70-wide batch
    keeps its real slots 0..50 of the kept list only."""
    model, processor = nxt
    keep = [0, 3, 5, 8, 13, 21, 34, 50, 55, 60]
    with apply_pruner(model, "_test_fixed_llm", budget=10, keep=keep) as h:
        both = logits_of(model, batch)[:, -1]
        assert [k.tolist() for k in h.kept_indices] == [keep, keep[:8]]
    with apply_pruner(model, "_test_fixed_llm", budget=8, keep=keep[:8]):
        one = logits_of(model, single(processor, images, 1))[:, -1]
    assert (one[0] - both[1]).abs().max() <= 1e-4


# ---- errors / removal -----------------------------------------------------------------------------
def test_vision_stage_combined_with_another_stage_is_refused(nxt):
    model, _ = nxt
    with pytest.raises(ValueError) as exc:
        apply_pruner(model, "_test_vision_and_llm", budget=10)
    msg = str(exc.value)
    for w in ["_test_vision_and_llm", "LlavaNextForConditionalGeneration", "'vision' alone", "pre_llm", "['llm']"]:
        assert w in msg
    assert not model._forward_pre_hooks
    assert getattr(model, "_prunebench_handle", None) is None or model._prunebench_handle.removed


@pytest.mark.parametrize(
    "method,kwargs,words",
    [("random", {"budget": N_MAX + 1}, ["budget", f"1..{N_MAX}"]), ("fastv", {"budget": 4, "layer": 4}, ["1..3"])],
)
def test_bad_parameters_raise(nxt, method, kwargs, words):
    model, _ = nxt
    with pytest.raises(ValueError) as exc:
        apply_pruner(model, method, **kwargs)
    assert all(w in str(exc.value) for w in words)
    assert not model._forward_pre_hooks


def test_bad_inputs_raise(nxt, batch):
    model, _ = nxt
    with apply_pruner(model, "random", budget=10):
        with pytest.raises(ValueError, match="image_sizes"):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"])
        wrong = batch["image_sizes"].flip(0)  # swapped sizes: placeholder runs do not match
        with pytest.raises(ValueError, match="placeholder"):
            model(**{**batch, "image_sizes": wrong})


def test_remove_restores_and_attach_lists_classes(nxt, batch):
    model, _ = nxt
    ref = logits_of(model, batch)
    h = apply_pruner(model, "fastv", budget=10)
    assert logits_of(model, batch).shape != ref.shape
    h.remove()
    assert torch.equal(logits_of(model, batch), ref)
    assert not model._forward_pre_hooks
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)
    with pytest.raises(TypeError) as exc:
        apply_pruner(model.model.language_model, "random", budget=4)
    assert "LlavaNextForConditionalGeneration" in str(exc.value) and "LlavaForConditionalGeneration" in str(exc.value)


def test_llava_adapter_unchanged_by_subclass_hooks():
    """The LLaVA-1.5 family has no inert columns: its _advancing() stays None."""
    from mllm_adapters.families.llava import LlavaSpec

    model, _ = build_tiny_llava(seed=0)
    with apply_pruner(model, "fastv", budget=5) as h:
        assert type(h.adapter.spec) is LlavaSpec and h.adapter._advancing() is None


@pytest.mark.parametrize("method,budget", [("none", None), ("random", 30), ("fastv", 30), ("fastv", 60),
                                           ("flowcut", 30)])
def test_sdpa_ragged_batch_equals_singles(images, method, budget):
    """With SDPA everywhere the inert slots are masked through the 4D mask transformers builds from the
    2D one: batch of two = two batches of one, and keep-all = unpruned."""
    model, processor = build_tiny_llava_next(seed=0, attn_implementation="sdpa")
    inputs = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    ref = logits_of(model, inputs)[:, -1]
    with apply_pruner(model, method, budget=budget):
        both = logits_of(model, inputs)[:, -1]
        for i in range(2):
            one = logits_of(model, single(processor, images, i))[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4
    if budget is None:
        assert torch.equal(both, ref)


def test_layout_counts_at_llava_next_7b_geometry():
    """LLaVA-NeXT-7B geometry (336 px tiles of 14 px patches, the default pinpoints): the packed run length
    equals the processor's placeholder count for many image sizes, and the maximum is 576 + 48 x 49."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from mllm_adapters.tiny import TINY_WORDS, make_word_tokenizer

    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    ip = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 image_grid_pinpoints=pins)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=make_word_tokenizer(TINY_WORDS), patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    assert max_packed_tokens(pins, 336, 24) == 576 + 48 * 49
    rng = np.random.RandomState(0)
    sizes = [(336, 336), (480, 640), (640, 480), (200, 1000), (1000, 200), (1, 1), (2000, 100)]
    sizes += [tuple(int(v) for v in rng.randint(20, 1500, 2)) for _ in range(40)]
    for h, w in sizes:
        lay = image_layout((h, w), pins, 336, 24)
        assert lay.n_packed == proc._get_number_of_features(h, w, 336, 336) - 1, (h, w)
        assert lay.n_packed <= 576 + 48 * 49
        shown = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in lay.rects)
        assert shown + int((lay.src < 0).sum()) == lay.n_packed  # tile views + newlines = the run
