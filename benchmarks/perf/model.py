"""Model-level performance: pruner overhead and realised prefill speed-up on a LLaVA-1.5-shaped model.

The model is a ``LlavaForConditionalGeneration`` built from config with LLaVA-1.5-7B's real sizes
(CLIP-L/14-336 vision tower: hidden 1024, 16 heads, 576 patches; Llama LLM: hidden 4096, 32 heads,
MLP 11008, vocab 32064) but only a few layers and random weights, SDPA attention everywhere, fp32 on
CPU. The prompt is 35 text tokens, the 576 image tokens, then 20 text tokens (LLaVA-1.5's system
prompt + question length), batch 1.

Measured, per method and budget (runs are interleaved across configurations so load from other
processes on a shared machine hits all of them alike; medians over ``repeats``):
- ``overhead_ms``: wall time inside the pruning code during one prefill: every pruner call
  (scoring, e.g. the q/k projections + ``attention_rows`` for FastV, and selection) plus the
  adapter's in-LLM bookkeeping at the hooked layers (gathers of hidden states, positions, RoPE).
- ``overhead_fraction`` = overhead CPU time / the unpruned prefill CPU time of the same model (goal <= 1%);
  wall-clock and process CPU time are both recorded (CPU time is robust to other processes on the cores).
  Because this model has only a few LLM layers, the fraction is also projected to the full 32-layer
  LLM + 24-layer ViT by scaling the unpruned time with the analytic FLOPs (``projected_fraction_7b``).
- ``speedup`` = unpruned prefill time / pruned prefill time, against ``flops_bound`` = unpruned
  prefill FLOPs / pruned prefill FLOPs (``benchmarks.flops``, the pruner's own FLOPs excluded);
  ``of_bound`` = speedup / flops_bound (goal >= 0.9).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

N_BEFORE, N_AFTER = 35, 20  # text tokens before / after the image (BOS + system prompt, question)


def llava15_config(text_layers: int, vision_layers: int, attn: str = "sdpa"):
    """LLaVA-1.5-7B's shapes with ``text_layers`` decoder layers and ``vision_layers`` ViT layers."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=text_layers, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    return cfg


def build_model(text_layers: int, vision_layers: int, seed: int = 0):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(llava15_config(text_layers, vision_layers)).eval()


