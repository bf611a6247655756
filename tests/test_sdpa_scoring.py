"""In-LLM scoring must not force eager attention: with SDPA everywhere, FastV keeps the same tokens
as with eager attention (the adapter computes the one attention row it needs from q/k)."""

from __future__ import annotations

import torch

from mllm_adapters import apply_pruner


def test_fastv_same_kept_set_with_sdpa_and_eager(tiny, tiny_sdpa, batch):
    eager, _ = tiny
    sdpa, _ = tiny_sdpa
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    kept = {}
    for name, model in (("eager", eager), ("sdpa", sdpa)):
        with apply_pruner(model, "fastv", budget=7, layer=2) as h, torch.no_grad():
            logits = model(**batch).logits[:, -1]  # padding rows differ between backends; real ones do not
            kept[name] = [k.tolist() for k in h.kept_indices]
        kept[name + "_logits"] = logits
    assert kept["eager"] == kept["sdpa"]
    assert (kept["eager_logits"] - kept["sdpa_logits"]).abs().max() < 1e-4
