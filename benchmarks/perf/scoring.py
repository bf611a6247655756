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


def _record(way: dict[str, list[float]], wall: float, cpu: float, peak: int) -> None:
    """Append one timed call's wall ms, CPU ms and peak bytes to a way's lists."""
    for key, value in zip(("wall", "cpu", "peak"), (wall, cpu, peak)):
        way[key].append(value)


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


def scoring_perf(sizes: tuple[int, ...] = SIZES, repeats: int = 3, verbose: bool = True,
                 shape: tuple[int, int, int] = (4096, 32, 11008)) -> dict[str, Any]:
    """The three-way table and the scoring-memory table; returns the figures. ``shape``: the layer's
    (hidden, heads, MLP) widths (LLaMA-7B's by default; smaller in the smoke test)."""
    from transformers import DynamicCache

    from benchmarks.perf.table import print_table
    from pruners.ops import attention_rows

    hidden, heads, mlp = shape
    sdpa, eager = (_layer(hidden=hidden, heads=heads, mlp=mlp, attn=a) for a in ("sdpa", "eager"))
    eager.load_state_dict(sdpa.state_dict())
    weights = tuple(sdpa.parameters()) + tuple(eager.parameters())
    attn = sdpa.layers[0].self_attn
    rows_out: list[dict[str, Any]] = []
    mem_out: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        L = N_BEFORE + n + N_AFTER
        h = torch.randn(1, L, hidden, generator=g) * 0.5
        pos = torch.arange(L)[None]
        rope = sdpa.rotary_emb(h, position_ids=pos)  # what layer 0 receives
        stage = _stage(sdpa, n, L)
        ways: dict[str, dict[str, list[float]]] = {w: {"wall": [], "cpu": [], "peak": []} for w in
                                                  ("sdpa", "score_cached", "score_uncached", "op", "eager_maps")}
        keep: dict[str, Any] = {}
        with torch.inference_mode():  # warm-up (allocator, lazy init) of both layers at this length
            sdpa(inputs_embeds=h, position_ids=pos, past_key_values=DynamicCache(config=sdpa.config), use_cache=True)
            eager(inputs_embeds=h, position_ids=pos, use_cache=False, output_attentions=True)
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
                _record(ways["sdpa"], w, c, p)
                x = sdpa.layers[0].input_layernorm(h)  # the normed input the engine captures at the attention
                cached_k = cache.layers[0].keys
                existing = (h, x, *rope, keys["k"], cached_k, *weights)
                for name, kw in (("score_cached", {"cache": cache}), ("score_uncached", {"k_raw": keys["k"]})):
                    out, w, c, p = _timed(existing, stage._rows_from, 0, x, *rope, "last", **kw)
                    keep[name] = out
                    _record(ways[name], w, c, p)
                # the op alone on the same q/k (q: the last row, already rotated)
                q, k = stage._rope_qk(0, x, *rope, torch.tensor([[L - 1]]), keys["k"], cache)
                _, w, c, p = _timed((q, k, *existing), attention_rows, q, k, key_mask=stage._fw.key_mask,
                                    query_pos=torch.tensor([[L - 1]]), key_start=torch.tensor([N_BEFORE]),
                                    key_len=n, scale=attn.scaling)
                _record(ways["op"], w, c, p)
                # the peer way: the same layer under eager attention, returning the full map
                out, w, c, p = _timed((h, *weights), eager, inputs_embeds=h, position_ids=pos, use_cache=False,
                                      output_attentions=True)
                _record(ways["eager_maps"], w, c, p)
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
    shaped = "Llama-7B-shaped decoder layer" if shape == (4096, 32, 11008) else "Llama decoder layer"
    result = {"layer": f"{shaped} ({hidden} hidden, {heads} x {hidden // heads} heads, MLP {mlp}), fp32, CPU "
                       f"threads={torch.get_num_threads()}", "repeats": repeats, "three_way": rows_out, "scoring_memory": mem_out}
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


