"""What a pre-LLM pruner reads of Qwen's vision blocks (`mllm_adapters/engine/probes.py`), checked
against the tower itself on both tiny Qwen families (images of 8 and 12 merged units; Qwen2.5-VL's
tiny tower has windowed blocks):

- ``vision_attention(layer)`` equals the attention weights the block's own eager attention computes
  (captured from transformers' ``eager_attention_forward``, one call per segment: image or window),
  put in raster unit-major order and pooled to units (query rows averaged, key columns summed);
- ``received_attention`` is its column mean; every row sums to 1; windowed blocks give 0 across windows;
- ``vision_hidden`` equals the block's output in raster order, and its rows regroup into ``features``
  for the last block (the merger's input);
- VFlowOpt's importance on Qwen reads exactly that attention.
"""

from __future__ import annotations

import importlib

import torch

from mllm_adapters import apply_pruner
from mllm_adapters.engine import Engine
from mllm_adapters.handle import PruningHandle
from mllm_adapters.registry import family_for
from mllm_adapters.tiny import TINY_QWEN_IMAGE
from pruners.base import PreLLMDecision, Pruner
from pruners.flowcut_qwen import FlowCutQwen
from pruners.vflowopt import VFlowOpt
from tests.test_qwen_family import enc, logits


class Probe(Pruner):
    """Keeps everything but one token, recording what the context offers of every ViT block."""

    name = "probe_test"
    stages = ("pre_llm",)
    layers: list[int] = []
    seen: list[dict] = []  # shared with the engine's per-image copies

    def vision_probe_layers(self):
        return list(self.layers)

    def prune_pre_llm(self, ctx):
        rec = {"features": ctx.features, "grid": ctx.info.grid_hw, "pixels": ctx.pixel_values}
        for i in self.layers:
            rec[i] = {"att": ctx.vision_attention(i), "recv": ctx.received_attention(i),
                      "hidden": ctx.vision_hidden(i), "qkv": ctx.vision_qkv(i)}
        self.seen.append(rec)
        n = ctx.features.shape[1]
        return PreLLMDecision(keep=torch.arange(n - 1)[None])


def attach(model, pruner):
    pruner_handle = PruningHandle(pruner=pruner)
    engine = Engine(family_for(model)(model), pruner, pruner_handle)
    pruner_handle.adapter = engine
    return pruner_handle


def eager_weights(model, x, monkeypatch):
    """Per vision block, the list of [H, s, s] attention weights its eager attention computed (one per
    segment, the tower's order), and the block outputs."""
    mod = importlib.import_module(type(model).__module__)
    blocks = model.model.visual.blocks
    calls: list = []
    real = mod.eager_attention_forward

    def spy(module, *args, **kwargs):
        out, w = real(module, *args, **kwargs)
        calls.append((module, w[0].detach()))
        return out, w

    monkeypatch.setattr(mod, "eager_attention_forward", spy)
    outputs = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)) for i, b in enumerate(blocks)]
    try:
        logits(model, x)
    finally:
        for h in hooks:
            h.remove()
        monkeypatch.setattr(mod, "eager_attention_forward", real)
    per_block = {i: [w for m, w in calls if m is b.attn] for i, b in enumerate(blocks)}
    return per_block, outputs


