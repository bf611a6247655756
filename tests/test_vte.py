"""`vte`: the budget -> exit-layer rule, the layer/budget parameters, and the exit on tiny LLaVA and
Qwen against an independent construction: the unpruned model whose decoder layers >= K get a 4D
attention mask hiding every visual token (forward pre-hooks; text tokens keep their positions)."""

from __future__ import annotations

import pytest
import torch

from mllm_adapters import apply_pruner
from mllm_adapters.tiny import TINY_QWEN_PROMPT
from pruners import get_pruner_class
from pruners.vte import vte_layer, vte_schedule
from tests.conftest import PROMPTS, make_images

STEPS = 3


# ---- the budget -> K rule (no model) ------------------------------------------------------------------
@pytest.mark.parametrize("n,L,budget,k", [
    (576, 32, 72, 4),     # 576*4/32 = 72 exactly
    (576, 32, 71, 4),     # 54 < 71 <= 72: the first K reaching it
    (576, 32, 144, 8),
    (576, 32, 100, 6),    # 90 < 100 <= 108
    (576, 32, 1, 1),      # at most N/L = 18: K = 1 (the smallest exit)
    (576, 32, 575, 31),   # at most L-1
    (36, 4, 12, 2),       # the tiny LLaVA of the conformance suite: 9 < 12 <= 18
    (36, 4, 18, 2),
    (36, 4, 27, 3),
    (36, 4, 35, 3),       # K = 4 would reach it, but the last exit is L-1
])
def test_budget_to_layer(n, L, budget, k):
    assert vte_layer(n, L, budget) == k
    s = vte_schedule(n, L, k)
    assert s["per_layer"] == [n] * k + [0] * (L - k)
    assert s["equiv_tokens"] == pytest.approx(n * k / L)
    # the smallest K whose equivalent count reaches the budget (as every in-LLM method's: equivalent
    # tokens >= budget), at most L-1
    reach = [j for j in range(1, L) if n * j / L >= budget]
    assert k == (min(reach) if reach else L - 1)


def test_budget_to_layer_needs_two_layers():
    with pytest.raises(ValueError, match="exit layer"):
        vte_layer(36, 1, 12)


# ---- parameters ---------------------------------------------------------------------------------------
def attached(model, **kw):
    return apply_pruner(model, "vte", **kw)


def test_layer_and_budget(tiny):
    model, _ = tiny
    L = model.config.text_config.num_hidden_layers
    with attached(model, budget=12) as h:  # 36*1/4 = 9 < 12 <= 18
        assert h.pruner.llm_layers() == [2] and not h.pruner.chooses_budget
    with attached(model, layer=2) as h:  # budget None: the layer decides
        assert h.pruner.llm_layers() == [2] and h.pruner.chooses_budget and not h.pruner.keeps_all
        assert h.pruner.token_schedule() == [36, 36, 0, 0]
    with attached(model, layer=2, budget=18) as h:  # agreeing: accepted
        assert h.pruner.llm_layers() == [2]
    with attached(model) as h:
        assert h.pruner.keeps_all and h.pruner.llm_layers() == []
    with attached(model, budget=36) as h:
        assert h.pruner.keeps_all and h.pruner.llm_layers() == []
    with pytest.raises(ValueError, match=r"budget=20.*layer=2"):
        attached(model, layer=2, budget=20)
    with pytest.raises(ValueError, match=r"budget=36.*layer=2"):
        attached(model, layer=2, budget=36)
    for bad in (0, L):
        with pytest.raises(ValueError, match="layer"):
            attached(model, layer=bad)
    assert getattr(model, "_prunebench_handle", None) is None or model._prunebench_handle.removed
    with pytest.raises(ValueError, match="layer"):
        get_pruner_class("vte")(layer=1.5)


# ---- the reference: visual keys hidden from layers >= K --------------------------------------------------
def decoder_layers(model):
    lm = model.model.language_model
    return lm.layers


