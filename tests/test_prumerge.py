"""PruMerge / PruMerge+ (`pruners/prumerge.py`): the selection and merge math on hand-made tensors,
each checked against an independent re-derivation, and both methods on the tiny LLaVA model, where
the tokens the LLM receives are compared with a loop-by-loop re-derivation of the authors'
``token_prune_merge_advanced(_plus)`` (42Shawn/LLaVA-PruMerge, clip_encoder.py) run on HF's own
vision tower (hooks on ``q_proj`` / ``k_proj``, as the authors take them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mllm_adapters import apply_pruner
from mllm_adapters.tiny import build_tiny_llava, build_tiny_qwen2_vl
from pruners import get_pruner_class
from pruners.prumerge import (
    adaptive_counts,
    adaptive_uniform_positions,
    concat_head_keys,
    fixed_split,
    iqr_outlier_count,
    prumerge_merge,
    single_head_cls_attention,
    spread_samples,
    uniform_grid,
)
from tests._adapter_helpers import ProjectorInputs
from tests.conftest import PROMPTS, make_images

N_VIS = 36  # tiny LLaVA: 6 x 6 patches


# ---- independent re-derivations (the authors' algorithm, written loop by loop) ------------------------
def numpy_outlier_count(row: torch.Tensor) -> int:
    """The authors' ``outlier_dectection`` (one image): numpy percentiles, strict upper fence."""
    a = row.to(torch.float32).numpy().flatten()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    return int((a > q3 + 1.5 * (q3 - q1)).sum())


def authors_reference(feats, q, k, plus: bool, ratio: float | None = None, neighbours: int = 32):
    """One image, as ``token_prune_merge_advanced(_plus)`` computes it.

    feats [N, C] features; q, k [1 + N, D] whole-width q_proj / k_proj outputs (CLS first). ``ratio``
    None: adaptive (``if_adaptive=True``: PruMerge+ adds ``arange(0, N - 1, int(int(1/r)/3))`` minus the
    top tokens); else the fixed ``reduction_ratio`` (their training path: PruMerge+ adds
    ``arange(int(s/2), N - 1, s)``, s = int(1/r), unfiltered; the tests use it where nothing collides).
    Returns (tokens [n, C] in their order, centre indices in their order).
    """
    N = feats.shape[0]
    D = k.shape[-1]
    attn = torch.softmax((q @ k.T) * D ** -0.5, dim=-1)[0, 1:]  # [N]
    adaptive = ratio is None
    if adaptive:
        ratio = numpy_outlier_count(attn) / N
    idx = torch.topk(attn, int(N * ratio)).indices.tolist()  # sorted=True: descending attention
    if plus:
        step = int(1 / ratio)
        if adaptive:
            idx = idx + [x for x in range(0, N - 1, int(step / 3)) if x not in idx]
        else:
            idx = idx + list(range(int(step / 2), N - 1, step))
    return authors_merge(feats, attn, k[1:], idx, neighbours), idx


def authors_merge(feats, attn, keys, idx: list[int], neighbours: int = 32) -> torch.Tensor:
    """Their merge loop for centres ``idx`` (their order): [len(idx) + 1, C]."""
    compl = [j for j in range(feats.shape[0]) if j not in idx]
    keys = F.normalize(keys, dim=-1)
    out = []
    for i, c in enumerate(idx):
        rest = idx[:i] + idx[i + 1:] + compl
        cos = keys[c] @ keys[rest].T
        top = torch.topk(cos, min(neighbours, len(rest))).indices.tolist()
        out.append(feats[c] + sum(attn[rest[t]] * feats[rest[t]] for t in top))
    extra = sum((attn[j] * feats[j] for j in compl), torch.zeros_like(feats[0]))
    return torch.stack(out + [extra])


# ---- 1. selection math on hand-made tensors -------------------------------------------------------------
def test_iqr_outlier_count_equals_numpy_percentiles():
    g = torch.Generator().manual_seed(0)
    rows = torch.rand(5, 40, generator=g) ** 4  # skewed: a few large values
    rows[1, :3] = torch.tensor([5.0, 4.0, 3.0])  # three clear outliers
    rows[2] = 1.0  # constant row: IQR 0, nothing strictly above
    got = iqr_outlier_count(rows).tolist()
    assert got == [numpy_outlier_count(r) for r in rows]
    assert got[1] >= 3 and got[2] == 0
    # hand case: 1..8 and 100 -> Q1 = 3, Q3 = 7 (linear), fence 7 + 6 = 13: only 100
    assert iqr_outlier_count(torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8, 100]])).tolist() == [1]


