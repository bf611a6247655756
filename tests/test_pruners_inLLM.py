"""Issue 6: transprune, vflowopt and pdrop on the tiny LLaVA (36 patches + CLS, 4-layer ViT, 4-layer
Llama with GQA): the shared invariants and the definition tests on small hand-made inputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mllm_adapters import apply_pruner
from pruners import get_pruner_class, register_pruner
from pruners.base import LLMLayerContext, ModelInfo, Pruner
from pruners.pdrop import pdrop_schedule
from pruners.transprune import layer_ttv, transprune_schedule
from pruners.vflowopt import VFlowOpt, patch_entropy, vflowopt_schedule
from tests._adapter_helpers import cached_and_recomputed, greedy_recompute
from tests.conftest import PROMPTS, make_images, single
from tests.test_core_invariants import logits_of

N_VIS = 36

METHODS = [
    ("transprune", {}),
    ("transprune", {"use_iga": False}),
    ("transprune", {"positions": "original"}),
    ("pdrop", {}),
    ("vflowopt", {}),
    ("vflowopt", {"r_v": 0.5, "r_1": 0.8, "t": 0.5, "m": 2, "alpha": 0.5}),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'default'}" for m, p in METHODS]


@register_pruner("_test_replay_llm")
class ReplayLLM(Pruner):
    """Test-only: replays recorded in-LLM decisions ({layer: [B, k] indices into current visual tokens})."""

    stages = ("llm",)
    defaults = {"keeps": None, "positions": "original"}

    def llm_layers(self) -> list[int]:
        return sorted(self.params["keeps"])

    def llm_attention_layers(self) -> list[int]:
        return []

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor:
        return self.params["keeps"][ctx.layer]


def _record_llm_decisions(handle) -> dict[int, torch.Tensor]:
    """Wrap the attached pruner's prune_llm so each layer's returned indices are recorded."""
    rec: dict[int, torch.Tensor] = {}
    inner = handle.pruner.prune_llm

    def wrapped(ctx):
        keep = inner(ctx)
        rec[ctx.layer] = keep.sort(dim=1).values.clone()
        return keep

    handle.pruner.prune_llm = wrapped
    return rec


# ---- shared invariants ---------------------------------------------------------------------------
@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
@pytest.mark.parametrize("budget", [None, N_VIS])
def test_keep_all_reproduces_unpruned_logits(tiny, batch, method, params, budget):
    model, _ = tiny
    ref = logits_of(model, batch)
    with apply_pruner(model, method, budget=budget, **params):
        out = logits_of(model, batch)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
def test_batch_of_two_equals_two_batches_of_one(tiny, batch, method, params):
    model, processor = tiny
    with apply_pruner(model, method, budget=6, **params) as h:
        both = logits_of(model, batch)[:, -1]
        kept_both = [k.clone() for k in h.kept_indices]
        for i in range(2):
            one = logits_of(model, single(processor, i))[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4
            if method != "vflowopt":  # vflowopt may pass a kept token as a one-token merge in a batch
                assert torch.equal(h.kept_indices[0], kept_both[i])
        gen_both = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
        for i in range(2):
            gen_one = model.generate(**single(processor, i), max_new_tokens=3, do_sample=False)[:, -3:]
            assert torch.equal(gen_one[0], gen_both[i])


@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
def test_same_seed_same_result(tiny, batch, method, params):
    model, _ = tiny
    runs = []
    for _ in range(2):
        with apply_pruner(model, method, budget=6, seed=0, **params) as h:
            out = logits_of(model, batch)
            runs.append((out, [k.tolist() for k in h.kept_indices], list(h.token_counts)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1:] == runs[1][1:]


@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
def test_generate_with_pruned_cache_equals_recompute(tiny, batch, method, params):
    """Cached greedy decoding equals re-running the whole sequence each step with the same kept tokens.

    In-LLM decisions depend on the text (and so on the generated tokens); the reference replays the
    prefill's per-layer decisions. VFlowOpt's decisions depend on the image only: it recomputes itself.
    """
    model, _ = tiny
    steps = 4
    with apply_pruner(model, method, budget=6, **params) as h:
        rec = _record_llm_decisions(h) if method != "vflowopt" else {}
        gen = model.generate(**batch, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        positions = h.adapter.positions  # as the engine resolved it for this model
    cached = torch.stack(gen.logits, 1)  # [B, steps, V]
    if method == "vflowopt":
        ref = greedy_recompute(model, batch, steps, method, {"budget": 6, **params})
    else:
        assert len(rec) == 3
        ref = greedy_recompute(model, batch, steps, "_test_replay_llm",
                                {"budget": 6, "keeps": rec, "positions": positions})
    assert (cached - ref).abs().max() <= 1e-4


def test_token_counts_follow_the_schedule(tiny, batch):
    model, _ = tiny
    with apply_pruner(model, "transprune", budget=6) as h:
        logits_of(model, batch)
        assert h.token_counts[0].llm_visual == transprune_schedule(N_VIS, 4, 6)["per_layer"] == [36, 32, 22, 6]
    with apply_pruner(model, "pdrop", budget=6) as h:
        logits_of(model, batch)
        assert h.token_counts[0].llm_visual == pdrop_schedule(N_VIS, 4, 6)["per_layer"]
    with apply_pruner(model, "vflowopt", budget=6, r_v=0.5, r_1=0.5) as h:
        logits_of(model, batch)
        assert h.token_counts[0].llm_visual == vflowopt_schedule(N_VIS, 4, 6, 0.5, 0.5)["per_layer"] == [18, 9, 9, 6]


# ---- TransPrune definitions ----------------------------------------------------------------------
def test_ttv_zero_output_is_minimum_and_direction_ranks_at_equal_magnitude():
    """Hand-made sub-layer inputs/outputs: 5 tokens, D = 2."""
    x = torch.tensor([[[1.0, 0.0]] * 5])  # [1, 5, 2], unit inputs
    # equal magnitude ||y|| = 1 for tokens 1..4, growing direction change; token 0 has y = 0
    ang = torch.tensor([0.0, 0.3, 1.0, 2.0, 3.0])
    y = torch.stack([torch.cos(ang), torch.sin(ang)], -1)[None]
    y[0, 0] = 0.0
    zero = torch.zeros_like(x)
    cap = {"attn_in": x, "attn_out": y, "mlp_in": x, "mlp_out": zero}  # MLP contributes nothing
    ttv = layer_ttv(cap)[0]  # [5]
    assert ttv.shape == (5,)
    assert int(ttv.argmin()) == 0 and float(ttv[0]) == 0.0
    assert bool((ttv[1:][1:] > ttv[1:][:-1]).all())  # larger direction change ranks higher
    # a masked (padding) token is ignored by the softmax and scores 0
    mask = torch.tensor([[True, True, True, True, False]])
    assert float(layer_ttv(cap, mask)[0, 4]) == 0.0


def test_transprune_default_schedule_llava15():
    s = transprune_schedule(576, 32, 72)
    assert s["layers"] == [7, 9, 12]
    assert [576] + s["counts"] == [576, 504, 360, 72]
    assert s["per_layer"][6] == 576 and s["per_layer"][7] == 504 and s["per_layer"][9] == 360
    assert s["per_layer"][11] == 360 and s["per_layer"][12] == 72
    assert abs(s["equiv_tokens"] - 236) < 0.5  # 236.25
    assert transprune_schedule(576, 32)["counts"][-1] == 72  # budget None = authors' 12.5%
    assert transprune_schedule(144, 8, 18)["layers"] == [2, 3, 4]  # scaled to 8 layers
    assert transprune_schedule(36, 4, 6)["layers"] == [1, 2, 3]


def test_pdrop_and_vflowopt_default_schedules():
    s = pdrop_schedule(576, 32, 72)
    assert s["layers"] == [8, 16, 24] and s["counts"] == [288, 144, 72] and abs(s["lam"] - 0.5) < 1e-12
    assert pdrop_schedule(576, 32, 72, lam=0.6)["counts"] == [346, 207, 72]
    v = vflowopt_schedule(576, 28, 58, r_v=0.25, r_1=0.8)  # n_v = 144, n_1 = 115, r_2 solved = 58/115
    assert v["layers"] == [9, 18] and v["pre_llm"] == 144 and v["counts"] == [115, 58]
    assert abs(v["r_2"] - 58 / 115) < 1e-12
    with pytest.raises(ValueError, match="budget"):
        vflowopt_schedule(576, 28, 200, r_v=0.25, r_1=0.8)


def test_transprune_ttv_only_keeps_top_ttv(tiny, batch):
    """With use_iga=False the first pruning point keeps the top tokens of TTV of layer K-1, recomputed
    here from forward hooks on the unhooked model."""
    model, _ = tiny
    layer = model.model.language_model.layers[0]  # K = 1 on the tiny model, window = layer 0
    cap: dict[str, torch.Tensor] = {}
    hooks = [
        layer.self_attn.register_forward_hook(
            lambda m, a, kw, out: cap.update(attn_in=kw["hidden_states"], attn_out=out[0]), with_kwargs=True),
        layer.mlp.register_forward_hook(lambda m, a, out: cap.update(mlp_in=a[0], mlp_out=out)),
    ]
    try:
        logits_of(model, batch)
    finally:
        for hk in hooks:
            hk.remove()
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    ttv = layer_ttv(cap, mask)
    start = (ids == model.config.image_token_id).float().argmax(1)
    with apply_pruner(model, "transprune", budget=6, use_iga=False) as h:
        rec = _record_llm_decisions(h)
        logits_of(model, batch)
    for b in range(2):
        vis = ttv[b, int(start[b]) : int(start[b]) + N_VIS]
        assert set(rec[1][b].tolist()) == set(vis.topk(32).indices.tolist())


def test_bad_parameters_raise_clear_errors(tiny):
    model, _ = tiny
    cases = [
        ("transprune", {"layers": [2, 1, 3]}, ["layers", "1..3"]),
        ("transprune", {"ratios": [0.5]}, ["ratios"]),
        ("transprune", {"use_iga": "yes"}, ["use_iga"]),
        ("pdrop", {"lam": 1.5}, ["lam", "(0, 1]"]),
        ("vflowopt", {"r_v": 0.1, "r_1": 0.5}, ["budget", "r_v"]),
        ("vflowopt", {"m": -1}, ["m"]),
        ("vflowopt", {"vision_layer": 9}, ["vision_layer", "0..2"]),
    ]
    for method, params, words in cases:
        with pytest.raises(ValueError) as exc:
            apply_pruner(model, method, budget=6, **params)
        for w in words:
            assert w in str(exc.value), (method, params, str(exc.value))
        assert not model._forward_pre_hooks


# ---- VFlowOpt definitions ------------------------------------------------------------------------
def _fake_info(gh: int = 4, gw: int = 4) -> ModelInfo:
    return ModelInfo(family="llava", num_visual_tokens=gh * gw, grid_hw=(gh, gw), has_cls=True,
                     vision_num_layers=4, vision_feature_layer=2, vision_num_heads=4, llm_num_layers=4,
                     llm_hidden_size=8)


def test_vflowopt_recycled_token_is_importance_weighted_mean_of_its_cells_dropped_tokens():
    """4 x 4 grid, m = 2 (four 2 x 2 cells), n_v = 8 reaching the LLM. Importance is hand-made."""
    info = _fake_info()
    p = VFlowOpt(budget=4, r_v=0.5, r_1=1.0, m=2)  # n_v = 8
    p.attach(info)
    imp = torch.tensor([[16, 15, 1, 2,
                         14, 13, 3, 4,
                         5, 6, 9, 10,
                         7, 8, 11, 12]], dtype=torch.float32)  # [1, 16]
    x = torch.randn(1, 16, 3, generator=torch.Generator().manual_seed(0))
    p.importance = lambda ctx: imp
    ctx = SimpleNamespace(features=x, patch_index=torch.arange(16)[None], info=info)
    d = p.prune_pre_llm(ctx)
    # kept k + recycled cells = 8: keep the top 5 (16,15,14,13,12 -> indices 0,1,4,5,15); dropped tokens
    # fall in 3 cells (top-right, bottom-left, bottom-right) -> 5 + 3 = 8.
    assert sorted(d.keep[0].tolist()) == [0, 1, 4, 5, 15]
    assert d.merged.shape == (1, 3, 3)
    cells = {2: [2, 3, 6, 7], 8: [8, 9, 12, 13], 14: [10, 11, 14]}  # anchor -> dropped members
    expected_anchor = {7: 2, 13: 8, 14: 14}  # most important dropped token of each cell
    got = {int(a): d.merged[0, s] for s, a in enumerate(d.merged_anchor[0].tolist())}
    assert sorted(got) == sorted(expected_anchor)
    for anchor, key in expected_anchor.items():
        members = torch.tensor(cells[key])
        w = imp[0, members]
        ref = (w[:, None] * x[0, members]).sum(0) / w.sum()
        assert torch.allclose(got[anchor], ref, atol=1e-6)
    # scores: kept tokens' importance, then each recycled token carries its anchor's importance
    assert d.scores.shape == (1, 8)
    assert sorted(d.scores[0, 5:].tolist()) == sorted(float(imp[0, a]) for a in expected_anchor)


def test_vflowopt_importance_from_eager_vit_attention(tiny, batch):
    """Context relevance equals the definition computed from the ViT's own eager attention weights."""
    model, _ = tiny
    t, layer = 1.2, 1
    with torch.no_grad():
        att = model.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions[layer]
    A = att.mean(1)  # [B, T, T] head mean
    received = A.mean(1)
    glob = received > t * received.mean(1, keepdim=True)
    assert bool(glob.any(1).all())
    c = torch.stack([A[b][glob[b]].mean(0)[1:] for b in range(2)])  # [B, N]
    cls = get_pruner_class("vflowopt")
    with apply_pruner(model, "vflowopt", budget=6, r_v=0.5, t=t, vision_layer=layer) as h:
        seen = {}
        inner = h.pruner.importance
        h.pruner.importance = lambda ctx: seen.setdefault("imp", inner(ctx))
        logits_of(model, batch)
    assert isinstance(h.pruner, cls)
    assert torch.allclose(seen["imp"], c, atol=1e-5)


