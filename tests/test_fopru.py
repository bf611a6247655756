"""`fopru` (pruners/fopru.py): both strategies and the significance rule on hand-made tensors against an
independent, list-based re-derivation; on the tiny LLaVA the kept set equals the rule recomputed from HF's
own ``output_attentions`` (feature layer -2, [CLS] row and column dropped); on the tiny Qwen2-VL /
Qwen2.5-VL it follows the rule on the engine's per-image unit attention and unit grid.
"""

from __future__ import annotations

import pytest
import torch

from mllm_adapters import apply_pruner
from mllm_adapters.tiny import TINY_QWEN_IMAGE
from pruners import get_pruner_class
from pruners.base import ModelInfo
from pruners.fopru import FoPru, focal_significance, rank_select, row_select
from tests.conftest import single


# ---- independent re-derivation (plain Python lists) -------------------------------------------------
def _var(x: list[float]) -> float:
    m = sum(x) / len(x)
    return sum((v - m) ** 2 for v in x) / (len(x) - 1)


def ref_significance(a: list[list[float]]) -> tuple[list[float], str]:
    """Column means s1 vs row means s2 of the (feature-token) attention matrix ``a``: s1 if its unbiased
    variance is strictly larger, else s2."""
    n = len(a)
    s1 = [sum(a[i][j] for i in range(n)) / n for j in range(n)]
    s2 = [sum(a[i]) / n for i in range(n)]
    return (s1, "column") if _var(s1) > _var(s2) else (s2, "row")


def ref_rank(sig: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(sig)), key=lambda i: (-sig[i], i))[:k])


def ref_row(sig: list[float], h: int, w: int, k: int) -> list[int]:
    """Rows by summed significance (ties: upper row); k // w whole rows, then the k % w most significant
    tokens (ties: left) of the next-ranked row."""
    k = min(k, h * w)
    row_sum = [sum(sig[r * w + c] for c in range(w)) for r in range(h)]
    rows = sorted(range(h), key=lambda r: (-row_sum[r], r))
    full, rem = divmod(k, w)
    out = [r * w + c for r in rows[:full] for c in range(w)]
    if rem:
        r = rows[full]
        out += [r * w + c for c in sorted(range(w), key=lambda c: (-sig[r * w + c], c))[:rem]]
    return sorted(out)


# ---- hand-made significance maps --------------------------------------------------------------------
def test_rank_on_a_hand_made_map():
    sig = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.7]])
    assert rank_select(sig, 3).tolist() == [[1, 3, 5]]
    assert rank_select(torch.zeros(1, 6), 2).tolist() == [[0, 1]]  # ties: lower index


def test_row_on_a_hand_made_map():
    """3 x 4 grid: row sums 1.0, 2.6, 1.4 -> row order 1, 2, 0."""
    sig = torch.tensor([[0.1, 0.2, 0.3, 0.4,
                         0.5, 0.9, 0.7, 0.5,
                         0.9, 0.1, 0.2, 0.2]])
    assert row_select(sig, (3, 4), 4).tolist() == [[4, 5, 6, 7]]
    assert row_select(sig, (3, 4), 8).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    # 6 = one whole row (1) + the 2 best tokens of the next row (2): 8 (0.9) and 10 (0.2, tie with 11 -> left)
    assert row_select(sig, (3, 4), 6).tolist() == [[4, 5, 6, 7, 8, 10]]
    # 3 < W: the 3 best tokens of the best row only (5, 6, then 4 over 7 on the tie), not the global
    # top 3 (which would take 8)
    assert row_select(sig, (3, 4), 3).tolist() == [[4, 5, 6]] != rank_select(sig, 3).tolist()
    assert row_select(sig, (3, 4), 12).tolist() == [list(range(12))]


def test_row_ties_go_to_the_upper_row():
    assert row_select(torch.ones(1, 6), (3, 2), 2).tolist() == [[0, 1]]


def test_row_refuses_a_grid_that_does_not_match():
    with pytest.raises(ValueError, match="grid"):
        row_select(torch.rand(1, 10), (3, 3), 4)


@pytest.mark.parametrize("h,w,k", [(6, 6, 12), (6, 6, 7), (6, 6, 1), (4, 7, 10), (5, 3, 14), (1, 8, 3), (8, 1, 5)])
def test_strategies_match_the_reference_on_random_maps(h, w, k):
    g = torch.Generator().manual_seed(h * 100 + w * 10 + k)
    sig = torch.rand(3, h * w, generator=g)
    rank, row = rank_select(sig, k).tolist(), row_select(sig, (h, w), k).tolist()
    for b in range(3):
        assert rank[b] == ref_rank(sig[b].tolist(), k)
        assert row[b] == ref_row(sig[b].tolist(), h, w, k)
        assert len(row[b]) == len(set(row[b])) == min(k, h * w)


def test_significance_picks_the_higher_variance_mean():
    n = 5
    col = torch.softmax(torch.randn(n, n, generator=torch.Generator().manual_seed(0)) * 3, dim=1)
    per_row = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7])[:, None].expand(n, n)  # constant across columns
    # with a leading CLS token (dropped by the rule): T = 1 + n
    attn = torch.zeros(2, n + 1, n + 1)
    attn[0, 1:, 1:], attn[1, 1:, 1:] = col, per_row
    attn[:, 0], attn[:, :, 0] = 5.0, 5.0  # whatever CLS holds must not matter
    sig, use_col = focal_significance(attn, n)
    for b in range(2):
        want, which = ref_significance(attn[b, 1:, 1:].tolist())
        assert torch.allclose(sig[b], torch.tensor(want), atol=1e-7)
        assert ("column" if use_col[b] else "row") == which
    assert use_col.tolist() == [True, False]  # softmax rows: row means near-constant; per_row: columns constant


