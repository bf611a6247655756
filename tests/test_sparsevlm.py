"""SparseVLM (`pruners/sparsevlm.py`): the raters, the schedule tables and budget rule, the density-peaks
clustering (each against an independent re-derivation), and on the tiny LLaVA the kept sets and recycled
tokens recomputed from the model's own layers, positions, counts, batch = singles."""

from __future__ import annotations

import math

import pytest
import torch

from mllm_adapters import apply_pruner
from pruners.sparsevlm import (
    TABLE,
    authors_equivalent_tokens,
    cluster_count,
    density_peaks_merge,
    recycled_count,
    select_raters,
    sparsevlm_schedule,
    stage_tokens,
)
from tests.conftest import PROMPTS, make_images, single
from tests.test_core_invariants import logits_of


# ---- raters ----------------------------------------------------------------------------------------
def _raters_by_hand(visual: list[list[float]], text: list[list[float]]) -> list[bool]:
    """softmax over the text of each visual token's dot products, averaged over the visual tokens; the
    text tokens above the mean of that vector."""
    nt = len(text)
    acc = [0.0] * nt
    for v in visual:
        dots = [sum(a * b for a, b in zip(v, t)) for t in text]
        mx = max(dots)
        ex = [math.exp(d - mx) for d in dots]
        s = sum(ex)
        for j in range(nt):
            acc[j] += ex[j] / s / len(visual)
    mean = sum(acc) / nt
    return [a > mean for a in acc]


def test_raters_match_hand_derivation():
    visual = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.0, 1.0]]
    text = [[2.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.2], [1.0, 1.5, 0.0], [-1.0, 0.0, 0.0]]
    got = select_raters(torch.tensor(visual), torch.tensor(text)).tolist()
    assert got == _raters_by_hand(visual, text)
    assert got == [True, False, False, True, False]
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(7, 5, generator=g), torch.randn(6, 5, generator=g)
    assert select_raters(v, t).tolist() == _raters_by_hand(v.tolist(), t.tolist())


def test_raters_fallback_when_none_above_mean():
    assert select_raters(torch.ones(3, 2), torch.ones(1, 2)).tolist() == [True]  # one text token


# ---- schedule ----------------------------------------------------------------------------------------
def test_authors_tables_and_layers():
    for budget, counts in {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}.items():
        s = sparsevlm_schedule(576, 32, budget)
        assert s["rule"] == "table" and s["counts"] == list(counts) == list(TABLE[budget])
        assert s["layers"] == [3, 7, 16]  # scoring layers 2, 6, 15; layers 3.., 7.., 16.. see the kept tokens
        # the authors' "Equal Tokens" (their log) meets the budget within one token
        assert abs(s["authors_equiv_tokens"] - budget) < 1.0
    s = sparsevlm_schedule(576, 32, 192)
    assert s["per_layer"][:3] == [576] * 3 and s["per_layer"][3] == 309 and s["per_layer"][-1] == 113


def test_recycling_counts():
    assert recycled_count(0) == 0 and recycled_count(1) == 1 and recycled_count(276) == 83
    assert cluster_count(83) == 9 and cluster_count(9) == 1 and cluster_count(10) == 2
    # 192: 576 -> 300 kept + 9 clusters; -> 200 + 4; -> 110 + 3
    assert stage_tokens(576, [300, 200, 110]) == [309, 204, 113]
    assert stage_tokens(576, [300, 200, 110], recycle=False) == [300, 200, 110]


def _authors_log_by_hand(n, n_layers, scoring, counts):
    """Their log: after each layer the current visual count (updated at the scoring layer itself)."""
    cur, per = n, []
    for layer in range(n_layers):
        if layer in scoring:
            c = counts[scoring.index(layer)]
            dele = cur - c
            r = int(dele * 0.3) + 1
            cur = c + int(r / 10) + 1
        per.append(cur)
    return sum(per) / n_layers


@pytest.mark.parametrize("budget", [192, 128, 96, 64])
def test_equivalent_count_definition(budget):
    assert authors_equivalent_tokens(576, 32, [3, 7, 16], TABLE[budget]) == pytest.approx(
        _authors_log_by_hand(576, 32, [2, 6, 15], TABLE[budget]))


@pytest.mark.parametrize("n,depth,budget", [(576, 32, 144), (576, 32, 300), (576, 32, 48), (576, 28, 192),
                                            (36, 4, 12), (1024, 40, 256)])
def test_budget_rule_meets_budget(n, depth, budget):
    s = sparsevlm_schedule(n, depth, budget)
    assert s["rule"] == "interpolated"
    c = s["counts"]
    assert all(1 <= x <= n for x in c) and c[0] >= c[1] >= c[2]
    # within a few tokens (the counts are integers; small models have coarse steps)
    assert abs(s["authors_equiv_tokens"] - budget) <= max(1.0, 0.05 * budget)
    assert s["per_layer"] == [n] * s["layers"][0] + [s["per_layer"][s["layers"][0]]] * (s["layers"][1] - s["layers"][0]) \
        + s["per_layer"][s["layers"][1]:]


