"""Analytic prefill FLOPs (benchmarks.flops) of Qwen2-VL and Qwen2.5-VL against torch's FlopCounterMode.

The family specs count their own parts (`Qwen2VLSpec.vision_flops` / `projector_flops`,
`mllm_adapters/families/qwen2_vl.py`, `qwen2_5_vl.py`): the tower in full on each image's patch grid
(``TokenCounts.feature_grids``: its merged units), one attention segment per image (2-VL) or its
windows except in ``fullatt_block_indexes`` (2.5); the PatchMerger on the units that reach the LLM; the
Qwen2 decoder with the Llama formula. Tiny models of `mllm_adapters.tiny`: a 40 x 60 px image has
2 x 4 units (4 x 8 patches), a 64 x 48 px one 4 x 3 units (8 x 6 patches).

What the engine computes beyond the sample's own figure, and the tests add back from the handle
(``batch_counts.llm_visual_width``), as `tests/test_flops.py` does for LLaVA-NeXT: inert slots padding
a run to the in-LLM method's largest kept count. What the figure does count: when the engine has the
spec encode the images (every run but the untouched one), the tower's own PatchMerger on every unit
(``visual(...)`` ends with it; the engine projects the units reaching the LLM again).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.flops import equiv_tokens, prefill_flops, reference_counts, sample_cost
from benchmarks.models import family_spec
from mllm_adapters import apply_pruner
from mllm_adapters.handle import TokenCounts
from mllm_adapters.tiny import TINY_QWEN_IMAGE, build_tiny_llava
from pruners import get_pruner_class
from tests._adapter_helpers import counted_flops, text_tokens
from tests.conftest import QWEN_BUILDERS, QWEN_SIZES

SIZES = QWEN_SIZES  # (height, width) px: the `qwen` fixture's images (tests/conftest.py)
UNITS = [(2, 4), (4, 3)]  # their merged-unit grids
PROMPTS = [f"USER: {TINY_QWEN_IMAGE} what is the colour of the circle ? ASSISTANT:",
           f"USER: {TINY_QWEN_IMAGE} how many ? ASSISTANT:"]
BUILDERS = QWEN_BUILDERS
#: every method that runs on these families, with its parameters there
METHODS = {"none": {}, "random": {}, "divprune": {}, "pooling": {}, "fastv": {}, "pdrop": {},
           "transprune": {"positions": "original"}, "vflowopt": {}}
TOL = 0.01


def _inputs(qwen, i: int | None = None):
    """Processor outputs of image ``i`` alone (both, left-padded, when ``i`` is None)."""
    _, processor, images = qwen
    sel = slice(None) if i is None else slice(i, i + 1)
    return processor(images=images[sel], text=PROMPTS[sel], return_tensors="pt", padding=True)


def _rel(a: int, b: int) -> float:
    return abs(a - b) / b


def _run(model, processor, method: str, budget: int | None, inputs):
    """(measured FLOPs, per-sample counts, batch counts, overhead) of one prefill with ``method`` attached."""
    handle = apply_pruner(model, method, budget=budget, seed=0, tokenizer=processor.tokenizer, **METHODS[method])
    try:
        handle.count_overhead_flops = True
        measured = counted_flops(model, inputs)
        return measured, list(handle.token_counts), handle.batch_counts, handle.overhead_flops
    finally:
        handle.remove()


def test_attention_segments_are_the_towers(qwen):
    """`attention_segments` lists, per vision block, the segments the tower really attends over
    (``cu_seqlens`` each block receives), for both image sizes."""
    model = qwen[0]
    spec = family_spec(model.config)
    blocks = model.model.visual.blocks
    for i, (rows, cols) in enumerate(UNITS):
        seen: list[list[int]] = []

        def record(module, args, kwargs, seen=seen):
            seen.append(torch.diff(kwargs["cu_seqlens"]).tolist())

        hooks = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
        try:
            with torch.inference_mode():
                model(**_inputs(qwen, i), logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        assert spec.attention_segments(model.config, rows, cols) == seen
    if spec.name == "qwen2_5_vl":  # 32 px windows = 2 x 2 units; blocks 1 and 3 attend over the whole image
        assert spec.attention_segments(model.config, 4, 3) == [[16, 8, 16, 8], [48], [16, 8, 16, 8], [48]]
    else:
        assert spec.attention_segments(model.config, 4, 3) == [[48]] * 4


@pytest.mark.parametrize("i", [0, 1])
def test_unhooked_matches_flop_counter(qwen, i):
    """No pruner: the tower on the image's whole patch grid, the merger on every unit, the LLM on text +
    all units (`reference_counts` of the image's grid)."""
    model = qwen[0]
    inputs = _inputs(qwen, i)
    rows, cols = UNITS[i]
    assert inputs["image_grid_thw"][0].tolist() == [1, 2 * rows, 2 * cols]
    measured = counted_flops(model, inputs)
    counts = reference_counts(model.config, TokenCounts(feature_grids=[(rows, cols)]))
    assert (counts.visual_in, counts.projector, counts.llm_visual) == (rows * cols, rows * cols, [rows * cols] * 4)
    f = prefill_flops(model.config, text_tokens(model, inputs, 0), counts)
    assert _rel(f.total, measured) < TOL, (f.as_dict(), measured)
    spec = family_spec(model.config)
    assert f.vision == spec.image_vision_flops(model.config, rows, cols)
    assert f.projector == spec.projector_flops(model.config, rows * cols)
    with pytest.raises(ValueError, match="feature_grids"):  # an image's size is not in the config
        prefill_flops(model.config, 10)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("i", "budget"), [(0, 4), (1, 4), (1, 100)])  # below the image's run / above it
