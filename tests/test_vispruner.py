"""`vispruner` (pruners/vispruner.py): the budget split and the diverse-token procedure on hand-made
tensors against an independent, list-based re-derivation of the authors' ``encode_images``
(Theia-4869/VisPruner, llava/model/llava_arch.py); the method on the tiny LLaVA against HF's own
attentions and hidden states (``attentions[-2]`` / ``hidden_states[-2]``, as the authors' CLIP tower
reads them), on the tiny Qwen2-VL / Qwen2.5-VL with ``importance="received"``, and the refusal of the
default ``importance="cls"`` on an encoder without [CLS].
"""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mllm_adapters import apply_pruner
from mllm_adapters.tiny import TINY_QWEN_IMAGE
from pruners import get_pruner_class
from pruners.base import ModelInfo
from pruners.vispruner import VisPruner, remove_duplicates, vispruner_select, vispruner_split
from tests._adapter_helpers import ProjectorInputs
from tests.conftest import PROMPTS, single

N_VIS = 36  # tiny LLaVA: 6 x 6 patches


# ---- an independent re-derivation of the authors' procedure (plain Python lists, fp64) --------------
def reference_vispruner(scores: list[float], feats: torch.Tensor, budget: int, ratio: float) -> list[int]:
    """One sample: the authors' ``encode_images`` step by step on lists.

    T_imp = int(T * r); tokens ranked by descending score (ties: lower index); the first T_imp are
    important; the rest, in that ranking, are thinned: while len > T_div, r' = min(8, len - T_div),
    evens = list[0::2], odds = list[1::2], each even token scored by its best cosine match among the
    odds, the r' best-matched evens dropped, list = remaining evens (best-matched first) + odds.
    """
    n = len(scores)
    if budget >= n:
        return list(range(n))
    n_imp = int(budget * ratio)
    n_div = budget - n_imp
    ranked = sorted(range(n), key=lambda i: (-scores[i], i))
    important, rest = ranked[:n_imp], ranked[n_imp:]
    if n_div <= 0:
        return important
    f = feats.double()
    f = f / f.norm(dim=-1, keepdim=True)

    def cos(i: int, j: int) -> float:
        return float(f[i] @ f[j])

    while True:
        r = min(8, len(rest) - n_div)
        if r <= 0:
            break
        evens, odds = rest[0::2], rest[1::2]
        best = [max(cos(e, o) for o in odds) for e in evens]
        by_match = sorted(range(len(evens)), key=lambda i: (-best[i], i))
        rest = [evens[i] for i in by_match[r:]] + odds
    return important + rest


def _select(scores: torch.Tensor, feats: torch.Tensor, budget: int, ratio: float) -> list[list[int]]:
    keep, _, _ = vispruner_select(scores, feats, budget, ratio)
    return keep.tolist()


# ---- the split -------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget,ratio,want", [
    (64, 0.5, (32, 32)), (64, 0.75, (48, 16)), (128, 0.5, (64, 64)), (192, 0.5, (96, 96)),
    (9, 0.5, (4, 5)),  # floor: the authors' int(T * r)
    (10, 0.29, (2, 8)), (100, 0.29, (28, 72)),  # int(28.999999999999996) = 28, as int(T * r) gives
    (32, 1.0, (32, 0)), (32, 0.0, (0, 32)), (1, 0.5, (0, 1)),
])
def test_split(budget, ratio, want):
    assert vispruner_split(budget, ratio) == want
    assert want[0] == int(budget * ratio)


def test_default_ratio_is_the_authors_half():
    assert VisPruner.defaults == {"important_ratio": 0.5, "importance": "cls"}


# ---- the diverse-token procedure on hand-made tensors -----------------------------------------------
def test_removal_larger_than_the_even_half_drops_all_evens():
    """10 tokens ranked 0..9, T = 4 at 0.5: important [0, 1]; rest [2..9], r = 6 > 4 evens: all of
    [2, 4, 6, 8] go, then [3, 5, 7, 9] with r = 2 loses [3, 7]: whatever the features."""
    scores = torch.arange(10, 0, -1, dtype=torch.float32)[None]  # descending = index order
    for seed in range(3):
        feats = torch.randn(1, 10, 5, generator=torch.Generator().manual_seed(seed))
        assert _select(scores, feats, 4, 0.5) == [[0, 1, 5, 9]]


