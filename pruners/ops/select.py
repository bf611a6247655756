"""``select_and_gather``: per-sample top-k of token scores in original order, plus the gathers.

Why: every pruner ends with "keep the k best tokens, in raster/original order, and carry their
hidden states, position ids and side tensors along". Doing it in one place fixes the tie rule and
the order once for all methods, and batches samples with different valid lengths.

Semantics (the reference below is the ground truth):
- Scores are compared as fp32 values (fp16/bf16 upcast exactly; -0.0 equals +0.0). NaN is refused.
- Per sample b only the first ``valid_len[b]`` tokens are candidates. Token i ranks above token j
  iff s_i > s_j, or s_i == s_j and i < j (ties go to the lower index). The k best are returned as
  indices sorted ascending, so the kept tokens stay in their original order.
- Each tensor in ``tensors`` ([B, N, ...], or [1, N, ...] broadcast over the batch) is gathered
  along dim 1 at those indices -> [B, k, ...].

Triton path: one program per sample finds the k-th largest value exactly by a 32-step binary search
over the order-preserving int32 image of the fp32 scores (each step counts keys >= the probe in
blocks), then one streaming pass keeps the values above it plus the lowest-index ties and writes the
kept indices in order with a running prefix sum (no sort). Tensors are gathered by a row-copy kernel,
one launch per tensor (any dtype, any trailing shape, strided input).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pruners.ops._dispatch import HAS_TRITON, next_pow2, resolve_impl, tl, triton

__all__ = ["select_and_gather", "select_and_gather_reference", "select_and_gather_triton"]


def _check_inputs(scores, k, valid_len, tensors) -> tuple[int, torch.Tensor | None, list[torch.Tensor]]:
    """Validate; return (k, valid_len on scores.device or None, tensors expanded to [B, N, ...])."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D tensor [B, N], got {getattr(scores, 'shape', type(scores))}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise ValueError(f"scores must be a real numeric tensor, got {scores.dtype}")
    B, N = scores.shape
    if isinstance(k, torch.Tensor):
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= N:
        raise ValueError(f"k must be an int in 0..N={N} (the number of tokens to keep per sample), got {k!r}")
    if valid_len is not None:
        if not isinstance(valid_len, torch.Tensor) or valid_len.shape != (B,) or valid_len.is_floating_point():
            raise ValueError(
                f"valid_len must be an integer tensor [B]=({B},), got {getattr(valid_len, 'dtype', type(valid_len))} "
                f"{tuple(getattr(valid_len, 'shape', ()))}"
            )
        valid_len = valid_len.to(device=scores.device, dtype=torch.long)
        if B:
            lo, hi = int(valid_len.min()), int(valid_len.max())
            if lo < 0 or hi > N:
                raise ValueError(f"valid_len must lie in 0..N={N}, got {valid_len.tolist()}")
            if k > lo:
                raise ValueError(
                    f"k={k} exceeds the smallest valid_len ({lo}); k must be <= min(valid_len)={lo} so every "
                    f"sample has k candidates (valid_len={valid_len.tolist()})"
                )
    if scores.is_floating_point() and B * N and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; the top-k of NaN scores is undefined (clean them first)")
    out = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[1] != N or t.shape[0] not in (1, B):
            raise ValueError(
                f"tensors[{i}] must have shape [B, N, ...] or [1, N, ...] with B={B}, N={N}, "
                f"got {tuple(getattr(t, 'shape', ()))}"
            )
        if t.device != scores.device:
            raise ValueError(f"tensors[{i}] is on {t.device} but scores are on {scores.device}")
        out.append(t.expand(B, *t.shape[1:]))
    return k, valid_len, out


