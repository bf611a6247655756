"""Op-level performance: reference memory of ``attention_rows`` and per-op timings.

(a) ``attention_memory``: the reference path scoring ONE query row against N keys with 32 heads must
    allocate O(H x N), never the O(H x N x N) attention map. Measured exactly with
    ``LiveTensorBytes`` for several N (linear scaling), and contrasted with a naive eager computation
    that builds the full map (measured at a small N, analytic size at every N).
(b) ``op_timings``: wall time per op at LLaVA-1.5/NeXT shapes: the reference on the current device
    (CPU here), and on CUDA the Triton kernel against the reference. Without a CUDA GPU the Triton
    column is skipped with a clear line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.perf.memory import LiveTensorBytes
from pruners.ops import attention_rows, merge_tokens, select_and_gather, transition_variation

MB = 1e6


def _attn_inputs(n_keys: int, heads: int, head_dim: int, dtype: torch.dtype, n_queries: int = 1,
                 device: str = "cpu", seed: int = 0) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
    """Kwargs for attention_rows: the last token scoring the 576-token image span (or every key)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, n_queries, head_dim, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(1, heads, n_keys, head_dim, generator=g).to(device=device, dtype=dtype)
    key_mask = torch.ones(1, n_keys, dtype=torch.bool, device=device)
    query_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[None]  # the last rows
    start = 35 if n_keys >= 35 + 576 + n_queries else 0
    span = 576 if start else n_keys
    key_start = torch.tensor([start], device=device)
    kw = dict(q=q, k=k, key_mask=key_mask, query_pos=query_pos, key_start=key_start, key_len=span)
    return kw, (q, k, key_mask, query_pos, key_start)


def _naive_full_map_rows(q_all: torch.Tensor, k: torch.Tensor, n_queries: int) -> torch.Tensor:
    """What output_attentions=True costs: the whole causal [B, H, N, N] map, then the last rows."""
    n = k.shape[2]
    logits = (q_all.float() @ k.float().transpose(-1, -2)) / math.sqrt(q_all.shape[-1])  # [B, H, N, N]
    causal = torch.ones(n, n, dtype=torch.bool, device=k.device).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)  # [B, H, N, N]
    return probs[:, :, n - n_queries :].mean(1)


def attention_memory(
    n_keys: tuple[int, ...] = (576, 1440, 2880),
    heads: int = 32,
    head_dim: int = 128,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
    naive_n: int = 576,
) -> list[dict[str, Any]]:
    """Peak extra tensor memory of the reference attention_rows (1 query row) vs the full map."""
    rows = []
    for dtype in dtypes:
        for n in n_keys:
            kw, existing = _attn_inputs(n, heads, head_dim, dtype)
            with torch.inference_mode(), LiveTensorBytes(existing) as m:
                out = attention_rows(impl="reference", **kw)
            del out
            hn_fp32 = heads * n * 4
            rows.append({
                "what": "reference attention_rows, 1 query row",
                "dtype": str(dtype).replace("torch.", ""), "heads": heads, "n_keys": n, "head_dim": head_dim,
                "peak_mb": m.peak_bytes / MB, "largest_tensor_mb": m.largest_tensor_bytes / MB,
                "peak_over_HxN_fp32": m.peak_bytes / hn_fp32,
                "full_map_fp32_mb": heads * n * n * 4 / MB,
                "full_map_over_peak": heads * n * n * 4 / m.peak_bytes,
            })
    # measured contrast: the naive full map at a small N
    g = torch.Generator().manual_seed(0)
    q_all = torch.randn(1, heads, naive_n, head_dim, generator=g)
    k = torch.randn(1, heads, naive_n, head_dim, generator=g)
    with torch.inference_mode(), LiveTensorBytes((q_all, k)) as m:
        out = _naive_full_map_rows(q_all, k, 1)
    del out
    rows.append({
        "what": "naive full attention map (eager-style), then 1 row", "dtype": "float32", "heads": heads,
        "n_keys": naive_n, "head_dim": head_dim, "peak_mb": m.peak_bytes / MB,
        "largest_tensor_mb": m.largest_tensor_bytes / MB, "peak_over_HxN_fp32": m.peak_bytes / (heads * naive_n * 4),
        "full_map_fp32_mb": heads * naive_n**2 * 4 / MB, "full_map_over_peak": heads * naive_n**2 * 4 / m.peak_bytes,
    })
    return rows