def test_budget_below_reach_takes_the_smallest_schedule():
    """Layers 0..1 always see all 576 tokens (36 equivalent tokens of 32 layers): a budget of 32 cannot be
    met; the rule then takes the lowest keep level (about one token per stage)."""
    s = sparsevlm_schedule(576, 32, 32)
    assert s["counts"] == [1, 1, 1] or s["authors_equiv_tokens"] == min(
        sparsevlm_schedule(576, 32, b)["authors_equiv_tokens"] for b in (1, 16, 32))
    assert s["authors_equiv_tokens"] > 32


def test_interpolation_between_rows_stays_between():
    s = sparsevlm_schedule(576, 32, 160)
    lo, hi = TABLE[128], TABLE[192]
    for x, a, b in zip(s["counts"], lo, hi):
        assert min(a, b) - 2 <= x <= max(a, b) + 2


# ---- clustering --------------------------------------------------------------------------------------
def _density_peaks_by_hand(x: list[list[float]], c: int) -> list[list[float]]:
    n, dim = len(x), len(x[0])
    d = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], x[j]))) / math.sqrt(dim) for j in range(n)] for i in range(n)]
    dens = []
    for i in range(n):
        near = sorted(d[i])[:c]
        dens.append(math.exp(-sum(v * v for v in near) / c))
    dmax = max(max(r) for r in d)
    score = []
    for i in range(n):
        higher = [d[i][j] for j in range(n) if dens[j] > dens[i] or (dens[j] == dens[i] and j < i)]
        score.append((min(higher) if higher else dmax) * dens[i])
    centres = sorted(range(n), key=lambda i: -score[i])[:c]
    members = {k: [] for k in range(c)}
    for i in range(n):
        k = centres.index(i) if i in centres else min(range(c), key=lambda k: d[centres[k]][i])
        members[k].append(i)
    return [[sum(x[i][t] for i in members[k]) / (len(members[k]) + 1e-6) for t in range(dim)] for k in range(c)]


@pytest.mark.parametrize("n,c", [(1, 1), (5, 1), (12, 2), (23, 3)])
def test_density_peaks_match_hand_derivation(n, c):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    got = density_peaks_merge(x, c)
    want = torch.tensor(_density_peaks_by_hand(x.tolist(), c), dtype=torch.float64)
    assert got.shape == (c, 4)
    assert torch.allclose(got, want, atol=1e-9)


def test_density_peaks_separates_blobs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 3, generator=g) * 0.01 + torch.tensor([5.0, 0, 0])
    b = torch.randn(5, 3, generator=g) * 0.01 + torch.tensor([-5.0, 0, 0])
    out = density_peaks_merge(torch.cat([a, b]), 2)
    means = sorted(out[:, 0].tolist())
    assert means[0] == pytest.approx(-5.0, abs=0.05) and means[1] == pytest.approx(5.0, abs=0.05)


# ---- on the tiny LLaVA -------------------------------------------------------------------------------
BUDGET = 12


def _run_recorded(model, inputs, **params):
    """Run sparsevlm with eager attention weights returned; record each decoder layer's input hidden
    states and position ids (as the pruned layer sees them) and layer 0's output."""
    layers = model.model.language_model.layers
    seen: dict[int, dict] = {}
    hooks = []
    with apply_pruner(model, "sparsevlm", budget=BUDGET, **params) as h:
        for i, layer in enumerate(layers):
            def pre(module, args, kwargs, i=i):
                hs = args[0] if args else kwargs["hidden_states"]
                seen[i] = {"in": hs.detach().clone(), "pos": kwargs.get("position_ids")}
            def post(module, args, output, i=i):
                seen.setdefault(i, {})["out"] = (output[0] if isinstance(output, tuple) else output).detach().clone()
            hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(layer.register_forward_hook(post))
        try:
            with torch.no_grad():
                out = model(**inputs, output_attentions=True)
        finally:
            for hk in hooks:
                hk.remove()
        return out, seen, {k: [x.clone() for x in v] for k, v in h.kept_by_layer.items()}, \
            [k.clone() for k in h.kept_indices], list(h.token_counts), h.pruner