def test_patch_entropy_hand_made():
    """A flat patch has entropy 0; a patch with two grey levels in equal shares has 1 bit."""
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    img = torch.zeros(1, 3, 4, 8)  # 1 x 2 grid of 4 x 4 patches; 0 = grey 0.5 after de-normalising
    img[0, :, :, 4:6] = 1.0  # right patch: half its pixels at grey 1.0
    e = patch_entropy(img, (1, 2), mean, std)
    assert torch.allclose(e, torch.tensor([[0.0, 1.0]]))


def test_pdrop_first_stage_keeps_most_attended(tiny, batch):
    """PDrop's first stage keeps the top of the last token's head-mean attention at layer K-1 (eager)."""
    model, _ = tiny
    with torch.no_grad():
        att = model(**batch, output_attentions=True).attentions[0]  # K = 1 on the tiny model
    start = (batch["input_ids"] == model.config.image_token_id).float().argmax(1)
    with apply_pruner(model, "pdrop", budget=6) as h:
        rec = _record_llm_decisions(h)
        logits_of(model, batch)
    k = rec[1].shape[1]
    for b in range(2):
        row = att[b, :, -1, int(start[b]) : int(start[b]) + N_VIS].mean(0)
        assert set(rec[1][b].tolist()) == set(row.topk(k).indices.tolist())