def test_adaptive_counts_use_the_authors_float_arithmetic():
    for c in range(1, 577):
        assert adaptive_counts(c, 576) == (c, c / 576)  # int(576 * (c / 576)) == c for every c
    assert adaptive_counts(15, 22)[0] == int(22 * (15 / 22)) == 14  # the float quirk, kept
    assert adaptive_counts(0, 576) == (1, 1 / 576)  # 0 outliers -> 1 (the authors divide by zero)


def test_adaptive_uniform_positions_are_the_authors_arange():
    # 32 outliers of 576: step_length = int(1 / (32/576)) = 18, sampling step int(18 / 3) = 6
    assert adaptive_uniform_positions(32 / 576, 576).tolist() == list(range(0, 575, 6))
    assert adaptive_uniform_positions(5 / 576, 576).tolist() == list(range(0, 575, int(int(576 / 5) / 3)))
    assert adaptive_uniform_positions(300 / 576, 576).tolist() == list(range(575))  # step 0 -> 1


def test_fixed_split_maps_budget_to_the_authors_halves():
    assert fixed_split(145, uniform=True) == (72, 72)  # reduction_ratio 1/8: 72 top + 72 uniform + 1 extra
    assert fixed_split(64, uniform=True) == (32, 31)
    assert fixed_split(12, uniform=True) == (6, 5)
    assert fixed_split(2, uniform=True) == (1, 0)
    assert fixed_split(1, uniform=True) == (0, 0)  # only the extra token
    assert fixed_split(64, uniform=False) == (63, 0)


@pytest.mark.parametrize("count", [72, 144, 36, 18])
def test_uniform_grid_equals_the_authors_training_arange(count):
    s = 576 // count  # their int(1 / reduction_ratio)
    assert uniform_grid(576, count).tolist() == list(range(s // 2, 575, s))


def test_uniform_grid_is_spread_and_distinct():
    for n in (16, 36, 100, 576):
        for count in range(1, n + 1):
            g = uniform_grid(n, count)
            assert g.numel() == count and bool((g[1:] > g[:-1]).all()) and 0 <= int(g[0]) and int(g[-1]) < n


def test_spread_samples_moves_a_collision_to_the_nearest_free_position():
    taken = torch.zeros(16, dtype=torch.bool)
    assert spread_samples(taken, 4).tolist() == [2, 6, 10, 14]  # floor((i + 1/2) * 16 / 4)
    taken[[6, 7]] = True
    assert spread_samples(taken, 4).tolist() == [2, 5, 10, 14]  # 6 taken: 5 is free, 7 is not
    taken[5] = True
    assert spread_samples(taken, 4).tolist() == [2, 4, 10, 14]  # 4 and 8 tie: the lower
    taken = torch.zeros(8, dtype=torch.bool)
    taken[[0, 2, 4, 6]] = True
    got = spread_samples(taken, 4)  # grid 1, 3, 5, 7 all free
    assert got.tolist() == [1, 3, 5, 7]
    taken = torch.zeros(8, dtype=torch.bool)
    taken[[1, 3, 5]] = True  # grid 1, 3, 5 collide; free non-grid: 0, 2, 4, 6
    got = spread_samples(taken, 4).tolist()
    assert got == sorted(set(got)) and len(got) == 4 and not set(got) & {1, 3, 5}
    assert got == [0, 2, 4, 7]  # 1 -> 0 (tie 0/2: lower), 3 -> 2 (tie 2/4), 5 -> 4 (tie 4/6), 7 stays
    with pytest.raises(ValueError, match="free"):
        spread_samples(torch.ones(4, dtype=torch.bool), 1)


# ---- 2. attention and merge math ---------------------------------------------------------------------------
def test_single_head_cls_attention_concatenates_heads():
    g = torch.Generator().manual_seed(1)
    B, H, T, Dh = 2, 3, 7, 4
    q, k = torch.randn(B, H, T, Dh, generator=g), torch.randn(B, H, T, Dh, generator=g)
    qw, kw = q.transpose(1, 2).reshape(B, T, H * Dh), k.transpose(1, 2).reshape(B, T, H * Dh)
    ref = torch.softmax(qw[:, :1] @ kw.transpose(1, 2) / (H * Dh) ** 0.5, dim=-1)[:, 0, 1:]  # [B, T - 1]
    assert torch.allclose(single_head_cls_attention(q, k, T - 1), ref, atol=1e-6)
    assert torch.equal(concat_head_keys(k, T - 1), kw[:, 1:])
    head_mean = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) / Dh ** 0.5, dim=-1).mean(1)[:, 0, 1:]
    assert not torch.allclose(single_head_cls_attention(q, k, T - 1), head_mean, atol=1e-3)  # not the head mean