@pytest.mark.parametrize("recycle", [True, False])
def test_kept_sets_recomputed_from_the_model(tiny, recycle):
    """Each stage's kept set is the top count of the head-mean attention of layer K-1 (the model's own
    eager weights) from the raters (re-derived from the layer-0 input) to the current visual tokens; the
    recycled tokens entering layer K are the density-peaks means of the best deleted ones' hidden states."""
    model, processor = tiny
    inputs = single(processor, 0)
    out, seen, by_layer, kept, counts, pruner = _run_recorded(model, inputs, recycle=recycle)
    image_id = model.config.image_token_id
    ids = inputs["input_ids"][0]
    vis0 = int((ids == image_id).nonzero()[0, 0])
    n = int((ids == image_id).sum())
    text = list(range(vis0 + n, ids.shape[0]))
    emb = seen[0]["in"][0]
    raters = select_raters(emb[vis0:vis0 + n], emb[text])
    rater_pos_rel = [j for j, r in enumerate(raters.tolist()) if r]  # offsets into the text after the image
    sched = pruner._schedule
    slots = list(range(n))  # grid index of each current visual slot (-1 = recycled)
    for K, count in zip(sched["layers"], sched["counts"]):
        att = out.attentions[K - 1][0].float().mean(0)  # [L, L] of the sequence layer K-1 saw
        nv = len(slots)
        start_text = vis0 + nv
        rows = [start_text + j for j in rater_pos_rel]
        score = att[rows][:, vis0:vis0 + nv].mean(0)  # [nv]
        top = score.topk(min(count, nv)).indices
        keep_slots = sorted(top.tolist())
        want_grid = [slots[s] for s in keep_slots if slots[s] >= 0]
        assert by_layer[K][0].tolist() == want_grid, f"layer {K}"
        new_slots = [slots[s] for s in keep_slots]
        deleted = [s for s in range(nv) if s not in keep_slots]
        if recycle and deleted:
            r = int(len(deleted) * 0.3) + 1
            dt = torch.tensor(deleted)
            cand = dt[score[dt].topk(r).indices]
            c = int(r / 10) + 1
            merged_in = seen[K]["in"][0, vis0 + len(keep_slots): vis0 + len(keep_slots) + c]  # layer K's input
            layer_out = seen[K - 1]["out"][0]  # layer K-1's output, before the drop
            want = density_peaks_merge(layer_out[vis0 + cand], c)
            assert torch.allclose(merged_in, want, atol=1e-5), f"recycled tokens at layer {K}"
            new_slots += [-1] * c
        slots = new_slots
        assert seen[K]["in"].shape[1] == vis0 + len(slots) + len(text)
        # the kept slots enter layer K as they left layer K-1
        kept_in = seen[K]["in"][0, vis0:vis0 + len(keep_slots)]
        assert torch.equal(kept_in, seen[K - 1]["out"][0, [vis0 + s for s in keep_slots]])
        # compact positions as the authors' position_ids[:, :L']: 0..L'-1 on a one-sample batch
        pos = seen[K]["pos"]
        assert pos is not None and pos[0].tolist() == list(range(seen[K]["in"].shape[1])), f"positions at {K}"
    assert kept[0].tolist() == [s for s in slots if s >= 0]
    assert counts[0].llm_visual[sched["layers"][-1]] == len(slots)  # kept + recycled, as the layer sees them
    assert counts[0].llm_visual == sched["per_layer"]


@pytest.mark.parametrize("params", [{}, {"recycle": False}, {"positions": "original"}])
def test_batch_equals_singles(tiny, batch, params):
    model, processor = tiny
    with apply_pruner(model, "sparsevlm", budget=BUDGET, **params) as h:
        both = logits_of(model, batch)[:, -1]
        kept_both = [k.clone() for k in h.kept_indices]
        counts_both = [c.llm_visual for c in h.token_counts]
        gen_both = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
        for i in range(2):
            one = logits_of(model, single(processor, i))[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept_both[i])
            assert h.token_counts[0].llm_visual == counts_both[i]
            gen_one = model.generate(**single(processor, i), max_new_tokens=3, do_sample=False)[:, -3:]
            assert torch.equal(gen_one[0], gen_both[i])


def test_recycling_changes_the_output_and_counts(tiny, batch):
    model, _ = tiny
    with apply_pruner(model, "sparsevlm", budget=BUDGET) as h:
        a = logits_of(model, batch)[:, -1]
        ca = [c.llm_visual for c in h.token_counts]
        ka = [k.tolist() for k in h.kept_indices]
    with apply_pruner(model, "sparsevlm", budget=BUDGET, recycle=False) as h:
        b = logits_of(model, batch)[:, -1]

    assert not torch.allclose(a, b)
    assert all(x[-1] > len(k) for x, k in zip(ca, ka))  # recycled tokens counted, not listed as kept


def test_sdpa_equals_eager(tiny, tiny_sdpa, batch):
    outs = []
    for model, _ in (tiny, tiny_sdpa):
        with apply_pruner(model, "sparsevlm", budget=BUDGET) as h:
            outs.append((logits_of(model, batch)[:, -1], [k.tolist() for k in h.kept_indices]))
    assert outs[0][1] == outs[1][1]
    assert (outs[0][0] - outs[1][0]).abs().max() <= 1e-4


def test_images_prompts_fixture_sanity():
    assert len(make_images(2)) == 2 and len(PROMPTS) == 2