def test_the_least_duplicated_even_token_survives():
    """12 tokens ranked 0..11, T = 8 at 0.25: important [0, 1]; rest [2..11], r = 4 of 5 evens go. The
    evens 2, 4, 8, 10 copy an odd token, 6 is orthogonal to every odd one: 6 survives, first."""
    scores = torch.arange(12, 0, -1, dtype=torch.float32)[None]
    eye = torch.eye(12)
    feats = eye.clone()
    for even, odd in ((2, 3), (4, 5), (8, 9), (10, 11)):
        feats[even] = eye[odd] + 0.01 * eye[even]
    keep = _select(scores, feats[None], 8, 0.25)
    assert keep == [[0, 1, 6, 3, 5, 7, 9, 11]]
    assert keep == [reference_vispruner(scores[0].tolist(), feats, 8, 0.25)]


def test_survivors_are_ordered_by_match_and_that_order_matters():
    """Round 2 splits the list left by round 1 (surviving evens best-matched first, then the odds):
    with 20 candidates and 8 kept, keeping the survivors in their old order instead would change the
    result for some inputs, and the implementation follows the authors' order on all of them."""
    def variant(feats, cands, n_keep):  # survivors kept in list order: NOT the authors' procedure
        f = torch.nn.functional.normalize(feats.double(), dim=-1)
        rest = list(cands)
        while (r := min(8, len(rest) - n_keep)) > 0:
            ev, od = rest[0::2], rest[1::2]
            best = [max(float(f[e] @ f[o]) for o in od) for e in ev]
            drop = set(sorted(range(len(ev)), key=lambda i: (-best[i], i))[:r])
            rest = [e for i, e in enumerate(ev) if i not in drop] + od
        return rest

    differs = 0
    for seed in range(20):
        feats = torch.randn(20, 6, generator=torch.Generator().manual_seed(seed))
        cands = torch.randperm(20, generator=torch.Generator().manual_seed(100 + seed))
        got = remove_duplicates(feats[None], cands[None], 8)[0].tolist()
        scores = torch.empty(20)
        scores[cands] = torch.arange(20, 0, -1, dtype=torch.float32)  # ranking = cands
        assert got == reference_vispruner(scores.tolist(), feats, 8, 0.0)
        differs += set(got) != set(variant(feats, cands.tolist(), 8))
    assert differs, "no input told the survivor order apart: the test would not catch a wrong order"


