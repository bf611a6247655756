"""Qwen2-VL and Qwen2.5-VL on the engine (`mllm_adapters/families/qwen2_vl.py`, `qwen2_5_vl.py`).

Beyond the conformance suite, what is checked here, on the tiny Qwen2-VL built from config with
images of different sizes (8 and 12 merged units) and left padding:

- keep-all = the unpruned model, bitwise;
- a batch equals its samples alone (last-token logits 1e-4, kept units, 3 greedy tokens), also with a
  sample holding two images next to one holding none;
- pre-LLM = the unpruned model fed exactly the kept units at their ORIGINAL M-RoPE positions;
- cached generate() = greedy decoding by full recompute;
- the methods that need what the engine does not offer on Qwen refuse with a ValueError naming
  the method: CLS-based ones (no CLS), the vision stage, compact positions;
  video inputs are refused; a second thread gets a RuntimeError (the model keeps ``rope_deltas``).
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mllm_adapters import apply_pruner
from mllm_adapters.tiny import TINY_QWEN_IMAGE
from tests._adapter_helpers import assert_refused, assert_video_refused, cached_and_recomputed
from tests.conftest import QWEN_SIZES

SIZES = QWEN_SIZES  # 8 and 12 merged units (the `qwen` fixture's images, tests/conftest.py)
PROMPTS = [f"USER: {TINY_QWEN_IMAGE} what is the colour of the circle ? ASSISTANT:",
           f"USER: {TINY_QWEN_IMAGE} how many ? ASSISTANT:"]
WORKS = [("random", 4), ("divprune", 4), ("pooling", 4), ("fastv", 4), ("pdrop", 4),
         ("transprune", 4)]
PRE_LLM = ["random", "divprune"]




def enc(qwen, idx, prompts=PROMPTS, per_sample=None):
    _, processor, images = qwen
    per_sample = per_sample or [[i] for i in range(len(prompts))]
    imgs = [images[i] for s in idx for i in per_sample[s]]
    return processor(images=imgs or None, text=[prompts[s] for s in idx], return_tensors="pt", padding=True)


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def generate(model, x, steps=3):
    with torch.no_grad():
        return model.generate(**x, max_new_tokens=steps, do_sample=False)[:, -steps:]


def params_of(method):
    return {}  # transprune's default positions are original on M-RoPE families


def test_keep_all_equals_unpruned(qwen):
    model = qwen[0]
    x = enc(qwen, [0, 1])
    ref = logits(model, x)
    units = (x["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert units == [8, 12]
    for budget in (None, 1280):
        with apply_pruner(model, "none", budget=budget) as h:
            assert torch.equal(logits(model, x), ref)
            assert [k.tolist() for k in h.kept_indices] == [list(range(n)) for n in units]


@pytest.mark.parametrize("method,budget", WORKS)
def test_batch_of_two_equals_two_batches_of_one(qwen, method, budget):
    model = qwen[0]
    x = enc(qwen, [0, 1])
    with apply_pruner(model, method, budget=budget, **params_of(method)) as h:
        both = logits(model, x)[:, -1]
        kept = [k.clone() for k in h.kept_indices]
        gen = generate(model, x)
        for i in range(2):
            one = enc(qwen, [i])
            assert (logits(model, one)[0, -1] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept[i])
            assert torch.equal(generate(model, one)[0], gen[i])
    if method not in ("pooling",):
        assert all(len(k) == budget for k in kept)


@pytest.mark.parametrize("method", PRE_LLM + ["pooling"])
def test_two_images_and_none(qwen, method):
    model = qwen[0]
    prompts = [f"USER: {TINY_QWEN_IMAGE} {TINY_QWEN_IMAGE} what is the colour ? ASSISTANT:", "USER: how many ? ASSISTANT:",
               PROMPTS[1]]
    per_sample = [[0, 1], [], [1]]
    x = enc(qwen, [0, 1, 2], prompts, per_sample)
    with apply_pruner(model, method, budget=4) as h:
        both = logits(model, x)[:, -1]
        kept = [k.clone() for k in h.kept_indices]
        assert len(kept) == 3  # one entry per image
        j = 0
        for i in range(3):
            one = logits(model, enc(qwen, [i], prompts, per_sample))[0, -1]
            assert (one - both[i]).abs().max() <= 1e-4
            n = len(per_sample[i])
            assert all(torch.equal(a, b) for a, b in zip(h.kept_indices, kept[j : j + n]))
            j += n


@pytest.mark.parametrize("method", PRE_LLM)
def test_pre_llm_equals_model_on_kept_units_at_original_positions(qwen, method):
    """The pruned run equals the unpruned model given only the kept units, each at its own M-RoPE
    position of the unpruned prompt (and every text token at its unpruned position)."""
    model, processor, _ = qwen
    x = enc(qwen, [1])
    with apply_pruner(model, method, budget=4) as h:
        out = logits(model, x)[0, -1]
        (kept,) = h.kept_indices
    with torch.no_grad():
        feats = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"]).pooler_output[0]  # [12, Dt]
        pos, _ = model.model.get_rope_index(x["input_ids"], x["mm_token_type_ids"],
                                            image_grid_thw=x["image_grid_thw"], attention_mask=x["attention_mask"])
    ids = x["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero()[:, 0]
    keep_cols = torch.cat([(ids != model.config.image_token_id).nonzero()[:, 0], img[kept]]).sort().values
    with torch.no_grad():
        ref = model(input_ids=ids[keep_cols][None], attention_mask=torch.ones(1, len(keep_cols), dtype=torch.long),
                    position_ids=pos[:, :, keep_cols],
                    mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(feats[kept],))}
                    ).logits[0, -1]
    assert (out - ref).abs().max() <= 1e-4
    # compact positions (as if the image had 4 units) would be another model input: the test can tell
    with torch.no_grad():
        compact = model(input_ids=ids[keep_cols][None], mm_token_type_ids=x["mm_token_type_ids"][:, keep_cols],
                        image_grid_thw=torch.tensor([[1, 4, 4]]),
                        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(feats[kept],))}
                        ).logits[0, -1]
    assert (out - compact).abs().max() > 1e-3


@pytest.mark.parametrize("method,budget", [("random", 4), ("divprune", 4), ("fastv", 4), ("pdrop", 4)])
def test_cached_generate_equals_recompute(qwen, method, budget, monkeypatch):
    """generate() with the pruned KV cache equals greedy decoding by full recompute (the prompt plus the
    generated tokens re-run each step), the prefill's pruner decisions replayed at every step (an in-LLM
    method's choice depends on the last token, which changes at every recomputed step)."""
    cached, ref = cached_and_recomputed(qwen[0], enc(qwen, [0, 1]), method, {"budget": budget}, 3, monkeypatch)
    assert (cached - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("method", ["vtc_cls", "visionzip", "recoverable"])
def test_cls_methods_refuse_naming_method_and_model(qwen, method):
    model = qwen[0]
    with pytest.raises(ValueError, match=rf"{method}.*\[CLS\].*qwen2"):
        apply_pruner(model, method, budget=4)
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("method,params,match", [
    ("flowcut", {}, "vision"),
    ("transprune", {"positions": "compact"}, "positions='compact'"),
])
def test_unsupported_methods_refuse_clearly(qwen, method, params, match):
    assert_refused(qwen[0], method, match, **params)


def test_video_is_refused(qwen):
    assert_video_refused(qwen[0], enc(qwen, [0]))


def test_a_second_thread_gets_a_clear_error(qwen):
    model = qwen[0]
    x = enc(qwen, [0])
    errors = []
    with apply_pruner(model, "random", budget=4) as h:
        assert h.adapter.thread_safe is False
        logits(model, x)

        def other():
            try:
                logits(model, x)
            except RuntimeError as e:
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1 and "thread" in str(errors[0])


@pytest.mark.parametrize("budget", [2, 0.25])
def test_progressive_schedules_count_from_each_images_own_units(qwen, budget):
    """PDrop's stage counts follow each image's own unit count (8 and 12 here), int or fraction budget,
    in a batch exactly as alone; the smaller count is padded with inert fillers
    (``batch_counts.llm_visual_width``)."""
    from pruners.base import resolve_budget
    from pruners.pdrop import pdrop_schedule

    model = qwen[0]
    x = enc(qwen, [0, 1])
    layers = model.config.text_config.num_hidden_layers
    with apply_pruner(model, "pdrop", budget=budget) as h:
        both = logits(model, x)[:, -1]
        counts = [c.llm_visual for c in h.token_counts]
        width = list(h.batch_counts.llm_visual_width)
        for i, n in enumerate((8, 12)):
            b = budget if isinstance(budget, int) else resolve_budget(budget, n)
            assert counts[i] == pdrop_schedule(n, layers, b)["per_layer"]
            alone = logits(model, enc(qwen, [i]))[:, -1]
            assert (alone[0] - both[i]).abs().max() <= 1e-4
            assert h.token_counts[0].llm_visual == counts[i]
    assert width == [max(a, b) for a, b in zip(*counts)]
