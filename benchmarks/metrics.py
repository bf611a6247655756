"""Runtime measurements of one cell: prefill / decode latency, KV-cache bytes, peak memory.

Conventions (``shared/specs/flops.md``): prefill time is one forward pass (vision encoder + projector
+ LLM prefill to the first token's logits), decode time is per generated token (between consecutive
tokens of greedy ``generate()``, the pruner's cache in place); both are medians over a few samples after
warm-up, timed with CUDA events on GPU and ``time.perf_counter`` on CPU. KV bytes are read from the
actual cache after prefill (layers can hold different lengths under in-LLM pruning).

Answer-relevant patch recall (`relevant_recall`): the fraction of the patches the answer depends on
that some kept visual token still covers; for LLaVA-NeXT's packed runs `anyres_cover` maps token
positions back to image regions.
"""

from __future__ import annotations

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
