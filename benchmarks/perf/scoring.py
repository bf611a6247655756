"""Layer-level scoring cost, three ways side by side (``make perf`` part ``scoring``).

One Llama-7B-shaped decoder layer (hidden 4096, 32 x 128 heads, MLP 11008, random weights, fp32 on
CPU) on a prompt of 35 text tokens, N visual tokens and 20 text tokens, N = 576, 1,440, 2,880 (LLaVA-1.5,
LLaVA-NeXT's mid and full anyres runs). Run in one process, interleaved, medians of ``repeats``:

- ``sdpa``: the layer's prefill under SDPA, writing the KV cache (the floor);
- ``sdpa + scoring``: the same plus prunebench's scoring step of the path users run, the engine's own
  `LLMStage._rows_from` (FastV's row: the last prompt token's head-mean attention over the visual
  tokens), with the KV cache the layer just wrote (what ``generate()`` does) and without one (a plain
  forward: the layer's captured key projection rotated once, in chunks);
- ``eager + maps``: the peer way, the layer under eager attention with ``output_attentions=True`` (the
  full [H, L, L] map FastV's and most released code read their scores from).

Peak memory is the exact peak of tensors allocated inside the call (`LiveTensorBytes`; the layer's
inputs, weights and cache excluded), time is wall and process CPU time. The scoring step is also
compared with the `pruners.ops.attention_rows` op alone on the same q/k: the issue's goals are an
extra peak of at most 4 x the op's with the cache, at most one extra [H, L, d] key tensor without, and
a scoring time of at most 0.1% of the layer's prefill with the cache.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmarks.perf.memory import LiveTensorBytes

N_BEFORE, N_AFTER = 35, 20
SIZES = (576, 1440, 2880)
MB = 1e6


def _layer(seed: int = 0, hidden: int = 4096, heads: int = 32, mlp: int = 11008, attn: str = "sdpa") -> Any:
    """A one-layer Llama model of LLaMA-7B's widths (tiny vocabulary: only the layer matters)."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=1, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=32, max_position_embeddings=8192)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return LlamaModel(cfg).eval()


def _stage(lm: Any, n_vis: int, L: int) -> Any:
    """The engine's LLM stage bound to ``lm`` with the per-forward state a FastV prefill has at layer 1:
    every token real, the visual run at 35..35+N."""
    from mllm_adapters.engine.llm import LLMStage
    from mllm_adapters.engine.state import Forward
    from mllm_adapters.families._hf_parts import LlamaStyleDecoder

    spec = LlamaStyleDecoder()
    spec.lm = lm
    stage = LLMStage()
    stage.spec = spec
    fw = Forward()
    fw.key_mask = torch.ones(1, L, dtype=torch.bool)
    fw.visual_pos = torch.arange(N_BEFORE, N_BEFORE + n_vis)[None]
    fw.prompt_len = L
    stage._fw = fw
    return stage


