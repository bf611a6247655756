"""The pruning core's invariants on a tiny LLaVA (issue 2), for every stage.

- keep-all reproduces the unpruned logits;
- pre-LLM pruning equals running the unpruned model on a prompt with only the kept image tokens;
- LLM-stage pruning equals an independent recomputation of layers >= K on the kept tokens;
- a batch of two equals two batches of one (left padding);
- generate() with the pruned cache equals greedy decoding by full recompute with the same kept tokens;
- handle.remove() restores the model; same seed, same result.
"""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mllm_adapters import apply_pruner
from pruners import available_pruners, register_pruner
from pruners.base import Pruner, VisionLayerContext
from tests._adapter_helpers import greedy_recompute
from tests.conftest import PROMPTS, make_images, single

N_VIS = 36  # tiny model: 48 px / 8 px patches = 6 x 6


@register_pruner("_test_vision_stride")
class VisionStride(Pruner):
    """Test-only vision-stage pruner: after ViT layer 1 keep every other patch, then the first
    `budget` of those after layer 2 (proves the adapter can shrink the ViT between layers)."""

    stages = ("vision",)

    def vision_layers(self) -> list[int]:
        return [1, 2]

    def prune_vision(self, ctx: VisionLayerContext) -> torch.Tensor:
        B, n = ctx.patch_index.shape
        if ctx.layer == 1:
            return torch.arange(0, n, 2).expand(B, -1)
        return torch.arange(min(self.budget, n)).expand(B, -1)


def logits_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


STAGE_PRUNERS = [
    ("none", {}),
    ("random", {}),
    ("fastv", {}),
    ("fastv", {"positions": "compact"}),
    ("_test_vision_stride", {}),
]


# (a stride pruner cannot keep all tokens with a numeric budget: it runs with budget=None only)
KEEP_ALL = [(m, p, b) for m, p in STAGE_PRUNERS for b in (None, N_VIS) if not (m == "_test_vision_stride" and b)]


@pytest.mark.parametrize("method,params,budget", KEEP_ALL)
def test_keep_all_reproduces_unpruned_logits(tiny, batch, method, params, budget):
    model, _ = tiny
    ref = logits_of(model, batch)
    with apply_pruner(model, method, budget=budget, **params):
        out = logits_of(model, batch)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5


def test_sdpa_keep_all_and_llm_stage_runs(tiny_sdpa, batch):
    model, _ = tiny_sdpa
    ref = logits_of(model, batch)
    with apply_pruner(model, "fastv", budget=None):
        assert (logits_of(model, batch) - ref).abs().max() <= 1e-5
    with apply_pruner(model, "fastv", budget=8) as h:
        out = logits_of(model, batch)
        assert out.shape == ref.shape[:1] + (ref.shape[1] - (N_VIS - 8),) + ref.shape[2:]
        assert all(len(k) == 8 for k in h.kept_indices)


def _reference_with_features(model, processor, images, prompts, feats_per_sample):
    """Run the UNPRUNED model on prompts whose image run holds exactly the given features."""
    n = feats_per_sample[0].shape[0]
    texts = [p.replace("<image>", "<image>" * n) for p in prompts]
    tok = processor.tokenizer(texts, return_tensors="pt", padding=True)
    feats = [model.model.multi_modal_projector(f[None])[0] for f in feats_per_sample]
    with torch.no_grad():
        out = model(
            input_ids=tok["input_ids"],
            attention_mask=tok["attention_mask"],
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)},
        )
    return out.logits, tok


def _vision_features(model, pixel_values) -> torch.Tensor:
    """[B, N, Dv] what LLaVA feeds the projector (HF's own path)."""
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def test_pre_llm_equals_model_on_kept_tokens(tiny, batch):
    model, processor = tiny
    with apply_pruner(model, "random", budget=10, seed=3) as h:
        out = logits_of(model, batch)
        kept = h.kept_indices
    assert [len(k) for k in kept] == [10, 10]
    assert all(bool((k[1:] > k[:-1]).all()) for k in kept)  # raster order
    feats = _vision_features(model, batch["pixel_values"])
    with torch.no_grad():
        ref, _ = _reference_with_features(
            model, processor, None, PROMPTS, [feats[b, kept[b]] for b in range(2)]
        )
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5