@pytest.mark.parametrize("n,budget,ratio", [
    (36, 12, 0.5), (36, 7, 0.5),  # R = 30 (even), R = 33 (odd: the authors' indexing needs R even)
    (36, 9, 0.75), (36, 20, 0.25), (36, 35, 0.5), (36, 2, 0.5), (36, 1, 0.5),
    (49, 16, 0.5), (50, 3, 0.0), (64, 16, 1.0), (100, 33, 0.6),
])
def test_batch_matches_the_reference(n, budget, ratio):
    g = torch.Generator().manual_seed(n * 1000 + budget)
    scores = torch.rand(3, n, generator=g)
    feats = torch.randn(3, n, 8, generator=g)
    feats[:, n // 2 :] = feats[:, : n - n // 2] + 0.05 * torch.randn(3, n - n // 2, 8, generator=g)  # near-copies
    keep = _select(scores, feats, budget, ratio)
    for b in range(3):
        want = reference_vispruner(scores[b].tolist(), feats[b], budget, ratio)
        assert keep[b] == want
        assert len(set(want)) == len(want) == min(budget, n)


def test_ties_go_to_the_lower_index():
    scores = torch.zeros(1, 10)  # every score tied: the ranking is the index order
    feats = torch.randn(1, 10, 4, generator=torch.Generator().manual_seed(0))
    keep = _select(scores, feats, 4, 1.0)
    assert keep == [[0, 1, 2, 3]]


def test_budget_covering_every_token_keeps_them_all():
    keep, n_imp, n_div = vispruner_select(torch.rand(2, 6), torch.randn(2, 6, 3), 6)
    assert keep.tolist() == [list(range(6))] * 2 and (n_imp, n_div) == (6, 0)


# ---- parameters and the refusal ----------------------------------------------------------------------
def _info(**kw) -> ModelInfo:
    base = dict(family="llava", num_visual_tokens=576, grid_hw=(24, 24), has_cls=True, vision_num_layers=24,
                vision_feature_layer=22, vision_num_heads=16, llm_num_layers=32, llm_hidden_size=4096)
    base.update(kw)
    return ModelInfo(**base)


def test_reads_the_feature_layer_only():
    p = VisPruner(budget=64)
    p.attach(_info())
    assert p.vision_probe_layers() == [22]


@pytest.mark.parametrize("params,word", [
    ({"important_ratio": 1.5}, "important_ratio"), ({"important_ratio": -0.1}, "important_ratio"),
    ({"importance": "mean"}, "importance"),
])
def test_bad_parameters(params, word):
    with pytest.raises(ValueError, match=word):
        VisPruner(budget=8, **params)


def test_cls_refused_without_cls_received_accepted():
    assert VisPruner.requires_cls is False  # the received variant runs on every family
    with pytest.raises(ValueError) as e:
        VisPruner(budget=64).attach(_info(family="qwen2_vl", has_cls=False))
    msg = str(e.value)
    assert "'vispruner'" in msg and "qwen2_vl" in msg and "importance='received'" in msg
    VisPruner(budget=64, importance="received").attach(_info(family="qwen2_vl", has_cls=False))


def test_default_is_refused_exactly_on_the_families_without_cls():
    """The default (importance="cls") attaches on every family whose tiny model's vision encoder has a [CLS]
    token and is refused, naming importance='received', on every other; the conformance suite derives the
    same refusal from ``cls_param`` (no family list to keep)."""
    import mllm_adapters
    from mllm_adapters.registry import get_family

    assert VisPruner.cls_param[0] == "importance" and VisPruner.parameters["importance"].default == "cls"
    assert not any(key.startswith("*") for key in VisPruner.conformance_opt_outs)
    seen = set()
    for name in mllm_adapters.available_families():
        spec = get_family(name)
        model, _ = spec.build_tiny()
        info = spec(model).model_info()
        seen.add(info.has_cls)
        if info.has_cls:
            VisPruner(budget=4).attach(info)
        else:
            with pytest.raises(ValueError, match="importance='received'"):
                VisPruner(budget=4).attach(info)
    assert seen == {True, False}


def test_default_refused_on_qwen_naming_method_family_and_alternative(qwen):
    model = qwen[0]
    family = "qwen2_5_vl" if "2_5" in type(model).__name__.lower() else "qwen2_vl"
    with pytest.raises(ValueError) as e:
        apply_pruner(model, "vispruner", budget=4)
    msg = str(e.value)
    assert "vispruner" in msg and family in msg and "importance='received'" in msg
    assert not model._forward_pre_hooks
    h = getattr(model, "_prunebench_handle", None)
    assert h is None or h.removed


# ---- tiny LLaVA: the kept set from HF's own signals ----------------------------------------------------
def _hf_signals(model, pixel_values, importance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [B, N], features [B, N, Dv]) as the authors' CLIPVisionTower.feature_select reads them:
    ``attentions[select_layer]`` and ``hidden_states[select_layer]`` (select_layer = -2), CLS dropped."""
    layer = model.config.vision_feature_layer  # -2
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
    attn = out.attentions[layer]  # [B, H, 1+N, 1+N]
    feats = out.hidden_states[layer][:, 1:]
    if importance == "cls":
        return attn[:, :, 0, 1:].mean(1), feats  # the authors' head mean of the CLS row
    return attn.mean(1).mean(1)[:, 1:], feats  # mean attention each patch receives from every token


@pytest.mark.parametrize("importance", ["cls", "received"])
@pytest.mark.parametrize("budget,ratio", [(12, 0.5), (7, 0.5), (9, 0.75)])
def test_tiny_llava_kept_set_and_llm_input(tiny, batch, importance, budget, ratio):
    model, processor = tiny
    scores, feats = _hf_signals(model, batch["pixel_values"], importance)
    with ProjectorInputs(model) as cap, apply_pruner(model, "vispruner", budget=budget, important_ratio=ratio,
                                                     importance=importance) as h:
        with torch.no_grad():
            out = model(**batch).logits
        kept = [k.tolist() for k in h.kept_indices]
        tokens = cap.calls[-1].detach()
        assert h.info["vispruner_split"] == list(vispruner_split(budget, ratio))
    for b in range(2):
        want = reference_vispruner(scores[b].tolist(), feats[b], budget, ratio)
        assert kept[b] == sorted(want)  # the LLM sees them in raster order (the authors' index mask)
        assert torch.allclose(tokens[b], feats[b, kept[b]], atol=1e-6)
    n = tokens.shape[1]
    tok = processor.tokenizer([p.replace("<image>", "<image>" * n) for p in PROMPTS], return_tensors="pt",
                              padding=True)
    proj = [model.model.multi_modal_projector(t[None])[0] for t in tokens]
    with torch.no_grad():
        ref = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                    mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=proj)}).logits
    assert (out - ref).abs().max() <= 1e-5


def test_tiny_llava_all_important_is_top_cls(tiny, batch):
    """important_ratio = 1: the top-``budget`` CLS attention of the feature layer, as vtc_cls from it."""
    model, _ = tiny
    with apply_pruner(model, "vispruner", budget=10, important_ratio=1.0) as h:
        with torch.no_grad():
            model(**batch)
        a = [k.tolist() for k in h.kept_indices]
    with apply_pruner(model, "vtc_cls", budget=10, start_layer=-2) as h:
        with torch.no_grad():
            model(**batch)
        b = [k.tolist() for k in h.kept_indices]
    assert a == b


@pytest.mark.parametrize("importance", ["cls", "received"])
def test_tiny_llava_batch_equals_singles(tiny, batch, importance):
    model, processor = tiny
    with apply_pruner(model, "vispruner", budget=12, importance=importance) as h:
        with torch.no_grad():
            both = model(**batch).logits[:, -1]
        kept = [k.clone() for k in h.kept_indices]
        for i in range(2):
            with torch.no_grad():
                one = model(**single(processor, i)).logits[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept[i])


# ---- tiny Qwen2-VL / Qwen2.5-VL with importance="received" --------------------------------------------
QWEN_PROMPTS = [f"USER: {TINY_QWEN_IMAGE} what is the colour of the circle ? ASSISTANT:",
                f"USER: {TINY_QWEN_IMAGE} how many ? ASSISTANT:"]


def _enc(qwen, idx):
    _, processor, images = qwen
    return processor(images=[images[i] for i in idx], text=[QWEN_PROMPTS[i] for i in idx], return_tensors="pt",
                     padding=True)


def test_qwen_received_follows_the_procedure_on_the_engine_signals(qwen, monkeypatch):
    """Each image's kept units = the reference procedure on the context's features (the merger's input)
    and received attention (column means of the block's attention pooled to merged units)."""
    model = qwen[0]
    x = _enc(qwen, [0, 1])
    seen = []
    orig = VisPruner.prune_pre_llm

    def spy(self, ctx):
        layer = self.info.vision_feature_layer
        a = ctx.vision_attention(layer)  # [1, N, N] on merged units
        seen.append((a.mean(1)[0].tolist(), ctx.features[0].detach().clone(), self.budget))
        assert torch.allclose(ctx.received_attention(layer), a.mean(1))
        return orig(self, ctx)

    monkeypatch.setattr(VisPruner, "prune_pre_llm", spy)
    with apply_pruner(model, "vispruner", budget=5, importance="received") as h:
        with torch.no_grad():
            model(**x)
        kept = [k.tolist() for k in h.kept_indices]
        assert h.info["vispruner_importance"] == "received"
    assert len(seen) == 2 and [len(k) for k in kept] == [5, 5]
    for (scores, feats, budget), k in zip(seen, kept):
        assert k == sorted(reference_vispruner(scores, feats, budget, 0.5))


def test_qwen_received_batch_equals_singles(qwen):
    model = qwen[0]
    x = _enc(qwen, [0, 1])
    with apply_pruner(model, "vispruner", budget=5, importance="received") as h:
        with torch.no_grad():
            both = model(**x).logits[:, -1]
        kept = [k.clone() for k in h.kept_indices]
        gen = model.generate(**x, max_new_tokens=3, do_sample=False)[:, -3:]
        for i in range(2):
            one = _enc(qwen, [i])
            with torch.no_grad():
                assert (model(**one).logits[0, -1] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept[i])
            assert torch.equal(model.generate(**one, max_new_tokens=3, do_sample=False)[0, -3:], gen[i])


def test_qwen_received_equals_model_on_kept_units(qwen):
    """The pruned run equals the unpruned model given only the kept units at their original M-RoPE
    positions."""
    model = qwen[0]
    x = _enc(qwen, [1])
    with apply_pruner(model, "vispruner", budget=4, importance="received") as h:
        with torch.no_grad():
            out = model(**x).logits[0, -1]
        (kept,) = h.kept_indices
    with torch.no_grad():
        feats = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"]).pooler_output[0]
        pos, _ = model.model.get_rope_index(x["input_ids"], x["mm_token_type_ids"],
                                            image_grid_thw=x["image_grid_thw"], attention_mask=x["attention_mask"])
    ids = x["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero()[:, 0]
    cols = torch.cat([(ids != model.config.image_token_id).nonzero()[:, 0], img[kept]]).sort().values
    with torch.no_grad():
        ref = model(input_ids=ids[cols][None], attention_mask=torch.ones(1, len(cols), dtype=torch.long),
                    position_ids=pos[:, :, cols],
                    mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(feats[kept],))}
                    ).logits[0, -1]
    assert (out - ref).abs().max() <= 1e-4


def test_qwen_received_keep_all_is_unpruned(qwen):
    model = qwen[0]
    x = _enc(qwen, [0, 1])
    with torch.no_grad():
        ref = model(**x).logits
    with apply_pruner(model, "vispruner", budget=None, importance="received"):
        with torch.no_grad():
            assert torch.equal(model(**x).logits, ref)


def test_registered():
    assert get_pruner_class("vispruner") is VisPruner
