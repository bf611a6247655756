"""DART (`pruners/dart.py`): the pivot / duplication selection on hand-made tensors against an
independent transcription of the authors' procedure (ZichenWen1/DART, ``get_retained_image_token``),
the kept set on the tiny LLaVA against the rule recomputed from the model's own layer outputs
(forward hooks on the unhooked model), the batch contract (`keep_top`, fillers) and batch = singles on
the tiny LLaVA-NeXT and Qwen with images of different sizes."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mllm_adapters import apply_pruner
from mllm_adapters.tiny import TINY_QWEN_IMAGE, build_tiny_llava_next
from pruners import available_pruners, get_pruner_class
from pruners.base import LLMLayerContext, ModelInfo
from pruners.dart import DART, dart_selection, dart_shares, key_l1, pivot_visit_order
from tests.conftest import random_images, single


# ---- the authors' procedure, transcribed independently (batch of one, absolute positions) -----------
def authors_procedure(k_norm: torch.Tensor, hidden: torch.Tensor, start: int, length: int, token_topk: int,
                      pivot_image: int = 4, pivot_text: int = 4) -> set[int]:
    """What ``get_retained_image_token`` returns, as a set of sequence positions.

    k_norm [L]: each token's key L1 norm; hidden [L, D]: the states the similarity is taken on; the
    image is positions start .. start + length - 1, the text every position after it. Their loop:
    pivots = top image + top text norms; for each pivot in ``list(set(...))`` order, the
    ``token_topk`` most negative cosines among the still-valid image tokens join the set and leave the
    pool; text pivots are dropped at the end."""
    img = (k_norm[start:start + length].topk(pivot_image).indices + start).tolist()
    txt = (k_norm[start + length:].topk(pivot_text).indices + start + length).tolist()
    chosen = set(img + txt)
    pool = set(range(start, start + length)) - set(img)
    for p in list(chosen):
        cand = sorted(pool)
        neg = -torch.nn.functional.cosine_similarity(hidden[p][None], hidden[cand], dim=-1)
        got = [cand[i] for i in neg.topk(token_topk).indices.tolist()]
        chosen.update(got)
        pool -= set(got)
    return chosen - set(txt)


def _random_case(seed: int, n: int = 40, m: int = 9, d: int = 16, start: int = 5):
    g = torch.Generator().manual_seed(seed)
    L = start + n + m
    return torch.rand(L, generator=g) * 10, torch.randn(L, d, generator=g), start, n


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("token_topk", [1, 2, 4])
def test_selection_equals_the_authors_procedure(seed, token_topk):
    """At their count (4 image pivots + 8 x TOKEN_TOPK picks) the kept set is theirs, visit order
    included (pivots with the same least-similar tokens compete)."""
    norm, hidden, start, n = _random_case(seed)
    count = 4 + 8 * token_topk
    want = {p - start for p in authors_procedure(norm, hidden, start, n, token_topk)}
    got = dart_selection(norm[start:start + n], hidden[start:start + n], norm[start + n:], hidden[start + n:],
                         count, 4, 4, list(range(start, start + n)), list(range(start + n, len(norm))))
    assert len(got) == count == len(set(got))
    assert set(got) == want


def test_duplicates_go_to_the_pivot_visited_first_in_set_order():
    """Two pivots (one image, one text), one pick each, the same least-similar token X for both: the
    pivot the authors' ``list(set(...))`` visits first takes X, the other its second choice."""
    e = torch.eye(4)
    # image tokens: 0 = pivot (largest norm), 1 = X (opposite to both pivots), 2, 3
    image_hidden = torch.stack([e[0], -(e[0] + e[1]), e[2] - 0.5 * e[0], e[3] - 0.4 * e[1]])
    image_norm = torch.tensor([9.0, 1.0, 1.0, 1.0])
    text_hidden, text_norm = e[1][None], torch.tensor([5.0])

    def kept(image_at: int, text_at: int) -> set[int]:
        return set(dart_selection(image_norm, image_hidden, text_norm, text_hidden, 3, 1, 1,
                                  [image_at + i for i in range(4)], [text_at]))

    # a small set iterates by value modulo its table size (8): {40, 3} as [40, 3] (slots 0, 3) ...
    assert pivot_visit_order([40], [3]) == list({40, 3}) == [40, 3]
    assert kept(40, 3) == {0, 1, 3}  # image pivot first: takes X = 1; the text pivot then takes 3
    # ... and {5, 10} as [10, 5] (slots 2, 5): the text pivot first although inserted second
    assert pivot_visit_order([5], [10]) == list({5, 10}) == [10, 5]
    assert kept(5, 10) == {0, 1, 2}  # text pivot first: takes X = 1; the image pivot then takes 2