# ---------------------------------------------------------------------------------------------
# timings
# ---------------------------------------------------------------------------------------------
def _op_cases(device: str, dtype: torch.dtype) -> list[tuple[str, Callable[[str], Any]]]:
    """(label, fn(impl)) at LLaVA-1.5 (576 visual tokens, hidden 4096) and LLaVA-NeXT (2,880) shapes."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    cases: list[tuple[str, Callable[[str], Any]]] = []
    for nq, nk in ((1, 640), (1, 2944), (32, 2944)):
        kw, _ = _attn_inputs(nk, 32, 128, dtype, n_queries=nq, device=device)
        cases.append((f"attention_rows B=1 H=32 D=128 Nq={nq} Nk={nk} span={kw['key_len']}",
                      lambda impl, kw=kw: attention_rows(impl=impl, **kw)))
    scores = torch.rand(8, 576, generator=g).to(device)
    hidden, pos = rnd(8, 576, 4096), torch.arange(576, device=device).expand(8, 576)
    cases.append(("select_and_gather B=8 N=576 k=64 +hidden[4096] +pos",
                  lambda impl: select_and_gather(scores, 64, tensors=(hidden, pos), impl=impl)))
    scores2 = torch.rand(1, 2880, generator=g).to(device)
    cases.append(("select_and_gather B=1 N=2880 k=320 (scores only)",
                  lambda impl: select_and_gather(scores2, 320, impl=impl)))
    feats = rnd(8, 576, 1024)
    assign = torch.randint(-1, 10, (8, 576), generator=g).to(device)
    w = torch.rand(8, 576, generator=g).to(device)
    cases.append(("merge_tokens B=8 N=576 D=1024 T=10 weighted",
                  lambda impl: merge_tokens(feats, assign, 10, weights=w, impl=impl)))
    x, y = rnd(1, 640, 4096), rnd(1, 640, 4096)
    mask = torch.ones(1, 640, dtype=torch.bool, device=device)
    cases.append(("transition_variation B=1 N=640 D=4096",
                  lambda impl: transition_variation(x, y, mask=mask, impl=impl)))
    return cases


def _time_ms(fn: Callable[[], Any], device: str, min_run_time: float = 0.3) -> float:
    """Median wall time of fn() in ms (torch.utils.benchmark; synchronises CUDA)."""
    from torch.utils import benchmark

    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e3


def op_timings(min_run_time: float = 0.3) -> tuple[list[dict[str, Any]], str | None]:
    """Per-op timings. Returns (rows, skip_message). CPU: reference fp32 only; CUDA: Triton vs reference fp16."""
    from pruners.ops._dispatch import HAS_TRITON

    rows = []
    ref_device = "cpu"
    for label, fn in _op_cases("cpu", torch.float32):
        rows.append({"op": label, "device": "cpu", "dtype": "float32",
                     "reference_ms": _time_ms(lambda fn=fn: fn("reference"), ref_device, min_run_time)})
    if not torch.cuda.is_available():
        return rows, "skipped: no CUDA GPU (Triton vs reference timings need one)"
    if not HAS_TRITON:
        return rows, "skipped: triton is not importable"
    for label, fn in _op_cases("cuda", torch.float16):
        fn("triton")  # compile
        ref = _time_ms(lambda fn=fn: fn("reference"), "cuda", min_run_time)
        tri = _time_ms(lambda fn=fn: fn("triton"), "cuda", min_run_time)
        rows.append({"op": label, "device": torch.cuda.get_device_name(), "dtype": "float16",
                     "reference_ms": ref, "triton_ms": tri, "speedup": ref / tri})
    return rows, None