def _timed(existing: tuple, fn, *args: Any, **kwargs: Any) -> tuple[Any, float, float, int]:
    """(``fn(*args, **kwargs)``, wall ms, CPU ms, peak bytes it allocated; ``existing`` not counted).
    Timed in one call, memory counted in a second (the counting dispatch mode slows every op down)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    wall, cpu = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
    del out
    with LiveTensorBytes(existing) as m:
        out = fn(*args, **kwargs)
    return out, wall, cpu, m.peak_bytes


def scoring_perf(sizes: tuple[int, ...] = SIZES, repeats: int = 3, verbose: bool = True) -> dict[str, Any]:
    """The three-way table and the scoring-memory table; returns the figures."""
    from transformers import DynamicCache

    from benchmarks.perf.table import print_table
    from pruners.ops import attention_rows

    sdpa, eager = _layer(attn="sdpa"), _layer(attn="eager")
    eager.load_state_dict(sdpa.state_dict())
    weights = tuple(sdpa.parameters()) + tuple(eager.parameters())
    attn = sdpa.layers[0].self_attn
    rows_out: list[dict[str, Any]] = []
    mem_out: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        L = N_BEFORE + n + N_AFTER
        h = torch.randn(1, L, 4096, generator=g) * 0.5
        pos = torch.arange(L)[None]
        rope = sdpa.rotary_emb(h, position_ids=pos)  # what layer 0 receives
        stage = _stage(sdpa, n, L)
        ways: dict[str, dict[str, list[float]]] = {w: {"wall": [], "cpu": [], "peak": []} for w in
                                                  ("sdpa", "score_cached", "score_uncached", "op", "eager_maps")}
        keep: dict[str, Any] = {}
        for _ in range(repeats):
            with torch.inference_mode():
                keys: dict[str, torch.Tensor] = {}
                hook = attn.k_proj.register_forward_hook(lambda m, a, o, keys=keys: keys.__setitem__("k", o))
                try:  # the layer's prefill; the engine's hook keeps its key projection the same way
                    t0, c0 = time.perf_counter(), time.process_time()
                    sdpa(inputs_embeds=h, position_ids=pos, past_key_values=DynamicCache(config=sdpa.config),
                         use_cache=True)
                    w, c = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
                    cache = DynamicCache(config=sdpa.config)  # a fresh cache per prefill: memory, then scoring
                    with LiveTensorBytes((h, *weights)) as m:
                        sdpa(inputs_embeds=h, position_ids=pos, past_key_values=cache, use_cache=True)
                    p = m.peak_bytes
                finally:
                    hook.remove()
                for k, v in zip(("wall", "cpu", "peak"), (w, c, p)):
                    ways["sdpa"][k].append(v)
                x = sdpa.layers[0].input_layernorm(h)  # the normed input the engine captures at the attention
                cached_k = cache.layers[0].keys
                existing = (h, x, *rope, keys["k"], cached_k, *weights)
                for name, kw in (("score_cached", {"cache": cache}), ("score_uncached", {"k_raw": keys["k"]})):
                    out, w, c, p = _timed(existing, stage._rows_from, 0, x, *rope, "last", **kw)
                    keep[name] = out
                    for k, v in zip(("wall", "cpu", "peak"), (w, c, p)):
                        ways[name][k].append(v)
                # the op alone on the same q/k (q: the last row, already rotated)
                q, k = stage._rope_qk(0, x, *rope, torch.tensor([[L - 1]]), keys["k"], cache)
                _, w, c, p = _timed((q, k, *existing), attention_rows, q, k, key_mask=stage._fw.key_mask,
                                    query_pos=torch.tensor([[L - 1]]), key_start=torch.tensor([N_BEFORE]),
                                    key_len=n, scale=attn.scaling)
                for k_, v in zip(("wall", "cpu", "peak"), (w, c, p)):
                    ways["op"][k_].append(v)
                # the peer way: the same layer under eager attention, returning the full map
                out, w, c, p = _timed((h, *weights), eager, inputs_embeds=h, position_ids=pos, use_cache=False,
                                      output_attentions=True)
                for k_, v in zip(("wall", "cpu", "peak"), (w, c, p)):
                    ways["eager_maps"][k_].append(v)
                keep["peer"] = out.attentions[0][0, :, L - 1, N_BEFORE:N_BEFORE + n].float().mean(0)  # [N]
                del out
        med = {w: {k: statistics.median(v) for k, v in d.items()} for w, d in ways.items()}
        floor = med["sdpa"]
        diff = float((keep["score_cached"][0] - keep["peer"]).abs().max())
        rows_out.append({
            "N": n, "L": L, "sdpa_ms": floor["wall"], "sdpa_cpu_ms": floor["cpu"], "sdpa_peak_mb": floor["peak"] / MB,
            "scored_over_sdpa": (floor["cpu"] + med["score_cached"]["cpu"]) / floor["cpu"],
            "eager_maps_over_sdpa": med["eager_maps"]["cpu"] / floor["cpu"],
            "scored_peak_mb": max(floor["peak"], med["score_cached"]["peak"]) / MB,
            "eager_maps_peak_mb": med["eager_maps"]["peak"] / MB,
            "peak_ratio_eager_over_scored": med["eager_maps"]["peak"] / max(floor["peak"], med["score_cached"]["peak"]),
            "max_abs_diff_vs_map_row": diff,
        })
        key_bytes = 1 * attn.config.num_key_value_heads * L * attn.head_dim * 4
        mem_out.append({
            "N": n, "op_peak_mb": med["op"]["peak"] / MB,
            "cached_peak_mb": med["score_cached"]["peak"] / MB,
            "cached_over_op": med["score_cached"]["peak"] / med["op"]["peak"],
            "uncached_peak_mb": med["score_uncached"]["peak"] / MB,
            "uncached_extra_keys": (med["score_uncached"]["peak"] - med["op"]["peak"]) / key_bytes,
            "cached_ms": med["score_cached"]["wall"], "cached_cpu_ms": med["score_cached"]["cpu"],
            "cached_of_layer": med["score_cached"]["cpu"] / floor["cpu"],
            "uncached_ms": med["score_uncached"]["wall"], "uncached_of_layer": med["score_uncached"]["cpu"] / floor["cpu"],
        })
    result = {"layer": "Llama-7B-shaped decoder layer (4096 hidden, 32 x 128 heads, MLP 11008), fp32, CPU threads="
                       f"{torch.get_num_threads()}", "repeats": repeats, "three_way": rows_out, "scoring_memory": mem_out}
    if verbose:
        print(f"## (d) one decoder layer three ways: {result['layer']}, 35 + N + 20 tokens, median of {repeats}\n")
        print_table(rows_out, ["N", "sdpa_cpu_ms", "scored_over_sdpa", "eager_maps_over_sdpa", "sdpa_peak_mb",
                               "scored_peak_mb", "eager_maps_peak_mb", "peak_ratio_eager_over_scored",
                               "max_abs_diff_vs_map_row"])
        print("scored = SDPA prefill + prunebench's scoring step with the KV cache (generate); eager_maps = the "
              "layer with output_attentions=True (the peer way). Ratios of process CPU time; peaks are the "
              "tensors each call allocates.\n")
        print("## (e) the scoring step users run (LLMStage._rows_from) against the attention_rows op\n")
        print_table(mem_out, ["N", "op_peak_mb", "cached_peak_mb", "cached_over_op", "uncached_peak_mb",
                              "uncached_extra_keys", "cached_cpu_ms", "cached_of_layer", "uncached_of_layer"])
        print("Goals: cached_over_op <= 4, uncached_extra_keys <= 1 ([H, L, d] fp32 key tensors beyond the op), "
              "cached_of_layer <= 0.001.\n")
    return result