def test_shares_and_counts():
    assert dart_shares(132, 4, 8) == [16] * 8  # the authors' "128" run
    assert dart_shares(128, 4, 8) == [16] * 4 + [15] * 4
    assert dart_shares(12, 4, 8) == [1] * 8
    assert dart_shares(4, 4, 8) == [0] * 8
    norm, hidden, start, n = _random_case(0)
    args = (norm[start:start + n], hidden[start:start + n], norm[start + n:], hidden[start + n:])
    for count in (1, 3, 4, 5, 11, 17, 39):
        got = dart_selection(*args, count, 4, 4)
        assert len(got) == len(set(got)) == count
        top = norm[start:start + n].argsort(descending=True)[: min(4, count)].tolist()
        assert got[: len(top)] == top  # image pivots first, by descending norm
    assert dart_selection(*args, n, 4, 4) == list(range(n))
    assert dart_selection(*args, n + 5, 4, 4) == list(range(n))
    # no text after the image: image pivots only share the picks
    got = dart_selection(args[0], args[1], norm[:0], hidden[:0], 10, 4, 4)
    assert len(set(got)) == 10


def test_key_norms():
    """'rotated' is the plain L1 of the RoPE'd key; 'rope_invariant' is the same at every position
    (Llama's rotary at positions p and p + 7 give the same value) and is each rotate_half pair's
    length, summed."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    g = torch.Generator().manual_seed(0)
    B, H, L, hd = 2, 3, 5, 8
    raw = torch.randn(B, H, L, hd, generator=g)
    rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=H * hd, num_attention_heads=H, head_dim=hd))
    pos = torch.arange(L)[None].expand(B, L)
    rot = [apply_rotary_pos_emb(raw, raw, *rope(raw, pos + s))[1] for s in (0, 7)]
    assert torch.allclose(key_l1(rot[0], "rotated"), rot[0].abs().sum((1, 3)))
    assert not torch.allclose(key_l1(rot[0], "rotated"), key_l1(rot[1], "rotated"))
    inv = [key_l1(r, "rope_invariant") for r in rot]
    assert torch.allclose(inv[0], inv[1], atol=1e-5)
    pairs = torch.complex(raw[..., : hd // 2], raw[..., hd // 2:]).abs().sum((1, 3))
    assert torch.allclose(inv[0], pairs, atol=1e-5)


# ---- the batch contract on a hand-made context ---------------------------------------------------------
def _info(n: int = 6) -> ModelInfo:
    return ModelInfo(family="llava", num_visual_tokens=n, grid_hw=(2, 3), has_cls=True, vision_num_layers=2,
                     vision_feature_layer=1, vision_num_heads=1, llm_num_layers=4, llm_hidden_size=8)


def test_keep_counts_and_fillers_on_a_hand_made_context():
    """Sample 0 keeps 5 of 6 real visual tokens, sample 1 keeps 2 of its 4 real ones (slots 4, 5 are
    inert): [B, 5] indices, each sample's first keep_counts[b] its DART picks, the rest fillers; no
    inert slot is ever a pick."""
    g = torch.Generator().manual_seed(1)
    B, L, D, hd = 2, 10, 8, 4
    hs = torch.randn(B, L, D, generator=g)
    k = torch.randn(B, 2, L, hd, generator=g)
    vis = torch.arange(1, 7)[None].expand(B, -1)  # visual slots at positions 1..6
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, 5:7] = False  # sample 1: its last two visual slots are inert
    instr = torch.arange(7, 10)[None].expand(B, -1)
    p = DART(budget=5, pivot_image_tokens=1, pivot_text_tokens=2)
    p.attach(_info())
    ctx = LLMLayerContext(layer=2, hidden_states=hs, visual_pos=vis, visual_index=torch.arange(6)[None].expand(B, -1),
                          key_mask=key_mask, instruction_pos=instr, info=p.info, state={}, attention_rows=None,
                          generators=[], layer_qkv=lambda layer, queries="last": (None, k, None),
                          keep_counts=torch.tensor([5, 2]))
    keep = p.prune_llm(ctx)
    assert keep.shape == (2, 5)
    norm = key_l1(k)
    own = key_mask.long().cumsum(1) - 1  # each sample's own numbering: sample 1's text starts at 5, not 7
    for b, (c, n_real) in enumerate([(5, 6), (2, 4)]):
        pos = vis[b, :n_real]
        want = dart_selection(norm[b, pos], hs[b, pos], norm[b, instr[b]], hs[b, instr[b]], c, 1, 2,
                              own[b, pos].tolist(), own[b, instr[b]].tolist())
        assert keep[b, :c].tolist() == want
        assert not bool(ctx.fillers[b, keep[b, :c]].any())
        assert int(ctx.fillers[b].sum()) == 5 - c and bool(ctx.fillers[b, keep[b, c:]].all())
    assert set(keep[1, :2].tolist()) <= {0, 1, 2, 3}


def test_parameters():
    assert "dart" in available_pruners()
    cls = get_pruner_class("dart")
    assert cls.defaults == {"layer": 2, "pivot_image_tokens": 4, "pivot_text_tokens": 4,
                            "key_norm": "rope_invariant", "positions": "original"}
    for params, word in [({"pivot_image_tokens": 0}, "pivot_image_tokens"), ({"pivot_text_tokens": -1},
                         "pivot_text_tokens"), ({"key_norm": "l2"}, "key_norm"), ({"positions": "x"}, "positions")]:
        with pytest.raises(ValueError, match=word):
            cls(budget=8, **params)
    with pytest.raises(ValueError, match=r"layer=4 .*1\.\.3"):
        cls(budget=4, layer=4).attach(_info())


# ---- tiny LLaVA: the rule recomputed from the model's own layer outputs ----------------------------------
N_VIS = 36


def _layer_signals(model, inputs, K: int = 2):
    """(rotated keys [B, H, L, hd] of layer K-1 as its attention computed them, input of layer K [B, L, D])
    captured with forward hooks on the unhooked model."""
    layers = model.model.language_model.layers
    cap = {}

    def attn_hook(module, args, kwargs):
        x = kwargs["hidden_states"]
        B, L, _ = x.shape
        k = module.k_proj(x).view(B, L, -1, module.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        cap["k"] = apply_rotary_pos_emb(k, k, cos, sin)[1]

    def layer_hook(module, args, kwargs):
        cap["h"] = args[0] if args else kwargs["hidden_states"]

    hooks = [layers[K - 1].self_attn.register_forward_pre_hook(attn_hook, with_kwargs=True),
             layers[K].register_forward_pre_hook(layer_hook, with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return cap["k"], cap["h"]


def _rule(model, inputs, key_norm: str, token_topk: int) -> list[list[int]]:
    """Per sample, the authors' procedure on its own (unpadded) sequence, from the hooked signals."""
    k, h = _layer_signals(model, inputs)
    with torch.no_grad():
        h = model.model.language_model.norm(h)  # the authors compare norm(h), the LLM's final RMSNorm
    if key_norm == "rotated":
        norm = k.abs().sum((1, 3))
    else:
        hd = k.shape[-1]
        norm = torch.complex(k[..., : hd // 2], k[..., hd // 2:]).abs().sum((1, 3))
    out = []
    for b in range(k.shape[0]):
        real = inputs["attention_mask"][b].bool()
        ids = inputs["input_ids"][b][real]
        start = int((ids == model.config.image_token_id).nonzero()[0])
        kept = authors_procedure(norm[b][real], h[b][real], start, N_VIS, token_topk)
        out.append(sorted(p - start for p in kept))
    return out


@pytest.mark.parametrize("key_norm", ["rope_invariant", "rotated"])
@pytest.mark.parametrize("token_topk", [1, 2])
def test_tiny_llava_kept_set_is_the_rule_on_the_model_signals(tiny, batch, key_norm, token_topk):
    model, processor = tiny
    budget = 4 + 8 * token_topk  # the authors' count for max_num_trunction = 8 x token_topk
    inputs = [batch] + [single(processor, i) for i in range(2)]
    norm = model.model.language_model.norm.weight
    saved = norm.detach().clone()
    with torch.no_grad():  # a non-uniform gain, so the final norm changes the cosine (all-ones would not)
        norm.copy_(torch.linspace(0.2, 3.0, norm.numel()))
    try:
        rules = [_rule(model, x, key_norm, token_topk) for x in inputs]  # unpruned model
        with apply_pruner(model, "dart", budget=budget, key_norm=key_norm) as h:
            for x, rule in zip(inputs, rules):
                with torch.no_grad():
                    model(**x)
                assert [k.tolist() for k in h.kept_indices] == rule
                assert h.kept_by_layer.keys() == {2}
                assert all(c.llm_visual == [N_VIS, N_VIS, budget, budget] for c in h.token_counts)
    finally:
        with torch.no_grad():
            norm.copy_(saved)


def test_tiny_llava_singles_are_the_authors_rotated_norm(tiny):
    """Alone (positions 0..L-1, as in the authors' batch of one) the rotated keys are the authors' own."""
    model, processor = tiny
    x = single(processor, 0)
    assert torch.equal(x["attention_mask"], torch.ones_like(x["attention_mask"]))
    rule = _rule(model, x, "rotated", 1)[0]
    with apply_pruner(model, "dart", budget=12, key_norm="rotated") as h:
        with torch.no_grad():
            model(**x)
        assert h.kept_indices[0].tolist() == rule


# ---- batch of two = singles, images of different sizes -------------------------------------------------
def _images(sizes, seed: int = 0) -> list[Image.Image]:
    return random_images(sizes, seed)


PROMPT_TEXT = ["USER: {} what is the colour of the circle ? ASSISTANT:", "USER: {} how many ? ASSISTANT:"]


@pytest.fixture(scope="module")
def tiny_next():
    torch.set_num_threads(1)
    model, processor = build_tiny_llava_next(seed=0)
    return model, processor, _images([(40, 60), (30, 80)])


def _check_batch_equals_singles(model, enc, budget: int, **params) -> None:
    with apply_pruner(model, "dart", budget=budget, **params) as h:
        x = enc([0, 1])
        with torch.no_grad():
            both = model(**x).logits[:, -1]
        kept = [k.clone() for k in h.kept_indices]
        assert [len(k) for k in kept] == [budget, budget]
        gen = model.generate(**x, max_new_tokens=3, do_sample=False)[:, -3:]
        for i in range(2):
            one = enc([i])
            with torch.no_grad():
                assert (model(**one).logits[0, -1] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept[i])
            assert torch.equal(model.generate(**one, max_new_tokens=3, do_sample=False)[0, -3:], gen[i])


def test_llava_next_batch_equals_singles(tiny_next):
    model, processor, images = tiny_next

    def enc(idx):
        return processor(images=[images[i] for i in idx], text=[PROMPT_TEXT[i].format("<image>") for i in idx],
                         return_tensors="pt", padding=True)

    runs = (enc([0, 1])["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert runs[0] != runs[1]
    _check_batch_equals_singles(model, enc, budget=min(runs) // 3)


def test_llava_next_rotated_norm_is_batch_safe_in_generate(tiny_next):
    """generate() numbers each sample's tokens from its mask, so the authors' rotated norm gives a batch
    its samples' kept sets and first-step logits (forward() on a left-padded batch does not: padding
    shifts the positions the keys are rotated to)."""
    model, processor, images = tiny_next

    def enc(idx):
        return processor(images=[images[i] for i in idx], text=[PROMPT_TEXT[i].format("<image>") for i in idx],
                         return_tensors="pt", padding=True)

    def first_step(x):
        out = model.generate(**x, max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True)
        return out.logits[0]

    with apply_pruner(model, "dart", budget=12, key_norm="rotated") as h:
        both = first_step(enc([0, 1]))
        kept = [k.clone() for k in h.kept_indices]
        for i in range(2):
            one = first_step(enc([i]))
            assert torch.equal(h.kept_indices[0], kept[i])
            assert (one[0] - both[i]).abs().max() <= 1e-4


def test_qwen_batch_equals_singles(qwen):
    model, processor, images = qwen

    def enc(idx):
        return processor(images=[images[i] for i in idx], text=[PROMPT_TEXT[i].format(TINY_QWEN_IMAGE) for i in idx],
                         return_tensors="pt", padding=True)

    _check_batch_equals_singles(model, enc, budget=6)
    # Qwen numbers each sample's tokens from its own mask (M-RoPE): the authors' rotated norm is batch-safe too
    _check_batch_equals_singles(model, enc, budget=6, key_norm="rotated")


def test_authors_count_reproduced_by_budget():
    """Their ``--max_num_trunction 128`` keeps 4 + 8 x (128 // 8) = 132 tokens: budget=132 here gives
    every pivot the same 16 picks."""
    assert 4 + 8 * math.ceil(128 // 8) == 132
    assert dart_shares(132, 4, 8) == [128 // 8] * 8