def _vision_tower(attn: str, tiny_text: bool = True) -> Any:
    """A LLaVA model whose vision tower is one CLIP-L/14-336 layer (1024 wide, 16 heads, 577 tokens per
    view; random weights) and whose LLM is tiny: only the vision side is timed."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=1, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=32064, max_position_embeddings=4096)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-1)
    cfg.vision_config._attn_implementation = attn
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


def vision_scoring_perf(views: tuple[int, ...] = (1, 5), repeats: int = 3, verbose: bool = True) -> dict[str, Any]:
    """The vision side: one CLIP-L/14-336 layer (embeddings + the layer) on ``views`` images or tiles
    (1: LLaVA-1.5, 5: a LLaVA-NeXT 672 px image), three ways, interleaved, medians of ``repeats``:

    - ``sdpa``: the embeddings and the layer under SDPA, run as the engine runs them (the floor);
    - ``sdpa + cls row``: the path users run for a CLS-attention method (VTC-CLS, FasterVLM, VisionZip):
      the engine's `VisionLoop._run_vision_layer` capturing the layer's own q/k projections, then
      `VisionLoop._cls_attention` (the `attention_rows` op on the CLS query row);
    - ``eager + maps``: the peer way, the tower with ``output_attentions=True`` (the full [H, T, T] map
      the released code reads the CLS row from).
    """
    from benchmarks.perf.table import print_table
    from mllm_adapters.engine.state import Forward
    from mllm_adapters.engine.vision import VisionLoop
    from mllm_adapters.families.llava import LlavaSpec

    sdpa, eager = _vision_tower("sdpa"), _vision_tower("eager")
    eager.load_state_dict(sdpa.state_dict())
    spec = LlavaSpec(sdpa)
    stage = VisionLoop()
    stage.spec, stage.info = spec, spec.model_info()
    vt_eager = eager.model.vision_tower
    weights = tuple(sdpa.parameters()) + tuple(eager.parameters())
    g = torch.Generator().manual_seed(0)
    rows_out: list[dict[str, Any]] = []

    def ours(px: torch.Tensor) -> torch.Tensor:
        stage._fw = Forward()
        hs = spec.embed(px)
        stage._run_vision_layer(0, hs, None, capture=True)
        return stage._cls_attention(0, hs)  # [V, 576]

    for v in views:
        px = torch.randn(v, 3, 336, 336, generator=g)
        ways: dict[str, dict[str, list[float]]] = {w: {"wall": [], "cpu": [], "peak": []}
                                                  for w in ("sdpa", "ours", "eager_maps")}
        keep: dict[str, torch.Tensor] = {}
        calls = (("sdpa", lambda px=px: spec.run_vision_block(0, spec.embed(px), None)),
                 ("ours", lambda px=px: ours(px)),
                 ("eager_maps", lambda px=px: vt_eager(px, output_attentions=True)))
        with torch.inference_mode():
            for _, fn in calls:  # warm-up (allocator, lazy init) of each way
                fn()
        for _ in range(repeats):
            with torch.inference_mode():
                for name, fn in calls:
                    out, w, c, p = _timed((px, *weights), fn)
                    if name == "ours":
                        keep[name] = out
                    elif name == "eager_maps":
                        keep[name] = out.attentions[0][:, :, 0, 1:].mean(1)  # [V, 576]
                    del out
                    _record(ways[name], w, c, p)
        med = {w: {k: statistics.median(x) for k, x in d.items()} for w, d in ways.items()}
        floor = med["sdpa"]
        rows_out.append({
            "views": v, "tokens_per_view": 577, "sdpa_ms": floor["wall"], "sdpa_cpu_ms": floor["cpu"],
            "cls_row_over_sdpa": med["ours"]["cpu"] / floor["cpu"],
            "eager_maps_over_sdpa": med["eager_maps"]["cpu"] / floor["cpu"],
            "sdpa_peak_mb": floor["peak"] / MB, "cls_row_peak_mb": med["ours"]["peak"] / MB,
            "eager_maps_peak_mb": med["eager_maps"]["peak"] / MB,
            "peak_ratio_eager_over_cls_row": med["eager_maps"]["peak"] / med["ours"]["peak"],
            "max_abs_diff_vs_map_row": float((keep["ours"] - keep["eager_maps"]).abs().max()),
        })
    result = {"layer": "CLIP-L/14-336 embeddings + one layer (1024 wide, 16 heads, 577 tokens per view), fp32, "
                       f"CPU threads={torch.get_num_threads()}", "repeats": repeats, "rows": rows_out}
    if verbose:
        print(f"## (f) the vision side three ways: {result['layer']}, median of {repeats}\n")
        print_table(rows_out, ["views", "sdpa_cpu_ms", "cls_row_over_sdpa", "eager_maps_over_sdpa", "sdpa_peak_mb",
                               "cls_row_peak_mb", "eager_maps_peak_mb", "peak_ratio_eager_over_cls_row",
                               "max_abs_diff_vs_map_row"])
        print("cls_row = the tower under SDPA with the layer's q/k captured + the CLS row via attention_rows (what "
              "VTC-CLS, FasterVLM and VisionZip run here); eager_maps = output_attentions=True (the peer way). "
              "Ratios of process CPU time.\n")
    return result
