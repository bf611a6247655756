"""Issue 5: the pre-LLM / vision-stage seed methods (vtc_cls, flowcut, recoverable, visionzip,
divprune, pooling) on the pruning core.

For every method: keep-all = unpruned; the pruned logits equal the unpruned model run on exactly
the tokens the LLM received (and those tokens are what the method says: HF's own features at the
kept indices, or an independent recomputation for FlowCut's shrunk ViT and for pooling); a batch of
two = two batches of one; same seed, same result; generate() with the pruned cache = recompute.
Then each method's definition on hand-made inputs, FlowCut's schedule and ViT FLOPs, and the CLS
requirement.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from benchmarks.flops import vision_flops
from mllm_adapters import apply_pruner
from mllm_adapters.tiny import build_tiny_llava
from pruners import available_pruners, get_pruner_class, register_pruner
from pruners.base import ModelInfo, PreLLMContext, PreLLMDecision, Pruner
from pruners.divprune import maxmin_order
from pruners.flowcut import entropy_ratio, flowcut_cut, flowcut_schedule
from pruners.pooling import pooled_grid
from pruners.recoverable import (
    fixed_split,
    high_outliers,
    merge_clusters,
    question_first_line,
    recoverable_select,
)
from pruners.visionzip import contextual_tokens, visionzip_split
from tests._adapter_helpers import ProjectorInputs
from tests.conftest import PROMPTS, make_images, single

N_VIS = 36
BUDGET = 9  # pooling: 3 x 3 exactly; visionzip 8 + 1; recoverable 6 keep + 2 recover + 1 merged
METHODS = ["vtc_cls", "flowcut", "recoverable", "visionzip", "divprune", "pooling"]
CLS_METHODS = ["vtc_cls", "flowcut", "recoverable", "visionzip"]
MERGING = {"recoverable", "visionzip", "pooling"}


@register_pruner("_test_fixed_tokens")
class FixedTokens(Pruner):
    """Test-only: feed the LLM exactly the given [B, n, Dv] tokens (as merged tokens)."""

    stages = ("pre_llm",)
    defaults = {"tokens": None}

    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        t = self.params["tokens"]
        return PreLLMDecision(keep=torch.empty(t.shape[0], 0, dtype=torch.long), merged=t)


@pytest.fixture(scope="module")
def tiny8():
    """Tiny LLaVA with an 8-layer ViT (feature layer 6): FlowCut prunes after layers 1, 3 and 5."""
    return build_tiny_llava(seed=0, vision_layers=8)


def logits_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _vision_features(model, pixel_values) -> torch.Tensor:
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def _run_with_features(model, processor, prompts, tokens) -> torch.Tensor:
    """Unpruned model on prompts whose image run holds exactly ``tokens`` [B, n, Dv] (pre-projector)."""
    n = tokens.shape[1]
    tok = processor.tokenizer([p.replace("<image>", "<image>" * n) for p in prompts], return_tensors="pt", padding=True)
    feats = [model.model.multi_modal_projector(t[None])[0] for t in tokens]
    with torch.no_grad():
        return model(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)},
        ).logits


def _pruned(model, inputs, method, budget=BUDGET, **params):
    with ProjectorInputs(model) as cap, apply_pruner(model, method, budget=budget, **params) as h:
        out = logits_of(model, inputs)
        return out, cap.calls[-1].detach(), [k.clone() for k in h.kept_indices], list(h.token_counts), dict(h.info)


# ---- registry and shared invariants ---------------------------------------------------------------
def test_all_six_registered():
    assert set(METHODS) <= set(available_pruners())


@pytest.mark.parametrize("budget", [None, N_VIS])
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_reproduces_unpruned_logits(tiny, batch, method, budget):
    model, _ = tiny
    ref = logits_of(model, batch)
    with apply_pruner(model, method, budget=budget):
        out = logits_of(model, batch)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("method", [m for m in METHODS if m != "flowcut"])
def test_pre_llm_equals_model_on_exact_tokens(tiny, batch, method):
    model, processor = tiny
    out, tokens, kept, counts, info = _pruned(model, batch, method)
    assert tokens.shape[1] == (BUDGET if method != "pooling" else 9)
    assert all(c.llm_visual == [tokens.shape[1]] * 4 for c in counts)
    feats = _vision_features(model, batch["pixel_values"])
    lead = 1 if method == "visionzip" else 0  # VisionZip's CLS state comes first (the authors' order)
    if lead:
        with torch.no_grad():
            hs = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
        assert torch.allclose(tokens[:, 0], hs[model.config.vision_feature_layer][:, 0], atol=1e-6)
    for b in range(2):
        k = kept[b]
        assert bool((k[1:] > k[:-1]).all())  # raster order
        assert torch.allclose(tokens[b, lead : lead + len(k)], feats[b, k], atol=1e-6)  # HF's own features
        if method not in MERGING:
            assert len(k) == BUDGET
    if method == "pooling":  # 6 x 6 -> 3 x 3 average pooling of the feature grid, exactly
        grid = feats.view(2, 6, 6, -1).permute(0, 3, 1, 2)
        pooled = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # [B, 9, Dv]
        assert torch.allclose(tokens, pooled, atol=1e-6)
    ref = _run_with_features(model, processor, PROMPTS, tokens)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5


def test_flowcut_equals_hand_shrunk_vit(tiny, batch):
    """4-layer ViT, feature layer 2: FlowCut cuts straight to the budget after layer 1 (rpl = 0)."""
    model, processor = tiny
    out, tokens, kept, counts, _ = _pruned(model, batch, "flowcut")
    assert all(c.vision == [[1 + N_VIS, 1 + N_VIS, 1 + BUDGET]] for c in counts)
    vt = model.model.vision_tower
    with torch.no_grad():
        hs = vt.pre_layrnorm(vt.embeddings(batch["pixel_values"]))
        hs = vt.encoder.layers[1](vt.encoder.layers[0](hs, None), None)
        keep = torch.stack(kept)  # [B, k] raster indices
        hs = torch.cat([hs[:, :1], hs[:, 1:].gather(1, keep[..., None].expand(-1, -1, hs.shape[-1]))], 1)
        hs = vt.encoder.layers[2](hs, None)
    assert torch.allclose(tokens, hs[:, 1:], atol=1e-5)
    ref = _run_with_features(model, processor, PROMPTS, tokens)
    assert (out - ref).abs().max() <= 1e-5


def _batch_vs_single(model, processor, inputs, method, **params):
    with apply_pruner(model, method, budget=BUDGET, **params) as h:
        both = logits_of(model, inputs)[:, -1]
        kept_both = [k.clone() for k in h.kept_indices]
        counts_both = list(h.token_counts)
        width_both = h.batch_counts.vision_width
        for i in range(2):
            one = logits_of(model, single(processor, i))[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept_both[i])
            assert counts_both[i].vision == h.token_counts[0].vision
        gen_both = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:]
        for i in range(2):
            gen_one = model.generate(**single(processor, i), max_new_tokens=3, do_sample=False)[:, -3:]
            assert torch.equal(gen_one[0], gen_both[i])
    return counts_both, width_both


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_two_equals_two_batches_of_one(tiny, batch, method):
    model, processor = tiny
    _batch_vs_single(model, processor, batch, method)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_flowcut_ragged_batch_equals_singles(tiny8, attn):
    """8-layer ViT: images cut different amounts at layer 3 and 5; the padded batch equals them alone
    (the padded keys are masked in the ViT's eager and SDPA attention alike)."""
    model, processor = tiny8 if attn == "eager" else build_tiny_llava(seed=0, vision_layers=8, attn_implementation=attn)
    inputs = processor(images=make_images(2), text=PROMPTS, return_tensors="pt", padding=True)
    counts, width = _batch_vs_single(model, processor, inputs, "flowcut")
    per = [c.vision[0] for c in counts]
    assert per[0] != per[1]  # the ragged path was exercised
    assert width == [max(a, b) for a, b in zip(*per)]


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_result(tiny, batch, method):
    model, _ = tiny
    runs = [_pruned(model, batch, method, seed=0) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert [k.tolist() for k in runs[0][2]] == [k.tolist() for k in runs[1][2]]


@pytest.mark.parametrize("method", METHODS)
def test_generate_with_pruned_cache_equals_recompute(tiny, batch, method):
    """Cached greedy decoding equals re-running the whole prompt each step on the same visual tokens."""
    model, _ = tiny
    steps = 4
    with ProjectorInputs(model) as cap, apply_pruner(model, method, budget=BUDGET):
        gen = model.generate(**batch, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        tokens = cap.calls[-1].detach()
    cached = torch.stack(gen.logits, 1)  # [B, steps, V]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref = []
    with apply_pruner(model, "_test_fixed_tokens", budget=tokens.shape[1], tokens=tokens):
        for _ in range(steps):
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                               use_cache=False).logits[:, -1]
            ref.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert (cached - torch.stack(ref, 1)).abs().max() <= 1e-4


# ---- CLS requirement and parameters ---------------------------------------------------------------
def _info(**kw) -> ModelInfo:
    base = dict(family="llava", num_visual_tokens=576, grid_hw=(24, 24), has_cls=True, vision_num_layers=24,
                vision_feature_layer=22, vision_num_heads=16, llm_num_layers=32, llm_hidden_size=4096)
    base.update(kw)
    return ModelInfo(**base)


@pytest.mark.parametrize("method", METHODS)
def test_cls_requirement(method):
    pruner = get_pruner_class(method)(budget=64)
    if method in CLS_METHODS:
        with pytest.raises(ValueError, match=r"\[CLS\]"):
            pruner.attach(_info(has_cls=False))
    else:
        pruner.attach(_info(has_cls=False))  # works without CLS


@pytest.mark.parametrize(
    "method,params,words",
    [
        ("vtc_cls", {"ensemble": "mean"}, ["ensemble", "sum", "min", "max"]),
        ("vtc_cls", {"start_layer": 3}, ["start_layer", "0..2"]),
        ("vtc_cls", {"start_layer": -1}, ["start_layer", "0..2", "<= -2"]),
        ("visionzip", {"contextual_ratio": 1.5}, ["contextual_ratio", "[0, 1)"]),
        ("divprune", {"space": "pixels"}, ["space", "projected", "vision"]),
        ("recoverable", {"mode": "auto"}, ["mode", "fixed", "adaptive"]),
        ("recoverable", {"mode": "adaptive"}, ["adaptive", "budget=None"]),
        ("recoverable", {"recover_share": 0.6, "merge_share": 0.5}, ["recover_share + merge_share", "< 1"]),
        ("recoverable", {"attention": "multi"}, ["attention", "single_head", "head_mean"]),
        ("recoverable", {"text_tower": "/nonexistent"}, ["text_tower", "/nonexistent"]),
    ],
)
def test_bad_parameters_raise_clear_errors(tiny, batch, method, params, words):
    model, _ = tiny
    with pytest.raises(ValueError) as exc:
        h = apply_pruner(model, method, budget=8, **params)
        try:
            logits_of(model, batch)
        finally:
            h.remove()
    for w in words:
        assert w in str(exc.value)
    assert not model._forward_pre_hooks


# ---- definitions on hand-made inputs ----------------------------------------------------------------
def _fake_ctx(features=None, cls_rows=None, **kw) -> SimpleNamespace:
    calls: list[int] = []

    def cls_attention(layer):
        calls.append(layer)
        return cls_rows[layer]

    return SimpleNamespace(features=features, cls_attention=cls_attention, calls=calls, **kw)


def test_vtc_cls_sums_layers_from_start_layer():
    """Per-layer tops are 0, 2 and 5; only the sum over layers 20..22 makes {1, 4, 7} the top 3."""
    e = torch.eye(8)
    rows = {
        19: 10 * e[3][None],  # before start_layer: must not be read
        20: (e[1] + e[4] + 1.5 * e[0])[None],
        21: (e[4] + e[7] + 1.5 * e[2])[None],
        22: (e[7] + e[1] + 1.5 * e[5])[None],
    }
    p = get_pruner_class("vtc_cls")(budget=3, start_layer=20)
    p.attach(_info(num_visual_tokens=8, grid_hw=(2, 4)))
    assert p.vision_probe_layers() == [20, 21, 22]
    ctx = _fake_ctx(features=torch.zeros(1, 8, 4), cls_rows=rows)
    assert p.prune_pre_llm(ctx).keep.tolist() == [[1, 4, 7]]
    assert sorted(ctx.calls) == [20, 21, 22]
    default = get_pruner_class("vtc_cls")(budget=3)
    default.attach(_info())
    assert default.vision_probe_layers() == list(range(16, 23))  # authors' default 16..22 on CLIP-L
    for start, first in [(-8, 16), (-2, 22), (-24, 0)]:  # negative: from the end of the 24-layer ViT
        p = get_pruner_class("vtc_cls")(budget=3, start_layer=start)
        p.attach(_info())
        assert p.vision_probe_layers()[0] == first
    with pytest.raises(ValueError, match=r"start_layer=-30 .*-24 <= start_layer <= -2"):  # before layer 0
        get_pruner_class("vtc_cls")(budget=3, start_layer=-30).attach(_info())


def test_flowcut_schedule_24_layers_budget_64():
    """Pinned per-layer patch counts (entering layers 0..22) at a constant entropy ratio 0.5.

    By hand: after layer 1, rpl = 20: round(512 / sqrt(20) * 0.75) = 86 -> 490; after layer 3,
    rpl = 18: round(426 / sqrt(18) * 0.75) = 75 -> 415; after layer 21 (rpl 0) straight to 64.
    """
    counts = flowcut_schedule(576, 64, 22, 0.5)
    assert counts == [576, 576, 490, 490, 415, 415, 349, 349, 292, 292, 243, 243, 201, 201, 165, 165,
                      134, 134, 108, 108, 85, 85, 64]
    # Only every other layer prunes (rpl even), and uniform attention (ratio 1) waits until the end.
    assert flowcut_schedule(576, 64, 22, 1.0) == [576] * 22 + [64]
    assert all(flowcut_schedule(576, 64, 22, 0.0)[i] == flowcut_schedule(576, 64, 22, 0.0)[i + 1]
               for i in range(0, 22, 2))


def test_flowcut_model_follows_its_schedule(monkeypatch):
    """A 24-layer ViT with 24 x 24 patches (LLaVA-1.5's layout at tiny width), budget 64: the ViT
    token counts of each image are exactly the pure schedule driven by the entropies measured at its
    pruning layers (1, 3, ..., 21), ending at 64 + CLS for the feature layer 22."""
    import pruners.flowcut as fc

    model, processor = build_tiny_llava(seed=0, vision_layers=24, patch_size=2)
    inputs = processor(images=make_images(2), text=PROMPTS, return_tensors="pt", padding=True)
    seen: list[list[float]] = []
    real = fc.entropy_ratio

    def spy(relation, mask):
        out = real(relation, mask)
        seen.append(out.tolist())
        return out

    monkeypatch.setattr(fc, "entropy_ratio", spy)
    _, _, _, counts, _ = _pruned(model, inputs, "flowcut", budget=64)
    assert len(seen) == 11  # one entropy per pruning layer
    per = [c.vision[0] for c in counts]
    for b in range(2):
        expected = flowcut_schedule(576, 64, 22, lambda i, n, b=b: seen[(i - 1) // 2][b] if i % 2 else 1.0)
        assert per[b] == [1 + c for c in expected]
    assert per[0][-1] == 65 and per[0][2] < 577  # pruned early too, not only at the end


def test_flowcut_low_entropy_cuts_more():
    n = 576
    peaked = torch.full((1, n), 1e-4)
    peaked[0, :8] = 1.0
    uniform = torch.full((1, n), 1.0 / n)
    mask = torch.ones(1, n, dtype=torch.bool)
    r_peak, r_unif = entropy_ratio(peaked, mask).item(), entropy_ratio(uniform, mask).item()
    assert r_peak < 0.6 and abs(r_unif - 1.0) < 1e-5
    cut_peak, cut_unif = flowcut_cut(n, 64, 20, r_peak), flowcut_cut(n, 64, 20, r_unif)
    assert cut_peak > cut_unif
    assert cut_unif == 0
    assert flowcut_cut(n, 64, 19, r_peak) == 0  # odd rpl: no pruning at this layer
    assert flowcut_cut(n, 64, 0, r_unif) == n - 64


def test_flowcut_reports_vit_flops_reduction(tiny8):
    model, processor = tiny8
    inputs = processor(images=make_images(2), text=PROMPTS, return_tensors="pt", padding=True)
    _, _, _, counts, _ = _pruned(model, inputs, "flowcut", budget=4)
    vis = [max(n) for n in zip(*(c.vision[0] for c in counts))]  # the padded widths the batch computed
    assert len(vis) == 7 and vis[0] == 1 + N_VIS and vis[-1] == 1 + 4
    assert all(a >= b for a, b in zip(vis, vis[1:]))
    vcfg = model.config.vision_config
    full = vision_flops(vcfg, [1 + N_VIS] * 7)
    assert vision_flops(vcfg, vis) < full
    _, _, _, counts_vtc, _ = _pruned(model, inputs, "vtc_cls", budget=4)  # pre-LLM: the ViT runs in full
    assert all(vision_flops(vcfg, c.vision[0]) == full for c in counts_vtc)


def test_flowcut_overhead_is_small(tiny8):
    """The ViT's own q/k/v are captured during its forward: FlowCut's scoring (two attention rows and
    a value norm per layer) costs well under 2% of the (already pruned) ViT's FLOPs."""
    model, processor = tiny8
    inputs = processor(images=make_images(2), text=PROMPTS, return_tensors="pt", padding=True)
    with apply_pruner(model, "flowcut", budget=BUDGET) as h:
        h.count_overhead_flops = True
        logits_of(model, inputs)
        vit = 2 * vision_flops(model.config.vision_config, h.batch_counts.vision_width)  # batch of 2
        assert 0 < h.overhead_flops < 0.02 * vit


def test_vtc_cls_matches_eager_vit_attention(tiny, batch):
    """On the model: the kept set is the top-k of HF's own eager CLS attention row (head mean,
    patch columns) at the feature layer, the only summed layer of a 4-layer ViT."""
    model, _ = tiny
    with torch.no_grad():
        att = model.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions[2]  # [B, H, T, T]
    _, _, kept, _, _ = _pruned(model, batch, "vtc_cls", budget=7)
    for b in range(2):
        assert kept[b].tolist() == sorted(att[b, :, 0, 1:].mean(0).topk(7).indices.tolist())


def test_visionzip_split_and_contextual_mean():
    assert visionzip_split(64) == (54, 10)
    assert visionzip_split(128) == (108, 20)
    assert visionzip_split(192) == (162, 30)
    torch.manual_seed(0)
    feats = torch.randn(1, 8, 5)
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    keys = torch.stack([torch.tensor([0.0, 0.0, 1.0])] * 2 + [a, a + 0.1 * b, a, b, b + 0.1 * a, b])[None]
    dominant = torch.tensor([[0, 1]])
    merged, assign = contextual_tokens(feats, keys, dominant, 2)  # rest 2..7, step 3 -> targets 2 and 5
    assert assign.tolist() == [[-1, -1, 0, 0, 0, 1, 1, 1]]
    # the authors' contextual token: its target plus the mean of the tokens assigned to it
    assert torch.allclose(merged[0, 0], feats[0, 2] + feats[0, 3:5].mean(0), atol=1e-6)
    assert torch.allclose(merged[0, 1], feats[0, 5] + feats[0, 6:8].mean(0), atol=1e-6)
    keys2 = torch.stack([torch.tensor([0.0, 0.0, 1.0])] * 2 + [a, a, a, b, a, a])[None]  # target 5 gets none
    merged2, assign2 = contextual_tokens(feats, keys2, dominant, 2)
    assert assign2.tolist() == [[-1, -1, 0, 0, 0, 1, 0, 0]]
    assert torch.allclose(merged2[0, 1], feats[0, 5], atol=1e-6)  # a target with none stays itself


def test_divprune_greedy_maxmin_order():
    """Unit vectors at 0, 10, 20, 90, 180 degrees: the most isolated (180) first, then the farthest
    from it (0), then 90, then 20, then 10."""
    deg = torch.tensor([0.0, 10.0, 20.0, 90.0, 180.0]) * math.pi / 180
    pts = torch.stack([deg.cos(), deg.sin()], -1)[None]  # [1, 5, 2]
    assert maxmin_order(pts, 5).tolist() == [[4, 0, 3, 2, 1]]
    assert maxmin_order(pts * 7.0, 3).tolist() == [[4, 0, 3]]  # cosine: scale-free


def test_recoverable_recovers_text_relevant_low_attention_token():
    N = 12
    attn = torch.linspace(0.2, 0.1, N)[None].clone()  # decreasing: 0, 1, 2 lead
    attn[0, 9] = 0.001  # the lowest CLS attention of all
    tsim = torch.zeros(1, N)
    tsim[0, 9] = 0.9  # but the best match to the question
    keys = torch.randn(1, N, 4, generator=torch.Generator().manual_seed(0))
    sel = recoverable_select(attn, tsim, keys, (3, 1, 3))
    assert sel["keep"].tolist() == [[0, 1, 2]]
    assert sel["recover"].tolist() == [[9]]
    assert 9 not in recoverable_select(attn, tsim, keys, (4, 0, 3))["keep"].tolist()[0]
    # Merge: 2 centres = top attention among the rest (3, 4); extra token = attention-weighted mean
    # of all remaining non-centres.
    assert sel["centres"].tolist() == [[3, 4]]
    feats = torch.randn(1, N, 6, generator=torch.Generator().manual_seed(1))
    merged = merge_clusters(feats, attn, sel, with_extra=True)
    assert merged.shape == (1, 3, 6)
    rest = [i for i in range(N) if i not in (0, 1, 2, 9, 3, 4)]
    w = attn[0, rest]
    assert torch.allclose(merged[0, 2], (feats[0, rest] * w[:, None]).sum(0) / w.sum(), atol=1e-6)
    members0 = (sel["assign"][0] == 0).nonzero().flatten()
    w0 = attn[0, members0]
    assert 3 in members0.tolist()
    assert torch.allclose(merged[0, 0], (feats[0, members0] * w0[:, None]).sum(0) / w0.sum(), atol=1e-6)


def test_recoverable_split_and_outliers():
    assert fixed_split(64, 0.25, 0.125) == (40, 16, 8)
    assert sum(fixed_split(9, 0.25, 0.125)) == 9
    x = torch.full((1, 40), 1.0) + torch.linspace(0, 0.05, 40)[None]
    x[0, 7], x[0, 30] = 5.0, 6.0
    assert high_outliers(x, 1.5).nonzero()[:, 1].tolist() == [7, 30]
    assert question_first_line("what is the colour of the circle ? ASSISTANT:") == "what is the colour of the circle ?"


def _save_text_tower(folder, processor, vision_hidden: int) -> None:
    """A tiny CLIPTextModelWithProjection + tokenizer + visual projection, the embedded model's layout."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok = processor.tokenizer
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=32, projection_dim=16,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    CLIPTextModelWithProjection(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    save_file({"weight": torch.randn(16, vision_hidden)}, str(folder / "visual_projection.safetensors"))


def test_recoverable_text_tower_and_fallback(tiny, batch, tmp_path):
    model, processor = tiny
    folder = tmp_path / "text_tower"
    _save_text_tower(folder, processor, model.config.vision_config.hidden_size)
    *_, info = _pruned(model, batch, "recoverable")
    assert info["text_similarity"] == "llm_embeddings"
    # Explicit folder, question text available: the CLIP text tower is used, batch-invariantly.
    with apply_pruner(model, "recoverable", budget=BUDGET, text_tower=str(folder), tokenizer=processor.tokenizer) as h:
        both = logits_of(model, batch)[:, -1]
        assert h.info["text_similarity"] == "clip_text_tower"
        kept_both = [k.clone() for k in h.kept_indices]
        for i in range(2):
            one = logits_of(model, single(processor, i))[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept_both[i])
    # Auto-detected from the model folder's text_tower/ ...
    old = model.name_or_path
    model.name_or_path = str(tmp_path)  # what from_pretrained(folder) sets
    try:
        with apply_pruner(model, "recoverable", budget=BUDGET, tokenizer=processor.tokenizer) as h:
            logits_of(model, batch)
            assert h.info["text_similarity"] == "clip_text_tower"
        # ... but without the question text (no tokenizer) it falls back and says why.
        with apply_pruner(model, "recoverable", budget=BUDGET) as h:
            logits_of(model, batch)
            assert h.info["text_similarity"] == "llm_embeddings"
            assert "tokenizer" in h.info["text_similarity_note"]
    finally:
        model.name_or_path = old


def test_recoverable_adaptive_mode(tiny, batch):
    model, processor = tiny
    with apply_pruner(model, "recoverable", budget=None, mode="adaptive") as h:
        out = logits_of(model, batch)
        counts = h.info["adaptive_counts"]
        n = h.token_counts[0].llm_visual[0]
    assert len(counts) == 2 and all(len(c) == 3 for c in counts)
    assert n < N_VIS and n == sum(h.info["recoverable_split"])
    assert out.shape[1] == batch["input_ids"].shape[1] - (N_VIS - n)


def test_pooling_grid_is_at_most_budget():
    assert pooled_grid((24, 24), 64) == (8, 8)
    assert pooled_grid((24, 24), 128) == (11, 11)
    assert pooled_grid((24, 24), 576) == (24, 24)
    h, w = pooled_grid((24, 24), 192)
    assert h * w <= 192 and h * w >= 180


# ---- the embedded default model's layout ---------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_like(tmp_path_factory):
    """The embedded model as ``benchmarks.embedded.model.export`` writes it (the shipped weights when
    present, else a freshly initialised one): LLaVA folder + ``text_tower/`` with the visual projection."""
    from benchmarks.embedded import model as M

    if (M.ASSET_DIR / "config.json").is_file():
        folder = M.ASSET_DIR
    else:
        llava, _ = M.build_llava(seed=0)
        folder = tmp_path_factory.mktemp("embedded")
        g = torch.Generator().manual_seed(0)
        M.export(llava, M.build_text_tower(seed=0), torch.randn(128, 128, generator=g), folder, dtype=torch.float32)
    model, processor, meta = M.load(folder)
    texts = [meta["prompt_template"].format(question=q) for q in ("what colour is the circle ?", "how many ?")]
    imgs = make_images(2, size=M.IMAGE_SIZE)
    return model, processor, processor(images=imgs, text=texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("method", METHODS)
def test_embedded_layout_batch_of_two(embedded_like, method):
    """Every method runs through apply_pruner on the embedded model's layout with batch size 2 and
    gives the images' single-image results; recoverable finds the shipped CLIP text tower."""
    model, processor, inputs = embedded_like
    budget = 36
    with apply_pruner(model, method, budget=budget, tokenizer=processor.tokenizer) as h:
        both = logits_of(model, inputs)[:, -1]
        assert all(c.llm_visual[0] == budget for c in h.token_counts)
        if method == "recoverable":
            assert h.info["text_similarity"] == "clip_text_tower"
        if method == "flowcut":
            assert all(c.vision[0][-1] == 1 + budget for c in h.token_counts)
        kept = [k.clone() for k in h.kept_indices]
        for i in range(2):
            one_inputs = {k: v[i : i + 1] for k, v in inputs.items()}
            pad = int((one_inputs["attention_mask"][0] == 0).sum())  # drop this row's left padding
            one_inputs = {k: (v[:, pad:] if k in ("input_ids", "attention_mask") else v) for k, v in one_inputs.items()}
            one = logits_of(model, one_inputs)[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept[i])