def test_registered():
    from pruners import available_pruners

    assert {"transprune", "vflowopt", "pdrop"} <= set(available_pruners())
    assert PROMPTS  # fixtures importable


@pytest.mark.parametrize("method,params", METHODS, ids=IDS)
def test_sdpa_gives_the_eager_kept_set(tiny, tiny_sdpa, batch, method, params):
    """Scoring never needs eager attention weights: SDPA everywhere keeps the same tokens."""
    kept = []
    for model, _ in (tiny, tiny_sdpa):
        with apply_pruner(model, method, budget=6, **params) as h:
            out = logits_of(model, batch)[:, -1]  # padded rows differ between kernels; real ones agree
            kept.append(([k.tolist() for k in h.kept_indices], out))
    assert kept[0][0] == kept[1][0]
    assert (kept[0][1] - kept[1][1]).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def embedded_layout():
    """The embedded default model's architecture (8-layer Llama, 12 x 12 patches), random weights."""
    from benchmarks.embedded import model as M

    model, processor = M.build_llava(seed=0)
    model.eval()
    texts = [f"USER: <image>\n{q} ASSISTANT:" for q in ("what colour is the circle ?", "how many ?")]
    return model, processor, processor(images=make_images(2, size=M.IMAGE_SIZE), text=texts,
                                       return_tensors="pt", padding=True)