def test_pruned_matches_flop_counter(qwen, method, i, budget):
    """Every method that runs on Qwen, with the pruner's own overhead: the sample's counts give
    FlopCounterMode's total once the inert slots the engine pads the run with are added
    (``batch_counts.llm_visual_width``); without inert slots the sample's own figure is it."""
    model, processor, _ = qwen
    budget = None if method == "none" else budget
    inputs = _inputs(qwen, i)
    n_text = text_tokens(model, inputs, 0)
    measured, (c,), batch, overhead = _run(model, processor, method, budget, inputs)
    rows, cols = UNITS[i]
    n = rows * cols
    assert (c.visual_in, c.feature_grids, c.vision) == (n, [(rows, cols)], None)
    computed = dataclasses.replace(c, llm_visual=batch.llm_visual_width or c.llm_visual)
    f_computed = prefill_flops(model.config, n_text, computed, overhead=overhead)
    assert _rel(f_computed.total, measured) < TOL, (f_computed.as_dict(), measured, c, batch)
    f = prefill_flops(model.config, n_text, c, overhead=overhead)
    if computed.llm_visual == c.llm_visual:
        assert _rel(f.total, measured) < TOL, (f.as_dict(), measured, c)
    assert f.llm <= f_computed.llm and (f.vision, f.projector) == (f_computed.vision, f_computed.projector)
    ref = prefill_flops(model.config, n_text, reference_counts(model.config, c))
    spec = family_spec(model.config)
    tower = spec.image_vision_flops(model.config, rows, cols)
    if budget is None:  # the untouched model is its own reference
        assert not c.spec_encoded and f.as_dict() == ref.as_dict() and f.vision == tower
        return
    # the tower ran in full, without its own merger pass; the merger ran on what reaches the LLM
    assert c.spec_encoded and f.vision == tower
    assert f.projector == spec.projector_flops(model.config, c.llm_visual[0]) and c.projector == c.llm_visual[0]
    assert max(c.llm_visual) <= n
    stages = get_pruner_class(method).stages
    if budget < n:
        assert min(c.llm_visual) <= budget
        if "llm" not in stages:
            assert c.llm_visual == [c.projector] * 4
            assert f.total - f.overhead < ref.total  # pruning before the LLM shows up in the count
    elif "llm" not in stages:
        assert c.llm_visual == [n] * 4  # within budget: the image reaches the LLM whole


@pytest.mark.parametrize("method", list(METHODS))
def test_ragged_batch_of_two(qwen, method):
    """A batch of the two images (different sizes, left padding): each sample's counts are its counts
    alone, and the batch's FlopCounterMode total is the two samples' figures at the width the batch
    computed (rows padded to one length, visual runs to ``llm_visual_width``) plus the batch's overhead."""
    model, processor, _ = qwen
    budget = None if method == "none" else 4
    both = _inputs(qwen)
    measured, per, batch, overhead = _run(model, processor, method, budget, both)
    assert [c.feature_grids for c in per] == [[g] for g in UNITS]
    assert [c.visual_in for c in per] == [r * c for r, c in UNITS]
    for b, c in enumerate(per):
        alone = _inputs(qwen, b)
        _, (c1,), _, _ = _run(model, processor, method, budget, alone)
        assert c == c1
        n_text = text_tokens(model, both, b)
        assert n_text == text_tokens(model, alone, 0)
        a, s = sample_cost(model.config, n_text, c), sample_cost(model.config, n_text, c1)
        assert (a.flops.as_dict(), a.reference, a.visual_in, a.equiv_tokens) == \
               (s.flops.as_dict(), s.reference, s.visual_in, s.equiv_tokens)
    L = both["input_ids"].shape[1]
    units = [c.visual_in for c in per]
    # every row has the same length: the untouched model's prompt, or each run rewritten to a common width
    row_text = L - (max(units) if budget is None else min(units))
    width = batch.llm_visual_width
    total = sum(prefill_flops(model.config, row_text, dataclasses.replace(c, llm_visual=width)).total for c in per)
    assert _rel(total + overhead, measured) < TOL, (total, overhead, measured)


def test_sample_cost_of_a_pruned_sample(qwen):
    """`sample_cost`: the reference is the unhooked model on the same sample; visual tokens and the
    layer average come from the sample's own counts."""
    model, processor, _ = qwen
    inputs = _inputs(qwen, 1)
    n_text = text_tokens(model, inputs, 0)
    _, (c,), _, overhead = _run(model, processor, "fastv", 4, inputs)
    cost = sample_cost(model.config, n_text, c, overhead=overhead)
    assert _rel(cost.reference, counted_flops(model, inputs)) < TOL
    assert cost.visual_in == 12 and cost.equiv_tokens == equiv_tokens(c, 4, 12) == (12 + 12 + 4 + 4) / 4
    assert cost.flops.total - cost.flops.overhead < cost.reference


def test_llava_keeps_the_clip_formulas():
    """The base spec answers None, so LLaVA's tower and projector are still benchmarks' CLIP / LLaVA counts."""
    model, _ = build_tiny_llava(seed=0)
    spec = family_spec(model.config)
    assert spec.vision_flops(model.config, TokenCounts()) is None
    assert spec.projector_flops(model.config, 16) is None
