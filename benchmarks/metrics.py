"""Runtime measurements of one cell: prefill / decode latency, KV-cache bytes, peak memory.

Conventions (docs/flops.md "Latency" and "KV-cache memory"): prefill time is one forward pass (vision encoder + projector
+ LLM prefill to the first token's logits), decode time is per generated token (between consecutive
tokens of greedy ``generate()``, the pruner's cache in place); both are medians over a few samples after
warm-up, timed with CUDA events on GPU and ``time.perf_counter`` on CPU. KV bytes are read from the
actual cache after prefill (layers can hold different lengths under in-LLM pruning).

Answer-relevant patch recall (`relevant_recall`): the fraction of the patches the answer depends on
that some kept visual token still covers; for LLaVA-NeXT's packed runs `anyres_cover` maps token
positions back to image regions.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


def kv_cache_bytes(cache: Any) -> int:
    """Sum over layers of the bytes of the K and V tensors actually held by ``cache``.

    Accepts a transformers 5 ``Cache`` (``cache.layers[i].keys/values``) or the legacy tuple of
    (K, V) per layer.
    """
    if cache is None:
        return 0
    pairs: Iterable[Any]
    if hasattr(cache, "layers"):
        pairs = ((getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers)
    else:
        pairs = cache
    total = 0
    for pair in pairs:
        for t in pair:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class _Clock:
    """Timestamps in ms: CUDA events on GPU (read after one synchronize), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def times_ms(self) -> list[float]:
        if not self.marks:
            return []
        if self.cuda:
            torch.cuda.synchronize()
            first = self.marks[0]
            return [first.elapsed_time(ev) for ev in self.marks]
        return [(t - self.marks[0]) * 1000.0 for t in self.marks]