@pytest.mark.parametrize("method,params", METHODS[:2] + METHODS[3:5], ids=IDS[:2] + IDS[3:5])
def test_embedded_layout_schedule_and_batch_of_two(embedded_layout, method, params):
    model, processor, inputs = embedded_layout
    n_vis = model.config.vision_config.image_size // model.config.vision_config.patch_size
    n_vis *= n_vis
    budget = n_vis // 8
    with apply_pruner(model, method, budget=budget, **params) as h:
        both = logits_of(model, inputs)[:, -1]
        counts = h.token_counts[0].llm_visual
        assert all(c.llm_visual == counts for c in h.token_counts)
        assert len(counts) == 8 and counts[-1] == budget
        assert counts == h.pruner.token_schedule()
        for i in range(2):
            one_inputs = {k: v[i : i + 1] for k, v in inputs.items()}
            pad = int((one_inputs["attention_mask"][0] == 0).sum())
            one_inputs = {k: (v[:, pad:] if k in ("input_ids", "attention_mask") else v) for k, v in one_inputs.items()}
            one = logits_of(model, one_inputs)[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4


def test_transprune_flat_ratio_parameters_for_the_tuner():
    cls = get_pruner_class("transprune")
    assert cls(budget=6, ratio_1=0.9, ratio_2=0.8).params["ratios"] == [0.9, 0.8]
    assert "ratio_1" not in cls(budget=6, ratio_1=0.9, ratio_2=0.8).params  # folded into ratios
    with pytest.raises(ValueError, match=r"ratio_1=0.9, ratio_2=0.95 .*non-increasing"):  # not clamped
        cls(budget=6, ratio_1=0.9, ratio_2=0.95)
    with pytest.raises(ValueError, match="not both"):
        cls(budget=6, ratio_1=0.9, ratios=[0.9, 0.5])
    with pytest.raises(ValueError, match="ratio_1, ratio_2"):
        cls(budget=6, ratio_x=0.9)


def test_llava15_shaped_counts_through_the_adapter():
    """A narrow model with LLaVA-1.5's token layout (24 x 24 patches) and depth (32 layers): the adapter
    produces the authors' schedules, 576 -> 504 -> 360 -> 72 after layers 7, 9, 12 (236.25 equivalent)."""
    from benchmarks.flops import equiv_tokens
    from mllm_adapters.tiny import build_tiny_llava

    model, processor = build_tiny_llava(seed=0, image_size=336, patch_size=14, text_layers=32)
    inputs = processor(images=make_images(1, size=336), text=PROMPTS[:1], return_tensors="pt")
    with apply_pruner(model, "transprune", budget=72) as h:
        logits_of(model, inputs)
        counts = h.token_counts[0].llm_visual
    assert counts == [576] * 7 + [504] * 2 + [360] * 3 + [72] * 20
    assert equiv_tokens(h.token_counts[0], 32, 576) == 236.25
    with apply_pruner(model, "pdrop", budget=72) as h:
        logits_of(model, inputs)
        assert h.token_counts[0].llm_visual == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8


# ---- several images in one sample ---------------------------------------------------------------------
TWO_IMAGES = ["USER: <image> and <image> what is the colour of the circle ? ASSISTANT:", "USER: <image> how many ? ASSISTANT:"]


def _two_image_batch(processor):
    """Sample 0 holds two images (text between their runs), sample 1 one; left-padded."""
    return processor(images=make_images(3), text=TWO_IMAGES, return_tensors="pt", padding=True)


def test_fastv_ranks_the_visual_tokens_of_both_images_together(tiny):
    """In-LLM pruning of a two-image sample: FastV keeps the top of the last token's head-mean attention
    (eager, layer K - 1) over the visual tokens of BOTH images, as many as the images' counts summed,
    and reports each image's kept indices on its own; the one-image sample beside it is as if alone."""
    model, processor = tiny
    x = _two_image_batch(processor)
    with torch.no_grad():
        att = model(**x, output_attentions=True).attentions[0]  # [B, H, L, L], layer K - 1 = 0
    with apply_pruner(model, "fastv", budget=6, layer=1) as h:
        rec: dict[int, torch.Tensor] = {}
        inner = h.pruner.prune_llm

        def recorded(ctx):  # a ragged batch: sample 1 keeps fewer real tokens, its row padded with fillers
            out = inner(ctx)
            rec[ctx.layer] = (out.keep if hasattr(out, "keep") else out).sort(dim=1).values.clone()
            return out

        h.pruner.prune_llm = recorded
        both = logits_of(model, x)[:, -1]
        kept = [k.clone() for k in h.kept_indices]
        counts = list(h.token_counts)
        assert len(kept) == 3  # one entry per image
        cols = (x["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]  # both runs, text between
        assert not bool((cols[1:] - cols[:-1] == 1).all())
        row = att[0, :, -1, cols].mean(0)  # [2 * N_VIS]
        k = rec[1][0].numel()
        assert counts[0].llm_visual[1] == k and counts[1].llm_visual[1] == k // 2  # two images' counts, summed
        top = set(row.topk(k).indices.tolist())
        assert set(rec[1][0].tolist()) == top
        assert sorted(kept[0].tolist() + [N_VIS + i for i in kept[1].tolist()]) == sorted(top)
        one = logits_of(model, processor(images=make_images(3)[2:], text=TWO_IMAGES[1:], return_tensors="pt"))
        assert (one[0, -1] - both[1]).abs().max() <= 1e-4
        assert torch.equal(h.kept_indices[0], kept[2])


@pytest.mark.parametrize("method,params", [("fastv", {"layer": 1}), ("pdrop", {}), ("sparsevlm", {})])
def test_two_image_sample_cached_generate_equals_recompute(tiny, method, params, monkeypatch):
    """Cached greedy decoding of a batch holding a two-image sample equals the full recompute replaying the
    prefill's per-layer decisions (the visual slots of that sample are not one span)."""
    model, processor = tiny
    cached, ref = cached_and_recomputed(model, _two_image_batch(processor), method, {"budget": 6, **params}, 3,
                                        monkeypatch)
    assert (cached - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("method,params", [("fastv", {"layer": 1}), ("pdrop", {}), ("sparsevlm", {})])
def test_two_image_sample_flops_match_flop_counter(tiny, method, params):
    """A two-image sample alone: the analytic prefill FLOPs from its counts (both images' visual tokens per
    decoder layer) plus the pruner's overhead equal FlopCounterMode."""
    from benchmarks.flops import prefill_flops
    from tests._adapter_helpers import counted_flops, text_tokens

    model, processor = tiny
    x = processor(images=make_images(2), text=TWO_IMAGES[:1], return_tensors="pt")
    with apply_pruner(model, method, budget=6, tokenizer=processor.tokenizer, **params) as h:
        h.count_overhead_flops = True
        measured = counted_flops(model, x)
        (c,) = h.token_counts
        overhead = h.overhead_flops
    assert c.visual_in == 2 * N_VIS and c.views == 2 and min(c.llm_visual) < 2 * N_VIS
    f = prefill_flops(model.config, text_tokens(model, x, 0), c, overhead=overhead)
    assert abs(f.total - measured) / measured < 0.01, (f.as_dict(), measured, c)