def make_inputs(config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Batch of one: [BOS, 34 text, 576 x <image>, 20 text] and a random 336 x 336 image."""
    g = torch.Generator().manual_seed(seed)
    side = config.vision_config.image_size // config.vision_config.patch_size
    text = torch.randint(3, 31999, (N_BEFORE + N_AFTER,), generator=g)
    text[0] = 1
    ids = torch.cat([text[:N_BEFORE], torch.full((side * side,), config.image_token_id), text[N_BEFORE:]])[None]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size,
                                    generator=g),
    }


class OverheadTimer:
    """Times the pruning code of an attached adapter: pruner calls + in-LLM bookkeeping per prefill.

    ``ms`` is wall time, ``cpu_ms`` this process's CPU time (robust to other processes sharing the
    cores; with one torch thread the two agree on an idle machine).
    """

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.ms = 0.0
        self.cpu_ms = 0.0
        self._depth = 0
        for name in ("_call_pruner", "_prefill_layer"):  # instance attributes shadow the methods
            setattr(adapter, name, self._wrap(getattr(adapter, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            if self._depth:  # nested (a pruner call inside a hooked layer): counted by the outer one
                return fn(*args, **kwargs)
            self._depth += 1
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms += (time.perf_counter() - t0) * 1e3
                self.cpu_ms += (time.process_time() - c0) * 1e3
                self._depth -= 1

        return timed


def _prefill_ms(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one prefill (forward with cache, logits of the last position)."""
    with torch.inference_mode():
        t0, c0 = time.perf_counter(), time.process_time()
        model(**inputs, use_cache=True, logits_to_keep=1)
        return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def model_perf(
    text_layers: int = 2,
    vision_layers: int = 2,
    methods: list[str] | tuple[str, ...] = ("fastv", "random"),
    budgets: list[int] | tuple[int, ...] = (192, 128, 64),
    repeats: int = 3,
    verbose: bool = True,
) -> dict[str, Any]:
    """Overhead fraction and realised speed-up vs FLOPs bound; prints a table, returns the figures."""
    from benchmarks.flops import prefill_flops
    from benchmarks.perf.__main__ import print_table
    from pruners import apply_pruner

    t0 = time.perf_counter()
    model = build_model(text_layers, vision_layers)
    cfg = model.config
    inputs = make_inputs(cfg)
    n_text = N_BEFORE + N_AFTER
    build_s = time.perf_counter() - t0
    params = {"fastv": {"layer": min(2, text_layers - 1)}}  # FastV's K=2 when the model has >2 layers

    configs: list[tuple[str, int | None]] = [("none", None)] + [(m, b) for m in methods for b in budgets]
    wall: dict[tuple, list[float]] = {c: [] for c in configs}
    cpu: dict[tuple, list[float]] = {c: [] for c in configs}
    ov_wall: dict[tuple, list[float]] = {c: [] for c in configs}
    ov_cpu: dict[tuple, list[float]] = {c: [] for c in configs}
    counts: dict[tuple, Any] = {}
    _prefill_ms(model, inputs)  # warm-up (allocator, lazy init)
    for _ in range(repeats):
        for c in configs:
            method, budget = c
            if method == "none":  # the unhooked model is the baseline
                w, u = _prefill_ms(model, inputs)
            else:
                handle = apply_pruner(model, method, budget=budget, **params.get(method, {}))
                try:
                    timer = OverheadTimer(handle.adapter)
                    w, u = _prefill_ms(model, inputs)
                    ov_wall[c].append(timer.ms)
                    ov_cpu[c].append(timer.cpu_ms)
                    counts[c] = copy.deepcopy(handle.token_counts)
                finally:
                    handle.remove()
            wall[c].append(w)
            cpu[c].append(u)

    med = statistics.median
    full = llava15_config(32, 24)  # LLaVA-1.5-7B depth, for projecting the overhead fraction
    flops_base = prefill_flops(cfg, n_text).total
    to_7b = prefill_flops(full, n_text).total / flops_base
    base_w, base_c = med(wall[("none", None)]), med(cpu[("none", None)])
    rows = []
    for c in configs[1:]:
        method, budget = c
        bound = flops_base / prefill_flops(cfg, n_text, counts[c]).total
        sw, sc = base_w / med(wall[c]), base_c / med(cpu[c])
        rows.append({
            "method": method, "budget": budget, "prefill_ms": med(wall[c]), "prefill_cpu_ms": med(cpu[c]),
            "overhead_ms": med(ov_wall[c]), "overhead_cpu_ms": med(ov_cpu[c]),
            "overhead_fraction": med(ov_cpu[c]) / base_c,
            "projected_fraction_7b": med(ov_cpu[c]) / (base_c * to_7b),
            "speedup_wall": sw, "speedup_cpu": sc, "flops_bound": bound,
            "of_bound_wall": sw / bound, "of_bound_cpu": sc / bound,
            "llm_visual_tokens": counts[c].get("llm_visual"),
        })
    result = {
        "model": f"LLaVA-1.5-shaped, {text_layers} LLM layers (4096 hidden), {vision_layers} ViT layers "
                 f"(CLIP-L/14-336), random weights, fp32, SDPA, CPU threads={torch.get_num_threads()}",
        "prompt_tokens": n_text + 576, "repeats": repeats, "build_s": build_s,
        "unpruned_prefill_ms": base_w, "unpruned_prefill_cpu_ms": base_c,
        "flops_7b_over_this_model": to_7b, "rows": rows,
        "prefill_ms_all": {f"{m}@{b}": wall[(m, b)] for m, b in configs},
        "prefill_cpu_ms_all": {f"{m}@{b}": cpu[(m, b)] for m, b in configs},
    }
    if verbose:
        print(f"## (c) model level: {result['model']}\n")
        print(f"unpruned prefill: {base_w:.0f} ms wall, {base_c:.0f} ms CPU (median of {repeats}; wall runs: "
              f"{', '.join(f'{t:.0f}' for t in wall[('none', None)])})\n")
        print_table(rows, ["method", "budget", "prefill_ms", "prefill_cpu_ms", "overhead_cpu_ms",
                           "overhead_fraction", "projected_fraction_7b", "speedup_wall", "speedup_cpu",
                           "flops_bound", "of_bound_wall", "of_bound_cpu"])
        print("overhead_fraction = pruning-code CPU time / unpruned prefill CPU time on this model; "
              "projected_fraction_7b scales the unpruned time by FLOPs to 32 LLM + 24 ViT layers.\n"
              "speedup = unpruned / pruned prefill time; flops_bound = unpruned / pruned prefill FLOPs; "
              "of_bound = speedup / flops_bound (goal >= 0.9).\n")
    return result
