"""`visionzip` against the authors' own code (visionzip 0.1.3 from PyPI, `tests/_authors.py`), at their
published splits 64 = 54 + 10, 128 = 108 + 20 and 192 = 162 + 30.

The tower is a tiny-width CLIP with LLaVA-1.5's grid (336 px, patch 14: 24 x 24 = 576 patches + CLS),
4 layers, LLaVA's feature layer -2. The authors' side: their patched ``CLIPAttention_forward``
(`visionzip/utils.py`) run on our tower's layer -2 gives the key metric, and their
``CLIPVisionTower_VisionZip.forward`` (`visionzip/clip_encoder.py`) runs on our tower's outputs, in
fp32. Our side: `apply_pruner(model, "visionzip", budget)` on the LLaVA model holding that tower; the
tokens the projector receives are compared with theirs, in order (CLS, dominant patches in raster
order, contextual tokens), max abs diff <= 1e-4, and the kept patches with their indices.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_adapters import apply_pruner
from mllm_adapters.tiny import build_tiny_llava
from tests._adapter_helpers import ProjectorInputs
from tests._authors import authors_module, clip_shape_shim

SPLITS = [(64, 54, 10), (128, 108, 20), (192, 162, 30)]


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model, processor = build_tiny_llava(seed=0, image_size=336, patch_size=14)
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(2)]
    x = processor(images=images, text=["USER: <image> what is it ? ASSISTANT:"] * 2, return_tensors="pt",
                  padding=True)
    return model, x


def authors_tokens(model, pixel_values: torch.Tensor, dominant: int, contextual: int):
    """(tokens [B, dominant + contextual, Dv], all_indices [B, dominant]) from the authors' functions."""
    utils = authors_module("visionzip", "utils")
    clip_encoder = authors_module("visionzip", "clip_encoder")
    tower = model.model.vision_tower  # CLIPVisionModel
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
        layer = tower.encoder.layers[-2]
        clip_shape_shim(layer.self_attn)
        # their attention on layer -2's input (after its layer norm) returns the head-mean raw keys
        _, _, metric = utils.CLIPAttention_forward(layer.self_attn, layer.layer_norm1(out.hidden_states[-3]))
    layer.metric = metric

    class Tower:  # LLaVA's vision_tower as their forward reads it (4.x layout: .vision_model.encoder)
        vision_model = SimpleNamespace(encoder=tower.encoder)
        _info = {"dominant": dominant - 1, "contextual": contextual}  # what their apply_info stores

        def __call__(self, images, **kw):
            return tower(images, **kw)

    fake = SimpleNamespace(vision_tower=Tower(), device=pixel_values.device, dtype=pixel_values.dtype)
    try:
        tokens, all_indices = clip_encoder.CLIPVisionTower_VisionZip.forward(fake, pixel_values)
    finally:
        del layer.metric, layer.self_attn._shape
    return tokens, all_indices


@pytest.mark.parametrize(("budget", "dominant", "contextual"), SPLITS)
def test_visionzip_equals_the_authors_code(setup, budget, dominant, contextual):
    model, x = setup
    theirs, all_indices = authors_tokens(model, x["pixel_values"], dominant, contextual)
    assert theirs.shape[1] == budget
    with ProjectorInputs(model) as cap, apply_pruner(model, "visionzip", budget=budget) as h:
        with torch.no_grad():
            model(**x)
        ours = cap.calls[-1].detach()
        kept = [k.clone() for k in h.kept_indices]
        assert h.info["visionzip_split"] == [dominant, contextual]
    assert ours.shape == theirs.shape
    for b in range(2):
        their_patches = (all_indices[b, 1:] - 1).sort().values  # index 0 is CLS
        assert torch.equal(kept[b], their_patches)
    assert (ours - theirs).abs().max() <= 1e-4