def test_merge_hand_case():
    """4 tokens, 1 neighbour: keys make token 0's nearest other token 2, token 3's nearest 1."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, -1.0]]])  # [1, 4, 2]
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]]])
    attn = torch.tensor([[0.4, 0.1, 0.2, 0.3]])
    out = prumerge_merge(x, keys, attn, torch.tensor([[0, 3]]), neighbours=1)  # [1, 3, 2]
    assert torch.allclose(out[0, 0], x[0, 0] + 0.2 * x[0, 2])  # centre 0 + a_2 x_2
    assert torch.allclose(out[0, 1], x[0, 3] + 0.1 * x[0, 1])  # centre 3 + a_1 x_1
    assert torch.allclose(out[0, 2], 0.1 * x[0, 1] + 0.2 * x[0, 2])  # extra: non-centres, unnormalised
    # a centre can be another centre's neighbour: with 2 neighbours, 0's are 2 and then 3 (cos .1 vs 0)
    out2 = prumerge_merge(x, keys, attn, torch.tensor([[0, 3]]), neighbours=2)
    assert torch.allclose(out2[0, 0], x[0, 0] + 0.2 * x[0, 2] + 0.3 * x[0, 3])


def test_merge_equals_the_authors_loop_on_random_tensors():
    g = torch.Generator().manual_seed(2)
    B, N, C, D = 2, 12, 5, 6
    x, keys = torch.randn(B, N, C, generator=g), torch.randn(B, N, D, generator=g)
    attn = torch.softmax(torch.randn(B, N, generator=g), dim=-1)
    centres = torch.stack([torch.randperm(N, generator=g)[:4] for _ in range(B)])  # [B, 4], any order
    out = prumerge_merge(x, keys, attn, centres, neighbours=3)
    kn = F.normalize(keys, dim=-1)
    for b in range(B):
        idx = centres[b].tolist()
        compl = [j for j in range(N) if j not in idx]
        for i, c in enumerate(idx):
            rest = idx[:i] + idx[i + 1:] + compl
            top = torch.topk(kn[b, c] @ kn[b, rest].T, 3).indices.tolist()
            ref = x[b, c] + sum(attn[b, rest[t]] * x[b, rest[t]] for t in top)
            assert torch.allclose(out[b, i], ref, atol=1e-6)
        assert torch.allclose(out[b, -1], sum(attn[b, j] * x[b, j] for j in compl), atol=1e-6)
    # every token a centre: the extra token is 0; no centre: only the extra token, the weighted sum of all
    full = prumerge_merge(x, keys, attn, torch.arange(N).expand(B, -1), neighbours=3)
    assert torch.equal(full[:, -1], torch.zeros(B, C))
    none = prumerge_merge(x, keys, attn, torch.empty(B, 0, dtype=torch.long))
    assert none.shape == (B, 1, C) and torch.allclose(none[:, 0], (attn[..., None] * x).sum(1), atol=1e-6)


# ---- 3. parameters and budget modes --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
def test_budget_modes(name):
    cls = get_pruner_class(name)
    assert cls.requires_cls and cls.stages == ("pre_llm",)
    assert cls(budget=None).chooses_budget and not cls(budget=12).chooses_budget  # auto
    assert cls(budget=None, mode="adaptive").chooses_budget
    assert not cls(budget=None, mode="fixed").chooses_budget and cls(budget=None, mode="fixed").keeps_all
    assert not cls(budget=0.25).chooses_budget
    with pytest.raises(ValueError, match="budget=12"):
        cls(budget=12, mode="adaptive")
    with pytest.raises(ValueError, match="order"):
        cls(budget=12, order="sideways")
    assert cls.uniform is (name == "prumerge_plus") and issubclass(get_pruner_class("prumerge_plus"),
                                                                   get_pruner_class("prumerge"))


# ---- 4. the tiny LLaVA model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return build_tiny_llava(seed=0, attn_implementation="eager")


def hf_signals(model, pixel_values, layer: int):
    """HF's own features [B, N, C] (LLaVA's layer) and whole-width q/k [B, 1 + N, D] of ViT ``layer``."""
    out = {}
    attn = model.model.vision_tower.encoder.layers[layer].self_attn
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, o: out.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, a, o: out.__setitem__("k", o))]
    try:
        with torch.no_grad():
            hs = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    finally:
        for h in hooks:
            h.remove()
    return hs[model.config.vision_feature_layer][:, 1:], out["q"], out["k"]


def pruned_tokens(model, inputs, name, budget, **params):
    """(tokens the projector got [B, n, C], handle info, kept indices, token counts)."""
    with ProjectorInputs(model) as cap, apply_pruner(model, name, budget=budget, **params) as h:
        with torch.no_grad():
            model(**inputs)
        return cap.calls[-1].detach(), dict(h.info), [k.tolist() for k in h.kept_indices], list(h.token_counts)


def one(processor, i):
    return processor(images=make_images(2)[i : i + 1], text=PROMPTS[i : i + 1], return_tensors="pt")


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
@pytest.mark.parametrize("i", [0, 1])
def test_adaptive_equals_the_authors_code_on_one_image(tiny, name, i):
    model, processor = tiny
    inputs = one(processor, i)
    layer = 2  # the feature layer of the 4-layer tiny ViT (vision_feature_layer -2)
    feats, q, k = hf_signals(model, inputs["pixel_values"], layer)
    ref, idx = authors_reference(feats[0], q[0], k[0], plus=(name == "prumerge_plus"))
    tokens, info, kept, counts = pruned_tokens(model, inputs, name, None)
    assert info["prumerge_mode"] == "adaptive"
    top, uni, total = info["prumerge_counts"][0]
    assert top + uni == len(idx) and total == len(idx) + 1 == tokens.shape[1]
    assert torch.allclose(tokens[0], ref, atol=1e-5), (tokens[0] - ref).abs().max()
    assert kept == [[]]  # every token the LLM gets is merged
    assert counts[0].merged == total and counts[0].llm_visual == [total] * 4
    # order="raster": the same tokens, the centres in raster order, the extra token last
    raster, *_ = pruned_tokens(model, inputs, name, None, order="raster")
    perm = sorted(range(len(idx)), key=lambda j: idx[j]) + [len(idx)]
    assert torch.allclose(raster[0], ref[perm], atol=1e-5)


def test_fixed_prumerge_equals_the_authors_fixed_ratio(tiny):
    """budget 12 = 11 top-attention centres + the extra token = their ``reduction_ratio=11/36``."""
    model, processor = tiny
    inputs = one(processor, 0)
    feats, q, k = hf_signals(model, inputs["pixel_values"], 2)
    ref, _ = authors_reference(feats[0], q[0], k[0], plus=False, ratio=11 / 36)
    tokens, info, kept, counts = pruned_tokens(model, inputs, "prumerge", 12)
    assert info["prumerge_counts"] == [[11, 0, 12]] and tokens.shape[1] == 12 and kept == [[]]
    assert torch.allclose(tokens[0], ref, atol=1e-5)


def test_fixed_prumerge_plus_equals_the_authors_training_path(tiny):
    """budget 19 = 9 top + 9 uniform + 1 = their ``reduction_ratio=1/4`` (step 4: 2, 6, ..., 34); the
    authors keep a uniform sample that is also a top token twice, ours moves it to the nearest free
    patch, so the authors' path is reproduced exactly when none collides and checked by rule otherwise."""
    model, processor = tiny
    collided = 0
    for i in (0, 1):
        inputs = one(processor, i)
        feats, q, k = hf_signals(model, inputs["pixel_values"], 2)
        tokens, info, *_ = pruned_tokens(model, inputs, "prumerge_plus", 19)
        assert info["prumerge_counts"] == [[9, 9, 19]] and tokens.shape[1] == 19
        ref, idx = authors_reference(feats[0], q[0], k[0], plus=True, ratio=1 / 4)
        assert idx[9:] == list(range(2, 35, 4))
        if not set(idx[:9]) & set(idx[9:]):
            assert torch.allclose(tokens[0], ref, atol=1e-5)
        else:  # a colliding sample moves to its nearest free patch (spread_samples, tested above)
            collided += 1
            taken = torch.zeros(N_VIS, dtype=torch.bool)
            taken[idx[:9]] = True
            centres = idx[:9] + spread_samples(taken, 9).tolist()
            assert len(set(centres)) == 18
            attn = torch.softmax(q[0] @ k[0].T * k.shape[-1] ** -0.5, -1)[0, 1:]
            assert torch.allclose(tokens[0], authors_merge(feats[0], attn, k[0, 1:], centres), atol=1e-5)
    assert collided  # the tiny images' top tokens do collide with the grid: the moving rule is exercised


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
def test_batch_counts_and_padding(tiny, name):
    model, processor = tiny
    batch = processor(images=make_images(2), text=PROMPTS, return_tensors="pt", padding=True)
    for budget in (1, 5, 12, 30):  # fixed: exactly the budget, every token merged
        tokens, info, kept, counts = pruned_tokens(model, batch, name, budget)
        assert tokens.shape[1] == budget and kept == [[], []]
        assert all(c.llm_visual == [budget] * 4 and c.merged == budget for c in counts)
        assert sum(info["prumerge_counts"][0][:2]) == budget - 1
    tokens, info, kept, counts = pruned_tokens(model, batch, name, N_VIS)  # keep all
    assert kept == [list(range(N_VIS))] * 2 and tokens.shape[1] == N_VIS
    # adaptive batch: every image gets the largest count; the largest image's tokens equal it alone
    tokens, info, _, counts = pruned_tokens(model, batch, name, None)
    own = [t + u + 1 for t, u, _ in info["prumerge_counts"]]
    assert tokens.shape[1] == max(own) and all(c.llm_visual == [max(own)] * 4 for c in counts)
    b = own.index(max(own))
    alone, *_ = pruned_tokens(model, one(processor, b), name, None)
    assert torch.allclose(tokens[b], alone[0], atol=1e-5)


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
def test_score_layer_is_declared_and_checked(tiny, name):
    model, _ = tiny
    with apply_pruner(model, name, budget=6) as h:
        assert h.pruner.vision_probe_layers() == [2]
    with apply_pruner(model, name, budget=6, score_layer=-3) as h:
        assert h.pruner.vision_probe_layers() == [1]
    with pytest.raises(ValueError, match="score_layer"):
        apply_pruner(model, name, budget=6, score_layer=3)  # the last layer: LLaVA never runs it


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
def test_refuses_a_vision_tower_without_cls(name):
    model, _ = build_tiny_qwen2_vl(seed=0)
    with pytest.raises(ValueError, match=name):
        apply_pruner(model, name, budget=4)
    with pytest.raises(ValueError, match="CLS"):
        apply_pruner(model, name, budget=None)


@pytest.mark.parametrize("order", ["authors", "raster"])
def test_llava_next_views(order):
    """LLaVA-NeXT: each view is pruned on its own (adaptive counts per view, no batch padding)."""
    from mllm_adapters.registry import get_family
    from mllm_adapters.tiny import build_tiny_llava_next
    from tests.test_conformance import SIZES, make_image

    torch.set_num_threads(1)
    model, processor = build_tiny_llava_next(seed=0)
    prompts = [p.replace("<image>", get_family("llava_next").prompt_image) for p in PROMPTS]
    batch = processor(images=[make_image(s, i) for i, s in enumerate(SIZES)], text=prompts, return_tensors="pt",
                      padding=True)
    for name in ("prumerge", "prumerge_plus"):
        for budget in (None, 17):
            with apply_pruner(model, name, budget=budget, order=order) as h:
                with torch.no_grad():
                    model(**batch)
                assert [k.tolist() for k in h.kept_indices] == [[], []]
                for c in h.token_counts:
                    assert c.merged == c.llm_visual[0] and 0 < c.merged < c.visual_in
                    assert budget is None or c.merged == budget