def _gather_reference(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, N, ...] gathered along dim 1 at idx [B, k] -> [B, k, ...]."""
    B, k = idx.shape
    ix = idx.view(B, k, *([1] * (t.dim() - 2))).expand(B, k, *t.shape[2:])  # [B, k, ...]
    return t.gather(1, ix)


def select_and_gather_reference(
    scores: torch.Tensor,
    k: int,
    *,
    valid_len: torch.Tensor | None = None,
    tensors: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Exact PyTorch ``select_and_gather``: stable descending sort, first k, re-sorted ascending."""
    k, valid_len, tensors = _check_inputs(scores, k, valid_len, tensors)
    B, N = scores.shape
    s = scores.float()  # [B, N] compared as fp32
    if valid_len is not None:
        pos = torch.arange(N, device=scores.device)
        s = s.masked_fill(pos[None, :] >= valid_len[:, None], float("-inf"))  # invalid rank after valid ties
    order = torch.sort(s, dim=1, descending=True, stable=True).indices  # ties: lower index first
    idx = order[:, :k].sort(dim=1).values  # [B, k] ascending = original order
    return idx, [_gather_reference(t, idx) for t in tensors]


if HAS_TRITON:

    @triton.jit
    def _score_keys(s_ptr, offs, valid):
        """int64 keys whose signed order equals the fp32 order of the scores (-0.0 == +0.0)."""
        s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        s = tl.where(s == 0.0, 0.0, s)  # fold -0.0 onto +0.0
        bits = s.to(tl.int32, bitcast=True)
        return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)

    @triton.jit
    def _topk_indices_kernel(
        s_ptr, vlen_ptr, out_ptr, N, K, s_sb, s_sn, s_ob,
        HAS_VLEN: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per sample: exact k-th largest by binary search, then an ordered streaming select."""
        b = tl.program_id(0)
        n_valid = N
        if HAS_VLEN:
            n_valid = tl.load(vlen_ptr + b).to(tl.int32)
        row = s_ptr + b * s_sb
        # largest threshold T with #(key >= T) >= K; keys are int32 values held in int64
        lo = tl.full([], -2147483648, tl.int64)
        hi = tl.full([], 2147483647, tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            cnt = tl.zeros([], tl.int32)
            for start in range(0, n_valid, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                valid = offs < n_valid
                key = _score_keys(row, offs * s_sn, valid)
                cnt += tl.sum((valid & (key >= mid)).to(tl.int32), 0)
            ok = cnt >= K
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        thr = lo
        n_gt = tl.zeros([], tl.int32)
        for start in range(0, n_valid, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < n_valid
            key = _score_keys(row, offs * s_sn, valid)
            n_gt += tl.sum((valid & (key > thr)).to(tl.int32), 0)
        need_eq = K - n_gt  # ties at the threshold to take, lowest index first
        seen_eq = tl.zeros([], tl.int32)
        written = tl.zeros([], tl.int32)
        for start in range(0, n_valid, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < n_valid
            key = _score_keys(row, offs * s_sn, valid)
            is_gt = valid & (key > thr)
            is_eq = (valid & (key == thr)).to(tl.int32)
            eq_rank = seen_eq + tl.cumsum(is_eq, 0) - is_eq
            keep = (is_gt | ((is_eq != 0) & (eq_rank < need_eq))).to(tl.int32)
            slot = written + tl.cumsum(keep, 0) - keep
            tl.store(out_ptr + b * s_ob + slot, offs.to(tl.int64), mask=(keep != 0) & (slot < K))
            seen_eq += tl.sum(is_eq, 0)
            written += tl.sum(keep, 0)

    @triton.jit
    def _gather_rows_kernel(
        src_ptr, idx_ptr, out_ptr, K, F, s_b, s_n, s_f, s_ib, o_b, o_k,
        BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        """out[b, i, f] = src[b, idx[b, i], f] for a block of rows i and features f."""
        pid_k = tl.program_id(0)
        pid_f = tl.program_id(1)
        b = tl.program_id(2)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        vk = offs_k < K
        vf = offs_f < F
        rows = tl.load(idx_ptr + b * s_ib + offs_k, mask=vk, other=0)
        m = vk[:, None] & vf[None, :]
        vals = tl.load(src_ptr + b * s_b + rows[:, None] * s_n + offs_f[None, :] * s_f, mask=m)
        tl.store(out_ptr + b * o_b + offs_k[:, None] * o_k + offs_f[None, :], vals, mask=m)


def _gather_triton(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Triton row gather: t [B, N, ...] at idx [B, k] -> contiguous [B, k, ...]."""
    B, K = idx.shape
    N, rest = t.shape[1], t.shape[2:]
    F = 1
    for r in rest:
        F *= r
    out = torch.empty(B, K, *rest, dtype=t.dtype, device=t.device)
    if out.numel() == 0:
        return out
    src = t.reshape(B, N, F)  # a view whenever the trailing dims allow it (stride-0 batch too)
    if src.dtype == torch.bool:  # load/store bytes
        src, dst = src.view(torch.uint8), out.view(torch.uint8)
    else:
        dst = out
    dst = dst.view(B, K, F)
    BLOCK_F = min(next_pow2(F), 256)
    BLOCK_K = max(1, min(next_pow2(K), 4096 // BLOCK_F, 64))
    grid = (triton.cdiv(K, BLOCK_K), triton.cdiv(F, BLOCK_F), B)
    _gather_rows_kernel[grid](
        src, idx, dst, K, F, *src.stride(), idx.stride(0), dst.stride(0), dst.stride(1),
        BLOCK_K=BLOCK_K, BLOCK_F=BLOCK_F,
    )
    return out


def select_and_gather_triton(
    scores: torch.Tensor,
    k: int,
    *,
    valid_len: torch.Tensor | None = None,
    tensors: Sequence[torch.Tensor] = (),
    block: int = 1024,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Triton ``select_and_gather`` (CUDA tensors, or CPU under TRITON_INTERPRET=1); same contract."""
    if not HAS_TRITON:
        raise ValueError("select_and_gather: impl='triton' needs the triton package")
    k, valid_len, tensors = _check_inputs(scores, k, valid_len, tensors)
    B, N = scores.shape
    idx = torch.empty(B, k, dtype=torch.long, device=scores.device)  # [B, k]
    if B and k:
        s = scores if scores.dtype in (torch.float32, torch.float16, torch.bfloat16) else scores.float()
        vlen = valid_len if valid_len is not None else idx  # dummy pointer when absent
        _topk_indices_kernel[(B,)](
            s, vlen, idx, N, k, s.stride(0), s.stride(1), idx.stride(0),
            HAS_VLEN=valid_len is not None, BLOCK=min(next_pow2(block, 16), next_pow2(N, 16)),
        )
    return idx, [_gather_triton(t, idx) for t in tensors]


def select_and_gather(
    scores: torch.Tensor,
    k: int,
    *,
    valid_len: torch.Tensor | None = None,
    tensors: Sequence[torch.Tensor] = (),
    impl: str = "auto",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-sample top-k of ``scores`` in original order, and ``tensors`` gathered at those tokens.

    Args:
        scores: [B, N] (compared as fp32; NaN refused).
        k: tokens to keep per sample, 0 <= k <= min(valid_len) (ValueError otherwise).
        valid_len: [B] integer; only the first valid_len[b] tokens of sample b are candidates.
            None = all N.
        tensors: tensors [B, N, ...] (or [1, N, ...], broadcast) to gather along dim 1.
        impl: "auto" | "reference" | "triton" (see ``pruners.ops._dispatch``).

    Returns:
        (indices [B, k] long, ascending; [t gathered -> [B, k, ...] for t in tensors]).
        Ties in score go to the lower index.
    """
    if resolve_impl("select_and_gather", impl, getattr(scores, "device", torch.device("cpu"))) == "triton":
        return select_and_gather_triton(scores, k, valid_len=valid_len, tensors=tensors)
    return select_and_gather_reference(scores, k, valid_len=valid_len, tensors=tensors)