# ---- parameters --------------------------------------------------------------------------------------
def _info(**kw) -> ModelInfo:
    base = dict(family="llava", num_visual_tokens=576, grid_hw=(24, 24), has_cls=True, vision_num_layers=24,
                vision_feature_layer=22, vision_num_heads=16, llm_num_layers=32, llm_hidden_size=4096)
    base.update(kw)
    return ModelInfo(**base)


def test_defaults_and_probe_layer():
    assert FoPru.defaults == {"strategy": "rank", "significance": "auto"}
    p = FoPru(budget=64)
    p.attach(_info())
    assert p.vision_probe_layers() == [22]
    assert get_pruner_class("fopru") is FoPru


@pytest.mark.parametrize("params,word", [({"strategy": "column"}, "strategy"), ({"significance": "max"}, "significance")])
def test_bad_parameters(params, word):
    with pytest.raises(ValueError, match=word):
        FoPru(budget=8, **params)


def test_cls_refused_without_cls():
    with pytest.raises(ValueError, match="significance='auto'"):
        FoPru(budget=8, significance="cls").attach(_info(family="qwen2_vl", has_cls=False))
    FoPru(budget=8).attach(_info(family="qwen2_vl", has_cls=False))


# ---- tiny LLaVA: HF's own attentions -----------------------------------------------------------------
def _hf_attention(model, pixel_values) -> torch.Tensor:
    """[B, 1+N, 1+N] head-mean attention of the feature layer (-2) from HF's ``output_attentions``."""
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_attentions=True)
    return out.attentions[model.config.vision_feature_layer].mean(1)


@pytest.mark.parametrize("strategy", ["rank", "row"])
@pytest.mark.parametrize("significance", ["auto", "received", "cls"])
@pytest.mark.parametrize("budget", [12, 7, 3])
def test_tiny_llava_kept_set_equals_the_rule_on_hf_attentions(tiny, batch, strategy, significance, budget):
    model, _ = tiny
    attn = _hf_attention(model, batch["pixel_values"])  # [B, 37, 37]
    with apply_pruner(model, "fopru", budget=budget, strategy=strategy, significance=significance) as h:
        with torch.no_grad():
            model(**batch)
        kept = [k.tolist() for k in h.kept_indices]
    side = int(round((attn.shape[-1] - 1) ** 0.5))  # 6 x 6
    for b in range(2):
        if significance == "cls":
            sig = attn[b, 0, 1:].tolist()
        elif significance == "received":
            sig = attn[b, 1:, 1:].mean(0).tolist()
        else:
            sig, _ = ref_significance(attn[b, 1:, 1:].tolist())
        want = ref_rank(sig, budget) if strategy == "rank" else ref_row(sig, side, side, budget)
        assert kept[b] == want


def test_tiny_llava_row_keeps_continuous_rows(tiny, batch):
    model, _ = tiny
    with apply_pruner(model, "fopru", budget=12, strategy="row") as h:
        with torch.no_grad():
            model(**batch)
        for k in h.kept_indices:
            rows = sorted({i // 6 for i in k.tolist()})
            assert len(rows) == 2 and sorted(k.tolist()) == [r * 6 + c for r in rows for c in range(6)]


def test_tiny_llava_batch_equals_singles(tiny, batch):
    model, processor = tiny
    with apply_pruner(model, "fopru", budget=9, strategy="row") as h:
        with torch.no_grad():
            both = model(**batch).logits[:, -1]
        kept = [k.clone() for k in h.kept_indices]
        for i in range(2):
            with torch.no_grad():
                one = model(**single(processor, i)).logits[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept[i])


# ---- tiny Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------------
QWEN_PROMPTS = [f"USER: {TINY_QWEN_IMAGE} what is the colour of the circle ? ASSISTANT:",
                f"USER: {TINY_QWEN_IMAGE} how many ? ASSISTANT:"]


@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_qwen_follows_the_rule_on_the_engine_signals(qwen, monkeypatch, strategy):
    model, processor, images = qwen
    x = processor(images=images, text=QWEN_PROMPTS, return_tensors="pt", padding=True)
    seen = []
    orig = FoPru.prune_pre_llm

    def spy(self, ctx):
        a = ctx.vision_attention(self.info.vision_feature_layer)  # [1, N, N] merged units, no CLS
        assert a.shape[1] == ctx.features.shape[1]
        seen.append((a[0].tolist(), tuple(ctx.info.grid_hw), self.budget))
        return orig(self, ctx)

    monkeypatch.setattr(FoPru, "prune_pre_llm", spy)
    with apply_pruner(model, "fopru", budget=5, strategy=strategy) as h:
        with torch.no_grad():
            model(**x)
        kept = [k.tolist() for k in h.kept_indices]
    assert len(seen) == 2 and [len(k) for k in kept] == [5, 5]
    for (a, (gh, gw), budget), k in zip(seen, kept):
        assert gh * gw == len(a)
        sig, which = ref_significance(a)
        assert which == "column"  # unit rows sum to 1: the row means are constant
        assert k == (ref_rank(sig, budget) if strategy == "rank" else ref_row(sig, gh, gw, budget))


def test_qwen_cls_refused(qwen):
    model = qwen[0]
    with pytest.raises(ValueError, match="significance"):
        apply_pruner(model, "fopru", budget=4, significance="cls")
    h = getattr(model, "_prunebench_handle", None)
    assert h is None or h.removed