def test_probes_match_the_towers_own_attention(qwen, monkeypatch):
    model, processor, _ = qwen
    spec = family_for(model)(model)
    depth = len(model.model.visual.blocks)
    x = enc(qwen, [0, 1])
    weights, outputs = eager_weights(model, x, monkeypatch)
    order = spec._raster_rows(x["image_grid_thw"])  # tower row of each raster row
    n_total = order.numel()
    sizes = x["image_grid_thw"].prod(-1).tolist()
    Probe.layers, Probe.seen = list(range(depth)), []
    probe = Probe(budget=4)
    h = attach(model, probe)
    try:
        logits(model, x)
    finally:
        h.remove()
    assert len(probe.seen) == 2
    windowed = False
    for i in range(depth):
        full = torch.zeros(n_total, n_total)  # the tower's order
        at = 0
        for w in weights[i]:  # [H, s, s], segments in order
            s = w.shape[-1]
            full[at : at + s, at : at + s] = w.float().mean(0)
            at += s
        assert at == n_total
        windowed |= len(weights[i]) > 2
        raster = full[order][:, order]
        out = outputs[i][order]
        start = 0
        for j, rec in enumerate(probe.seen):
            n = sizes[j]
            a = raster[start : start + n, start : start + n]  # [n, n] patches of image j
            units = a.view(n // 4, 4, n // 4, 4).sum(3).mean(1)
            got = rec[i]["att"][0]
            assert got.shape == (n // 4, n // 4)
            assert torch.allclose(got, units, atol=1e-5), (i, j)
            assert torch.allclose(got.sum(-1), torch.ones(n // 4), atol=1e-5)
            assert torch.allclose(rec[i]["recv"][0], got.mean(0))
            assert torch.allclose(rec[i]["hidden"][0], out[start : start + n], atol=1e-6)
            q, k, v = rec[i]["qkv"]
            assert q.shape[:3] == (1, model.config.vision_config.num_heads, n)
            start += n
    if type(spec).__name__ == "Qwen2_5_VLSpec":
        assert windowed, "the tiny Qwen2.5-VL tower should have windowed blocks with several windows"
    for rec in probe.seen:  # the last block's rows regroup into the merger's input
        hid = rec[depth - 1]["hidden"][0]
        assert torch.equal(hid.reshape(rec["features"].shape[1], -1), rec["features"][0])
        uh, uw = rec["grid"]
        assert rec["pixels"].shape[-2:] == (uh * 2 * model.config.vision_config.patch_size,
                                            uw * 2 * model.config.vision_config.patch_size)


def test_image_rgb_rebuilds_the_processors_image(qwen):
    """The [3, H, W] pixels the pruner sees are the normalised image the processor patchified (an image
    already of a valid size, so the processor's resize keeps it as is)."""
    import numpy as np
    from PIL import Image

    model, processor, _ = qwen
    spec = family_for(model)(model)
    p = model.config.vision_config.patch_size
    h, w = 4 * p, 6 * p  # a 2 x 3 unit grid
    arr = np.random.RandomState(1).randint(0, 255, (h, w, 3), dtype=np.uint8)
    x = processor(images=[Image.fromarray(arr)], text=[f"USER: {TINY_QWEN_IMAGE} hi ASSISTANT:"],
                  return_tensors="pt")
    assert x["image_grid_thw"][0].tolist() == [1, 4, 6]
    (rgb,) = spec.image_rgb(dict(x), [])
    ip = processor.image_processor
    ref = (torch.tensor(arr, dtype=torch.float32) / 255.0 - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
    assert rgb.shape == (3, h, w)
    assert torch.allclose(rgb, ref.permute(2, 0, 1), atol=1e-5)


def test_vflowopt_importance_reads_the_unit_attention(qwen):
    """VFlowOpt on Qwen: importance = context relevance over the unit attention + entropy term."""
    model = qwen[0]
    x = enc(qwen, [0])
    vf = VFlowOpt(budget=4, alpha=0.0)
    seen = {}
    real = VFlowOpt.importance

    def spy(self, ctx):
        out = real(self, ctx)
        seen["imp"], seen["att"] = out, ctx.vision_attention(self._vision_layer)
        return out

    h = attach(model, vf)
    try:
        VFlowOpt.importance = spy
        logits(model, x)
    finally:
        VFlowOpt.importance = real
        h.remove()
    a = seen["att"][0]  # [N, N]
    recv = a.mean(0)
    glob = recv > vf.params["t"] * recv.mean()
    ref = a[glob].mean(0) if glob.any() else a.mean(0)
    assert torch.allclose(seen["imp"][0], ref, atol=1e-6)


def test_flowcut_qwen_counts_and_llm_scores(qwen):
    """flowcut_qwen: 2 x budget units reach the LLM, ``budget`` stay after layer 2, and the layer-2 choice
    is the authors' score recomputed from the model's own layer-1 attention weights (eager, over every
    key: restricted to the visual tokens and renormalised = their softmax over the visual keys) and its
    value projection."""
    model = qwen[0]
    x = enc(qwen, [1])  # 12 units
    budget = 3
    seen = {}
    real = FlowCutQwen.prune_llm

    def spy(self, ctx):
        out = real(self, ctx)
        seen.update(vis=ctx.visual_pos.clone(), index=ctx.visual_index.clone(), keep=out.clone())
        return out

    layer1 = model.model.language_model.layers[1].self_attn
    values = {}
    hook = layer1.v_proj.register_forward_hook(lambda m, a, o: values.__setitem__("v", o))
    FlowCutQwen.prune_llm = spy
    try:
        with apply_pruner(model, "flowcut_qwen", budget=budget) as h:
            with torch.no_grad():
                out = model(**x, output_attentions=True)
            kept = h.kept_indices[0]
            counts = h.token_counts[0].llm_visual
    finally:
        FlowCutQwen.prune_llm = real
        hook.remove()
    assert seen["vis"].shape[1] == 2 * budget and kept.numel() == budget
    assert counts[:2] == [2 * budget] * 2 and counts[2:] == [budget] * (len(counts) - 2)
    vis = seen["vis"][0]
    w = out.attentions[1][0, :, -1].float()  # [H, L'] the last token's row at layer 1
    rel = (w[:, vis] / w[:, vis].sum(-1, keepdim=True)).mean(0)
    cfg = model.config.text_config
    hd = cfg.hidden_size // cfg.num_attention_heads
    v = values["v"][0].view(-1, cfg.num_key_value_heads, hd).transpose(0, 1).float()  # [Hkv, L', hd]
    v = v.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, 0)  # [H, L', hd]
    sem = torch.softmax(v[:, -1:] @ v[:, vis].transpose(1, 2) * hd**-0.5, -1).mean(0)[0]
    score = (rel + sem) * v[:, vis].mean(0).abs().sum(-1)
    ref = seen["index"][0][score.topk(budget).indices].sort().values
    assert torch.equal(kept.cpu(), ref.cpu())
