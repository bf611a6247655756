"""The lean scoring path of in-LLM attention scores (`LLMStage._rope_qk`, docs/engine.md "Scoring"):
query rows projected and rotated alone, keys read from the KV cache the layer just wrote (generate),
else rotated once; the same scores bitwise; and what it allocates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mllm_adapters
from benchmarks.perf.memory import LiveTensorBytes
from mllm_adapters import apply_pruner
from mllm_adapters.engine.llm import LLMStage
from mllm_adapters.registry import get_family
from tests.test_conformance import PROMPTS, SIZES, family_prompts

FAMILIES = mllm_adapters.available_families()


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    torch.set_num_threads(1)
    cls = get_family(request.param)
    model, processor = cls.build_tiny(seed=0, attn_implementation="eager")
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 255, (h, w, 3), dtype=np.uint8))
              for i, (h, w) in enumerate(SIZES)]
    inputs = processor(images=images, text=family_prompts(cls, PROMPTS), return_tensors="pt", padding=True)
    return request.param, model, inputs


def test_rotate_is_apply_rope_bitwise(fam):
    """`FamilySpec.rotate` (one tensor) equals the first output of `apply_rope` bitwise, on every family."""
    name, model, _ = fam
    with apply_pruner(model, "fastv", budget=4) as h:
        spec = h.adapter.spec
        g = torch.Generator().manual_seed(0)
        t = torch.randn(2, 3, 7, 16, generator=g)
        cos, sin = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
        assert torch.equal(spec.rotate(t, cos, sin), spec.apply_rope(t, t, cos, sin)[0]), name


class _Spy:
    """Counts `_rotate_keys` calls and records the peak extra tensor memory of each scoring call."""

    def __init__(self, monkeypatch):
        self.rotations = 0
        self.peaks: list[int] = []
        self.lengths: list[int] = []  # the scored layer's sequence length (Lc)
        self.largest: list[int] = []  # the largest tensor each scoring call allocated
        rotate, rows = LLMStage._rotate_keys, LLMStage._llm_attention_rows
        spy = self

        def counted(stage, k, cos, sin):
            spy.rotations += 1
            return rotate(stage, k, cos, sin)

        def measured(stage, layer_idx, queries, hidden_states):
            fw = stage._fw
            x, (cos, sin) = fw.attn_inputs[layer_idx]
            cache = fw.attn_caches.get(layer_idx)
            cached = [cache.layers[layer_idx].keys] if cache is not None and len(cache.layers) > layer_idx else []
            weights = tuple(stage.spec.text_attention(layer_idx).module.parameters())
            existing = (x, cos, sin, fw.attn_keys.get(layer_idx), *cached, *weights)  # there anyway
            with LiveTensorBytes(existing) as m:
                out = rows(stage, layer_idx, queries, hidden_states)
            spy.peaks.append(m.peak_bytes)
            spy.largest.append(m.largest_tensor_bytes)
            spy.lengths.append(int(stage._fw.attn_inputs[layer_idx][0].shape[1]))
            return out

        monkeypatch.setattr(LLMStage, "_rotate_keys", counted)
        monkeypatch.setattr(LLMStage, "_llm_attention_rows", measured)


def test_generate_scores_from_the_cache_and_equals_the_uncached_forward(fam, monkeypatch):
    """In generate() (KV cache on) FastV's row reads layer K-1's rotated keys from the cache: no key is
    rotated, and the kept set is the one a forward without cache (keys rotated once) gives."""
    name, model, inputs = fam
    spy = _Spy(monkeypatch)
    with apply_pruner(model, "fastv", budget=4, layer=1) as h:
        with torch.no_grad():
            model(**inputs, use_cache=False)
        uncached = [k.clone() for k in h.kept_indices]
        assert spy.rotations == 1, name  # one key rotation for the one scored layer
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert spy.rotations == 1, f"{name}: generate's prefill rotated keys instead of reading the cache"
        assert all(torch.equal(a, b) for a, b in zip(uncached, h.kept_indices)), name


def test_scoring_memory_is_rows_not_keys_with_a_cache(fam, monkeypatch):
    """With the cache the scoring step allocates no key-sized tensor: its peak is O(H x N), a few times
    the [B, Hq, 1, Lc] row; without one it is about one rotated key tensor [B, Hkv, Lc, hd]."""
    name, model, inputs = fam
    spy = _Spy(monkeypatch)
    cfg = model.config.text_config
    B = inputs["input_ids"].shape[0]
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    with apply_pruner(model, "fastv", budget=4, layer=1):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            cached, cached_largest = spy.peaks[-1], spy.largest[-1]
            model(**inputs, use_cache=False)
            uncached, uncached_largest = spy.peaks[-1], spy.largest[-1]
            monkeypatch.setattr(LLMStage, "ROPE_CHUNK", 4)  # what a long prompt gets: RoPE per chunk
            model(**inputs, use_cache=False)
            chunked = spy.peaks[-1]
    Lc = spy.lengths[-1]
    row_bytes = B * cfg.num_attention_heads * Lc * 4
    key_bytes = B * cfg.num_key_value_heads * Lc * hd * 4
    # with the cache no key-sized tensor is allocated; without, the rotated keys are
    assert cached_largest < key_bytes <= uncached_largest, (name, cached_largest, uncached_largest, key_bytes)
    assert cached <= uncached, (name, cached, uncached)
    # chunked: one rotated key tensor plus the chunk's temporaries, on top of the cached path's rows
    assert chunked <= cached + key_bytes + key_bytes // 4, (name, cached, chunked, key_bytes)
    assert cached <= 8 * row_bytes + 8192, (name, cached, row_bytes)  # O(H x N) plus constants


def test_long_keys_are_rotated_in_chunks_bitwise(fam, monkeypatch):
    """Keys longer than `LLMStage.ROPE_CHUNK` are rotated chunk by chunk into one tensor: same bits."""
    name, model, inputs = fam
    with apply_pruner(model, "fastv", budget=4, layer=1) as h:
        with torch.no_grad():
            model(**inputs, use_cache=False)
        whole = [k.clone() for k in h.kept_indices]
        monkeypatch.setattr(LLMStage, "ROPE_CHUNK", 5)
        with torch.no_grad():
            model(**inputs, use_cache=False)
        assert all(torch.equal(a, b) for a, b in zip(whole, h.kept_indices)), name
        stage = h.adapter
        g = torch.Generator().manual_seed(1)
        k = torch.randn(2, 2, 23, 8, generator=g)
        cos, sin = torch.randn(2, 23, 8, generator=g), torch.randn(2, 23, 8, generator=g)
        assert torch.equal(stage._rotate_keys(k, cos, sin), stage.spec.rotate(k, cos, sin))