def masked_reference(model, k: int, visual: torch.Tensor):
    """Forward pre-hooks on decoder layers >= k hiding the key columns ``visual`` [B, L] (True = a visual
    token of the prompt; columns beyond it, the decoded tokens, stay visible) in their 4D mask."""
    handles = []

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        assert mask is not None and mask.dim() == 4, "the reference needs eager attention's 4D mask"
        cols = torch.zeros(mask.shape[0], mask.shape[-1], dtype=torch.bool)
        cols[:, : visual.shape[1]] = visual
        if mask.dtype == torch.bool:
            kwargs["attention_mask"] = mask & ~cols[:, None, None, :]
        else:
            kwargs["attention_mask"] = mask.masked_fill(cols[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, kwargs

    for i, layer in enumerate(decoder_layers(model)):
        if i >= k:
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def image_inputs(inputs) -> dict:
    return {key: v for key, v in inputs.items() if key not in ("input_ids", "attention_mask")}


def reference_greedy(model, inputs, k: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(last-token logits of the prompt [B, V], greedy tokens [B, steps]) by full recompute on the
    unpruned model with visual keys hidden from layers >= k."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    visual = ids == model.config.image_token_id
    extra = image_inputs(inputs)
    mm = extra.pop("mm_token_type_ids", None)
    handles = masked_reference(model, k, visual)
    first, toks = None, []
    try:
        for _ in range(steps):
            more = {} if mm is None else {"mm_token_type_ids": mm}
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, **extra, **more, use_cache=False).logits[:, -1]
            first = logits if first is None else first
            nxt = logits.argmax(-1, keepdim=True)
            toks.append(nxt)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            if mm is not None:
                mm = torch.cat([mm, torch.zeros_like(nxt)], 1)
    finally:
        for h in handles:
            h.remove()
    return first, torch.cat(toks, 1)


def check_exit(model, inputs, runs: list[int], **params) -> None:
    L = model.config.text_config.num_hidden_layers
    with apply_pruner(model, "vte", **params) as h:
        (k,) = h.pruner.llm_layers()
        with torch.no_grad():
            out = model(**inputs).logits
        kept, by_layer = [t.tolist() for t in h.kept_indices], dict(h.kept_by_layer)
        counts = [list(c.llm_visual) for c in h.token_counts]
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)[:, -STEPS:]
    assert kept == [[] for _ in runs]
    assert list(by_layer) == [k] and all(t.numel() == 0 for t in by_layer[k])
    assert counts == [[n] * k + [0] * (L - k) for n in runs]
    ref_last, ref_gen = reference_greedy(model, inputs, k, STEPS)
    torch.testing.assert_close(out[:, -1], ref_last, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen, ref_gen), (gen, ref_gen)  # cached generate == masked full recompute
    with torch.no_grad():  # and the exit really changes the model
        full = model(**inputs).logits[:, -1]
    assert not torch.allclose(full, out[:, -1], atol=1e-4)


@pytest.mark.parametrize("params", [{"budget": 12}, {"layer": 2}, {"layer": 3}, {"layer": 2, "budget": 18}],
                         ids=["budget12", "layer2", "layer3", "both"])
def test_tiny_llava_exit_equals_masked_model(tiny, batch, params):
    model, _ = tiny
    check_exit(model, batch, [36, 36], **params)


def test_tiny_llava_single_samples_equal_batch(tiny, batch):
    model, processor = tiny
    with apply_pruner(model, "vte", budget=12):
        with torch.no_grad():
            both = model(**batch).logits[:, -1]
            alone = [model(**processor(images=make_images(2)[i:i + 1], text=PROMPTS[i:i + 1],
                                       return_tensors="pt")).logits[:, -1] for i in range(2)]
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-4, atol=1e-4)


def test_tiny_qwen_exit_equals_masked_model(qwen):
    model, processor, images = qwen
    inputs = processor(images=images, text=[TINY_QWEN_PROMPT, TINY_QWEN_PROMPT.replace(" what is", "")],
                       return_tensors="pt", padding=True)
    runs = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert runs[0] != runs[1]
    check_exit(model, inputs, runs, layer=2)
    with apply_pruner(model, "vte", budget=max(1, min(runs) // 3)) as h:  # K from the model's token count
        n = h.pruner.info.num_visual_tokens
        L = h.pruner.info.llm_num_layers
        assert h.pruner.llm_layers() == [vte_layer(n, L, max(1, min(runs) // 3))]
    check_exit(model, inputs, runs, budget=max(1, min(runs) // 3))