class _StepMarker(StoppingCriteria):
    """Never stops generation; marks the clock each time generate() has produced a token."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.clock.mark()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def time_prefill(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[float, Any]:
    """One prefill forward (vision + projector + LLM up to the last position's logits), timed in ms.

    Returns (ms, the cache it filled).
    """
    device = next(model.parameters()).device
    clock = _Clock(device)
    with torch.inference_mode():
        clock.mark()
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        clock.mark()
    return clock.times_ms()[1], out.past_key_values


def time_decode(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int) -> list[float]:
    """Greedy generate() for exactly ``new_tokens`` tokens; the ms between consecutive tokens."""
    device = next(model.parameters()).device
    clock = _Clock(device)
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([_StepMarker(clock)]),
        )
    t = clock.times_ms()
    return [b - a for a, b in zip(t, t[1:])]


class PeakMemory:
    """Peak memory over a block: CUDA's max allocated bytes on GPU, sampled process RSS on CPU.

    On CPU a background thread reads /proc/self/statm every ``interval`` seconds (Linux); elsewhere it
    falls back to ``resource.getrusage`` max RSS (a process-lifetime peak). ``source`` says which.
    """

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device = device
        self.interval = interval
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self.source = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as f:
                pages = int(f.read().split()[1])
            import os

            return pages * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _poll(self) -> None:
        while not self._stop.is_set():
            rss = self._rss()
            if rss is not None:
                self.peak_bytes = max(self.peak_bytes, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            self.source = "cuda_max_memory_allocated"
        elif self._rss() is not None:
            self.baseline_bytes = self.peak_bytes = self._rss() or 0
            self.source = "cpu_rss_sampled"
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        else:
            self.source = "ru_maxrss_process_lifetime"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._rss() or 0)
        else:
            import resource

            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_runtime(
    model: Any,
    make_inputs: Callable[[int], dict[str, torch.Tensor]],
    n_samples: int,
    warmup: int = 1,
    decode_tokens: int = 8,
) -> dict[str, Any]:
    """Latency, KV-cache and peak-memory metrics over ``n_samples`` single-sample inputs.

    ``make_inputs(i)`` returns the processor outputs (batch of one, on the model's device) of sample
    ``i``; samples ``0..warmup-1`` are run once untimed first and then timed like the others (so
    ``n_samples`` timed runs follow the warm-up). Runs pruned if a pruner is attached to ``model``.
    """
    if n_samples < 1:
        raise ValueError(f"latency n_samples must be >= 1, got {n_samples}")
    if decode_tokens < 2:
        raise ValueError(f"latency decode_tokens must be >= 2 (one prefill token + decode steps), got {decode_tokens}")
    device = next(model.parameters()).device
    for i in range(warmup):
        time_prefill(model, make_inputs(i))
        time_decode(model, make_inputs(i), decode_tokens)
    prefill, decode, kv = [], [], []
    with PeakMemory(device) as mem:
        for i in range(n_samples):
            inputs = make_inputs(i)
            ms, cache = time_prefill(model, inputs)
            prefill.append(ms)
            kv.append(kv_cache_bytes(cache))
            del cache
            decode.append(statistics.median(time_decode(model, inputs, decode_tokens)))
    return {
        "prefill_ms": statistics.median(prefill),
        "decode_ms_per_token": statistics.median(decode),
        "kv_cache_bytes": statistics.mean(kv),
        "kv_cache_mb": statistics.mean(kv) / 1e6,
        "peak_mem_mb": mem.peak_bytes / 1e6,
        "peak_mem_delta_mb": max(0, mem.peak_bytes - mem.baseline_bytes) / 1e6,
        "peak_mem_source": mem.source,
        "latency_samples": n_samples,
        "latency_warmup": warmup,
        "decode_tokens": decode_tokens,
        "prefill_ms_all": prefill,
    }


# ---- answer-relevant patch recall -------------------------------------------------------------
def relevant_recall(
    kept: torch.Tensor | None, relevant: Sequence[int], cover: torch.Tensor | None = None
) -> float | None:
    """Fraction of a sample's answer-relevant patches that kept visual tokens still see.

    kept:     [k] kept visual-token indices (``handle.kept_indices[b]``); ``None`` = everything kept.
    relevant: raster indices of the relevant cells of the grid the task was asked about.
    cover:    [G, c] per grid cell the token indices that cover it (-1 = none), or ``None`` when the
              grid IS the token grid (LLaVA-1.5: cell i is token i). A relevant cell counts as kept
              when any of its covering tokens is kept.
    Returns ``None`` when the sample has no relevant patch.
    """
    if not relevant:
        return None
    if kept is None:
        return 1.0
    kept_set = set(kept.tolist())
    if cover is None:
        return sum(1 for p in relevant if p in kept_set) / len(relevant)
    rows = cover[torch.as_tensor(list(relevant), dtype=torch.long)].tolist()  # [R, c]
    return sum(1 for toks in rows if any(t in kept_set for t in toks if t >= 0)) / len(relevant)


# ---- diagnostics: modality attention share and visual attention sinks ---------------------------
# What the engine records (`mllm_adapters/engine/diagnostics.py`) turned into prediction-row fields and a
# cell's summaries; the formulas and what they follow are in docs/benchmarks.md ("Diagnostics").

def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def diagnostics_row(d: Any, with_sinks: bool) -> dict[str, Any]:
    """A prediction row's diagnostics fields from one sample's `SampleDiagnostics` ``d``: per decoder
    layer the last prompt token's visual and text attention shares, the counts of visual and text keys
    it attends to, the layer's MDI; with ``with_sinks`` (the unpruned reference) its sink statistics."""
    n = len(d.visual_share)
    row: dict[str, Any] = {
        "attn_visual_share": list(d.visual_share), "attn_text_share": list(d.text_share),
        "attn_n_visual": list(d.n_visual), "attn_n_text": list(d.n_text), "mdi": [d.mdi(i) for i in range(n)],
    }
    if with_sinks:
        row["sink_stats"] = {
            "layers": list(d.sink_layers), "first_token_dims": sorted(d.first_token_dims),
            "first_token_max": float(d.first_token_max), "first_token_argmax": int(d.first_token_argmax),
            "visual_max": float(d.visual_max),
            "visual_hits": {str(t): sorted(ds) for t, ds in sorted(d.visual_hits.items())},
        }
    return row


def attention_summary(rows: Sequence[dict[str, Any]], n_layers: int) -> dict[str, Any]:
    """A cell's summaries over the samples with a visual key in the layer: per layer the mean visual share
    and the MDI of the mean shares and counts, (mean A_T / mean |T|) / (mean A_O / mean |O|) (a ratio of
    means: one sample paying almost nothing to its image does not dominate it); then ``attn_visual_share``,
    the layer mean of the visual share, and ``mdi``, the geometric layer mean of the MDI (the mean of a
    ratio on the log scale, where MDI 10 and 0.1 average to 1)."""
    per_layer, mdi = [], []
    for i in range(n_layers):
        present = [r for r in rows if r.get("attn_n_visual") and (r["attn_n_visual"][i] or 0) > 0]
        vs = _mean(r["attn_visual_share"][i] for r in present)
        per_layer.append(vs)
        ts, nv, nt = (_mean(r[k][i] for r in present) for k in ("attn_text_share", "attn_n_visual", "attn_n_text"))
        mdi.append((ts / nt) / (vs / nv) if vs and nt and nv and ts is not None else None)
    logs = [math.log(m) for m in mdi if m is not None and m > 0]
    return {"attn_visual_share_per_layer": per_layer, "attn_visual_share": _mean(per_layer),
            "mdi_per_layer": mdi, "mdi": math.exp(sum(logs) / len(logs)) if logs else None}


def find_sinks(rows: Sequence[dict[str, Any]], tau: float, hidden_size: int | None = None
               ) -> tuple[list[int], list[list[int]], str | None]:
    """(the model's sink dimensions, per row its sink visual tokens, why there are none or None) from the
    unpruned reference's rows (their ``sink_stats``), as the sink paper finds them: a dimension is a sink
    dimension when the first prompt token's |rms-normalised activation| reaches ``tau`` in it at some
    examined layer (union over samples); a visual token is a sink when it reaches ``tau`` in a sink
    dimension at some examined layer (phi(x) = max over the sink dimensions >= tau)."""
    stats = [r.get("sink_stats") for r in rows]
    recorded = [s for s in stats if s is not None]
    if not recorded:
        return [], [[] for _ in rows], "no sink statistics recorded (diagnostics off in the reference cell)"
    layers = sorted({i for s in recorded for i in s["layers"]})
    if not layers:
        return [], [[] for _ in rows], "no layer examined for sinks (the model has fewer than 3 decoder layers)"
    dims = sorted({d for s in recorded for d in s["first_token_dims"]})
    where = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
    if not dims:
        top = max(recorded, key=lambda s: s["first_token_max"])
        reason = (f"no sink dimension: max |rms-normalised activation| of the first prompt token over {where} is "
                  f"{top['first_token_max']:.3g} (dim {top['first_token_argmax']}) < tau {tau:g}")
        if hidden_size and hidden_size ** 0.5 < tau:
            reason += (f"; an rms-normalised activation is at most sqrt(hidden_size) = {hidden_size ** 0.5:.3g} "
                       f"for hidden size {hidden_size}")
        return [], [[] for _ in rows], reason
    sink_dims = set(dims)
    sinks = [[] if s is None else sorted(int(t) for t, ds in s["visual_hits"].items() if sink_dims & set(ds))
             for s in stats]
    if not any(sinks):
        vmax = max(s["visual_max"] for s in recorded)
        return dims, sinks, (f"no visual sink token: sink dimensions {dims} found (first prompt token), but no visual "
                             f"token reaches tau {tau:g} in them over {where} (largest visual |rms-normalised "
                             f"activation| in any dimension {vmax:.3g})")
    return dims, sinks, None


def sink_shares(kept: Sequence[int] | None, n_reaching: int | None, sinks: Sequence[int]
                ) -> tuple[float | None, float | None]:
    """(share of the visual tokens reaching the LLM's last layer that are sinks, share of the sinks kept)
    for one sample: |kept & sinks| / n_reaching and |kept & sinks| / |sinks| (merged tokens reach the LLM
    but are never sinks; ``kept`` None = every token kept); (None, None) without sinks."""
    if not sinks:
        return None, None
    s = set(sinks)
    hit = len(s) if kept is None else len(s & set(kept))
    n = n_reaching if n_reaching is not None else (len(s) if kept is None else len(kept))
    return (hit / n if n else None), hit / len(s)
