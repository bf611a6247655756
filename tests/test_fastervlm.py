"""`fastervlm`: a declared configuration of `vtc_cls` (`Pruner.configuration`), checked against the
authors' rule recomputed from the model's own attention: the head-mean [CLS] row of the feature layer's
attention (transformers' ``output_attentions``), top-budget patches in raster order."""

from __future__ import annotations

import pytest
import torch

from mllm_adapters import apply_pruner
from mllm_adapters.tiny import build_tiny_llava
from pruners import get_pruner_class
from tests._adapter_helpers import ProjectorInputs


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    import numpy as np
    from PIL import Image

    model, processor = build_tiny_llava(seed=0)
    rng = np.random.RandomState(0)
    imgs = [Image.fromarray(rng.randint(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(2)]
    x = processor(images=imgs, text=["USER: <image> what is it ? ASSISTANT:"] * 2, return_tensors="pt", padding=True)
    return model, x


def test_fastervlm_is_the_cls_row_of_the_feature_layer(tiny):
    model, x = tiny
    budget = 9
    with torch.no_grad():
        out = model.model.vision_tower(x["pixel_values"], output_attentions=True, output_hidden_states=True)
    layer = model.config.vision_feature_layer  # -2
    cls_row = out.attentions[layer][:, :, 0, 1:].mean(1)  # [B, N] head mean
    want = cls_row.topk(budget, dim=1).indices.sort(dim=1).values
    feats = out.hidden_states[layer][:, 1:]
    with ProjectorInputs(model) as cap, apply_pruner(model, "fastervlm", budget=budget) as h:
        with torch.no_grad():
            model(**x)
        kept = torch.stack(h.kept_indices)
        assert h.pruner.params == {"start_layer": -2, "ensemble": "sum"}  # recorded like any parameter
    assert torch.equal(kept, want)
    assert torch.allclose(cap.calls[-1], feats.gather(1, want[..., None].expand(-1, -1, feats.shape[-1])), atol=1e-6)
    with apply_pruner(model, "vtc_cls", budget=budget, start_layer=-2) as h:
        with torch.no_grad():
            model(**x)
        assert torch.equal(torch.stack(h.kept_indices), kept)


def test_a_configuration_fixes_its_parameters():
    cls = get_pruner_class("fastervlm")
    assert issubclass(cls, get_pruner_class("vtc_cls")) and cls.parameters == {}
    with pytest.raises(ValueError, match="'start_layer' of method 'fastervlm' is fixed to -2"):
        cls(budget=4, start_layer=3)
    assert cls(budget=4, start_layer=-2).params["start_layer"] == -2  # copies pass it back: accepted
    with pytest.raises(ValueError, match="unknown parameter"):
        cls(budget=4, alpha=1)
