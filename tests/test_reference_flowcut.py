"""`flowcut` against the authors' own code (flowcut 1.0.2 from PyPI, `tests/_authors.py`), LLaVA-1.5 path.

The tower is a tiny-width CLIP with LLaVA-1.5's grid (336 px, patch 14: 24 x 24 = 576 patches + CLS) and
LLaVA's feature layer -2, with 4 layers (one prune, at rpl = 0, straight to the budget) and with 12
layers (rpl = 9..0: four entropy-adaptive prunes at rpl = 8, 6, 4, 2, then the cut to the budget).

The authors' side, in fp32 on our tower's own module instances: their ``CLIPAttention_forward``,
``CLIPEncoderLayer_forward`` and ``CLIPEncoder_forward`` (`flowcut/modeling_clip_flowcut.py`) are
given to our attention / layer / encoder instances as their ``forward`` (instance attributes, removed
afterwards; transformers' classes are not touched), their ``apply_flowcut_config`` sets ``target`` =
budget + 1 (their `main.py` for 'pad' with select_feature 'patch') and ``select_layer`` = layers - 2,
and their ``CLIPVisionTower_FlowCut.forward`` (`flowcut/clip_encoder.py`) runs their
``CLIPVisionTransformer_forward`` on our ``CLIPVisionModel``, with LLaVA's own ``feature_select``
(``hidden_states[-2][:, 1:]``). One image at a time: with a batch they apply the largest cut of the
batch to every image. Their encoder runs every layer (the last on the pruned tokens) and the LLM sees
the input of the last layer (= output of layer F = layers - 2); their final prune is after layer F - 1
(rpl = F - i - 1 = 0), as ours. Their returned keep indices are 0-based patch raster indices (their
first gather, into an arange that includes CLS, with patch-relative indices, drops CLS).

Our side: `apply_pruner(model, "flowcut", budget)` on the LLaVA model holding that tower, both images in
one batch (our batch gives each image its own schedule, as their batch size 1). Compared per image: the
kept patch indices (``handle.kept_indices``), the tokens entering each ViT layer up to the feature
layer (``handle.token_counts``) and the tokens the projector receives, max abs diff <= 1e-4.

Found by this test (fixed in flowcut version 2): FlowCut's semantic score is, per head, the softmax of
v_CLS . v_j over ALL tokens, the CLS key included (their ``softmax(bmm(cls_value, value_states^T))``
over ``src_len``), head-averaged, then the patch columns renormalised. Version 1 took the softmax over
the patches only; since each head's CLS share differs (0.10 to 0.91 on this tower's layer 0), the
scores differed by up to 159% and the kept sets by up to 13 of 192 patches.
"""

from __future__ import annotations

from types import MethodType, SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_adapters import apply_pruner
from mllm_adapters.tiny import build_tiny_llava
from tests._adapter_helpers import ProjectorInputs
from tests._authors import authors_module, clip_shape_shim

BUDGETS = [64, 128, 192]
LAYERS = [4, 12]
_models: dict[int, tuple] = {}
_theirs: dict[tuple[int, int], list] = {}


def tiny_model(layers: int):
    """(model, processor inputs of two 336 px images) with a ``layers``-layer CLIP tower."""
    if layers not in _models:
        torch.set_num_threads(1)
        model, processor = build_tiny_llava(seed=0, image_size=336, patch_size=14, vision_layers=layers)
        rng = np.random.RandomState(0)
        images = [Image.fromarray(rng.randint(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(2)]
        x = processor(images=images, text=["USER: <image> what is it ? ASSISTANT:"] * 2, return_tensors="pt",
                      padding=True)
        _models[layers] = model, x
    return _models[layers]


def authors_tower(model, pixel_values: torch.Tensor, budget: int):
    """(features [B, budget, Dv], keep_indices [B, budget], tokens entering each layer) from the authors'
    functions on our tower's instances (B = 1: they cut every image of a batch by the batch's max)."""
    modeling = authors_module("flowcut", "modeling_clip_flowcut")
    clip_encoder = authors_module("flowcut", "clip_encoder")
    tower = model.model.vision_tower  # CLIPVisionModel (4.x's CLIPVisionTransformer merged into it)
    encoder = tower.encoder
    given: list[tuple[object, str]] = []

    def give(obj, name: str, value) -> None:
        setattr(obj, name, value)  # an instance attribute: transformers' classes stay as they are
        given.append((obj, name))

    outputs = []

    def feature_select(out):  # LLaVA's CLIPVisionTower.feature_select: select_layer -2, 'patch'
        outputs.append(out)
        return out.hidden_states[model.config.vision_feature_layer][:, 1:]

    try:
        for layer in encoder.layers:
            clip_shape_shim(layer.self_attn)
            given.append((layer.self_attn, "_shape"))
            give(layer.self_attn, "forward", MethodType(modeling.CLIPAttention_forward, layer.self_attn))
            give(layer, "forward", MethodType(modeling.CLIPEncoderLayer_forward, layer))
        give(encoder, "forward", MethodType(modeling.CLIPEncoder_forward, encoder))
        given += [(encoder, "target"), (encoder, "select_layer")]
        modeling.apply_flowcut_config(SimpleNamespace(vision_model=tower), target_tokens=budget + 1)
        assert encoder.select_layer == model.config.vision_feature_layer % len(encoder.layers)
        fake = SimpleNamespace(vision_tower=MethodType(modeling.CLIPVisionTransformer_forward, tower),
                               device=pixel_values.device, dtype=pixel_values.dtype,
                               feature_select=feature_select)
        features, keep = clip_encoder.CLIPVisionTower_FlowCut.forward(fake, pixel_values)
    finally:
        for obj, name in reversed(given):
            if name in vars(obj):
                delattr(obj, name)
    counts = [h.shape[1] for h in outputs[-1].hidden_states]  # [i]: tokens entering layer i
    return features, keep, counts


def theirs(layers: int, budget: int) -> list:
    """Per image: the authors' (features [budget, Dv], keep indices [budget], counts per layer)."""
    if (layers, budget) not in _theirs:
        model, x = tiny_model(layers)
        runs = [authors_tower(model, x["pixel_values"][b : b + 1], budget) for b in range(2)]
        _theirs[layers, budget] = [(f[0], k[0], c) for f, k, c in runs]
    return _theirs[layers, budget]


def compare(layers: int, budget: int) -> None:
    model, x = tiny_model(layers)
    with ProjectorInputs(model) as cap, apply_pruner(model, "flowcut", budget=budget) as h:
        with torch.no_grad():
            model(**x)
        ours = cap.calls[-1].detach()
        kept = [k.clone() for k in h.kept_indices]
        counts = [h.token_counts[b].vision for b in range(2)]
    F = model.config.vision_feature_layer % layers
    assert ours.shape == (2, budget, model.config.vision_config.hidden_size)
    for b, (their_features, their_keep, their_counts) in enumerate(theirs(layers, budget)):
        assert torch.equal(kept[b], their_keep), f"image {b}: kept patches differ"
        assert counts[b] == [their_counts[: F + 1]], f"image {b}: tokens per ViT layer differ"
        assert (ours[b] - their_features).abs().max() <= 1e-4, f"image {b}: features differ"


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_flowcut_equals_the_authors_code(layers, budget):
    compare(layers, budget)