def test_vision_stage_shrinks_vit_and_feeds_llm(tiny, batch):
    model, processor = tiny
    with apply_pruner(model, "_test_vision_stride", budget=7) as h:
        out = logits_of(model, batch)
        assert all(c.vision == [[1 + N_VIS, 1 + N_VIS, 1 + N_VIS // 2]] for c in h.token_counts)
        kept = h.kept_indices
    assert [k.tolist() for k in kept] == [[0, 2, 4, 6, 8, 10, 12]] * 2
    # Independent reference: run the ViT layers by hand with the same shrinking.
    vt = model.model.vision_tower
    with torch.no_grad():
        hs = vt.pre_layrnorm(vt.embeddings(batch["pixel_values"]))
        feat_layer = model.config.vision_feature_layer % (len(vt.encoder.layers) + 1) - 1
        for i in range(feat_layer + 1):
            hs = vt.encoder.layers[i](hs, None)
            if i == 1:
                hs = torch.cat([hs[:, :1], hs[:, 1::2]], dim=1)
            if i == 2:
                hs = hs[:, : 1 + 7]
        ref, _ = _reference_with_features(model, processor, None, PROMPTS, list(hs[:, 1:]))
    assert (out - ref).abs().max() <= 1e-5


def _llm_reference(model, inputs, k_layer: int, keep: torch.Tensor, compact: bool) -> torch.Tensor:
    """Recompute the LLM by hand: layers < K on the full prompt, layers >= K on the kept tokens."""
    from transformers.masking_utils import create_causal_mask

    lm = model.model.language_model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, L = ids.shape
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        emb = lm.embed_tokens(ids)
        img = ids == model.config.image_token_id
        emb = emb.masked_scatter(img[..., None], torch.cat(feats).to(emb.dtype))
        pos = torch.arange(L)[None].expand(B, L)
        full_mask = create_causal_mask(config=lm.config, inputs_embeds=emb, attention_mask=mask,
                                       past_key_values=None, position_ids=pos)
        cos, sin = lm.rotary_emb(emb, position_ids=pos)
        hs = emb
        for i in range(k_layer):
            hs = lm.layers[i](hs, attention_mask=full_mask, position_embeddings=(cos, sin), position_ids=pos)
        start = img.float().argmax(1)
        cols = []
        for b in range(B):
            vis = (start[b] + keep[b]).tolist()
            cols.append([j for j in range(L) if not img[b, j] or j in vis])
        cols = torch.tensor(cols)
        hs = torch.stack([hs[b, cols[b]] for b in range(B)])
        m4 = torch.stack([full_mask[b][:, cols[b]][:, :, cols[b]] for b in range(B)])
        if compact:
            new_pos = torch.arange(cols.shape[1])[None].expand(B, -1) - (L - cols.shape[1]) * 0
            new_pos = torch.stack([torch.tensor([c - sum(1 for j in range(c) if j not in cols[b].tolist())
                                                 for c in cols[b].tolist()]) for b in range(B)])
            cos2, sin2 = lm.rotary_emb(emb, position_ids=new_pos)
            p2 = new_pos
        else:
            cos2, sin2 = cos.expand(B, -1, -1).gather(1, cols[..., None].expand(-1, -1, cos.shape[-1])), None
            sin2 = sin.expand(B, -1, -1).gather(1, cols[..., None].expand(-1, -1, sin.shape[-1]))
            p2 = pos.gather(1, cols)
        for i in range(k_layer, len(lm.layers)):
            hs = lm.layers[i](hs, attention_mask=m4, position_embeddings=(cos2, sin2), position_ids=p2)
        return model.lm_head(lm.norm(hs))


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_llm_stage_equals_recompute_on_kept_tokens(tiny, batch, positions):
    model, _ = tiny
    with apply_pruner(model, "fastv", budget=9, layer=2, positions=positions) as h:
        out = logits_of(model, batch)
        kept = torch.stack(h.kept_indices)
        assert all(c.llm_visual == [N_VIS, N_VIS, 9, 9] for c in h.token_counts)
    ref = _llm_reference(model, batch, 2, kept, compact=positions == "compact")
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5


def test_fastv_keeps_the_most_attended_tokens(tiny, batch):
    """FastV's choice is the top of the last token's head-mean attention at layer K-1 (eager weights)."""
    model, _ = tiny
    with torch.no_grad():
        att = model(**batch, output_attentions=True).attentions[1]  # [B, H, L, L] layer K-1 = 1
    ids = batch["input_ids"]
    start = (ids == model.config.image_token_id).float().argmax(1)
    with apply_pruner(model, "fastv", budget=5, layer=2) as h:
        logits_of(model, batch)
        kept = h.kept_indices
    for b in range(2):
        row = att[b, :, -1, start[b] : start[b] + N_VIS].mean(0)
        assert set(kept[b].tolist()) == set(row.topk(5).indices.tolist())


@pytest.mark.parametrize(
    "method,params,budget",
    [("random", {}, 10), ("fastv", {}, 9), ("fastv", {"positions": "compact"}, 9), ("_test_vision_stride", {}, 7)],
)
def test_batch_of_two_equals_two_batches_of_one(tiny, batch, method, params, budget):
    model, processor = tiny
    with apply_pruner(model, method, budget=budget, **params) as h:
        both = logits_of(model, batch)[:, -1]
        kept_both = [k.clone() for k in h.kept_indices]
        for i in range(2):
            one = logits_of(model, single(processor, i))[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept_both[i])
        gen_both = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
        for i in range(2):
            gen_one = model.generate(**single(processor, i), max_new_tokens=4, do_sample=False)[:, -4:]
            assert torch.equal(gen_one[0], gen_both[i])


@pytest.mark.parametrize("method,budget", [("random", 10), ("fastv", 9), ("_test_vision_stride", 7)])
def test_generate_with_pruned_cache_equals_recompute(tiny, batch, method, budget):
    model, _ = tiny
    steps = 5
    with apply_pruner(model, method, budget=budget) as h:
        gen = model.generate(**batch, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        kept = torch.stack(h.kept_indices)
    cached = torch.stack(gen.logits, 1)  # [B, steps, V]
    if method == "fastv":  # the last token changes every step: recompute with the prefill's kept set
        ref = greedy_recompute(model, batch, steps, "_test_fixed_llm", {"budget": budget, "keep": kept[0]})
        if not torch.equal(kept[0], kept[1]):
            ref1 = greedy_recompute(model, batch, steps, "_test_fixed_llm", {"budget": budget, "keep": kept[1]})
            ref = torch.stack([ref[0], ref1[1]])
    else:
        ref = greedy_recompute(model, batch, steps, method, {"budget": budget})
    assert (cached - ref).abs().max() <= 1e-4


def test_remove_restores_exact_outputs(tiny, batch):
    model, _ = tiny
    ref = logits_of(model, batch)
    for method in ["random", "fastv", "_test_vision_stride"]:
        h = apply_pruner(model, method, budget=5)
        assert logits_of(model, batch).shape != ref.shape
        h.remove()
        assert torch.equal(logits_of(model, batch), ref)
    assert not model._forward_pre_hooks
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_same_seed_same_result(tiny, batch):
    model, _ = tiny
    runs = []
    for seed in (0, 0, 1):
        with apply_pruner(model, "random", budget=6, seed=seed) as h:
            logits_of(model, batch)
            runs.append([k.tolist() for k in h.kept_indices])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_registry_lists_core_methods():
    names = available_pruners()
    assert {"none", "random", "fastv"} <= set(names)


@pytest.mark.parametrize(
    "method,kwargs,err,words",
    [
        ("random", {"budget": 0}, ValueError, ["budget", "positive"]),
        ("random", {"budget": -3}, ValueError, ["budget", "positive"]),
        ("random", {"budget": N_VIS + 1}, ValueError, ["budget", f"1..{N_VIS}"]),
        ("random", {"budget": 2.5}, ValueError, ["budget", "fraction"]),
        ("nonexistent", {"budget": 4}, ValueError, ["unknown method", "fastv", "random"]),
        ("fastv", {"budget": 4, "layer": 0}, ValueError, ["layer", "1..3"]),
        ("fastv", {"budget": 4, "layer": 4}, ValueError, ["layer", "1..3"]),
        ("fastv", {"budget": 4, "depth": 2}, ValueError, ["unknown parameter", "depth", "layer"]),
        ("fastv", {"budget": 4, "positions": "weird"}, ValueError, ["positions", "original", "compact"]),
    ],
)
def test_bad_input_raises_clear_errors(tiny, method, kwargs, err, words):
    model, _ = tiny
    with pytest.raises(err) as exc:
        apply_pruner(model, method, **kwargs)
    for w in words:
        assert w in str(exc.value)
    assert not model._forward_pre_hooks  # nothing left attached


def test_images_of_wrong_token_count_are_refused(tiny):
    model, processor = tiny
    inputs = processor(images=make_images(1), text=["USER: <image> what ? ASSISTANT:"], return_tensors="pt")
    ids = inputs["input_ids"][:, :-3]
    with apply_pruner(model, "random", budget=4), pytest.raises(ValueError, match="placeholder"):
        model(input_ids=torch.cat([ids[:, :5], ids[:, 6:]], 1), pixel_values=inputs["pixel_values"])
