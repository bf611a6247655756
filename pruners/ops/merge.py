"""``merge_tokens``: weighted scatter-mean of tokens into target slots.

Why: VisionZip's contextual tokens, VFlowOpt's recycled tokens, Recoverable Compression's clusters
and PruMerge all fold dropped tokens into a few merged tokens by a (weighted) average. One op fixes
the arithmetic (fp32 accumulation, empty targets -> 0) for all of them.

Semantics (the reference below is the ground truth):
    out[b, t] = sum_{j: assign[b, j] = t} w[b, j] * x[b, j] / sum_{j: assign[b, j] = t} w[b, j]
with w = 1 when ``weights`` is None. ``assign = -1`` means "not merged". A target with no member,
or whose member weights sum to 0, is all zeros. Output dtype = x.dtype; accumulation is fp32.

Triton path: deterministic (no atomics). One program per (target block, feature block, sample)
streams the token blocks and accumulates ``onehot(assign) * w`` [targets, tokens] @ x [tokens,
features] with ``tl.dot`` in fp32 (``input_precision="ieee"``), plus the weight sums, then divides.
x is read once per block of 32 targets, so the cost is one pass over x for the usual few dozen
targets.
"""

from __future__ import annotations

import torch

from pruners.ops._dispatch import HAS_TRITON, next_pow2, resolve_impl, tl, triton

__all__ = ["merge_tokens", "merge_tokens_reference", "merge_tokens_triton"]


def _check_inputs(x, assign, num_targets, weights) -> int:
    """Validate shapes, dtypes and value ranges; return num_targets as int."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor [B, N, D], got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    B, N, _ = x.shape
    if isinstance(num_targets, torch.Tensor):
        num_targets = int(num_targets)
    if isinstance(num_targets, bool) or not isinstance(num_targets, int) or num_targets < 0:
        raise ValueError(f"num_targets must be a non-negative int, got {num_targets!r}")
    if (not isinstance(assign, torch.Tensor) or assign.shape != (B, N) or assign.is_floating_point()
            or assign.dtype == torch.bool):
        raise ValueError(f"assign must be an integer tensor [B, N]=({B}, {N}), got "
                         f"{getattr(assign, 'dtype', type(assign))} {tuple(getattr(assign, 'shape', ()))}")
    if assign.device != x.device:
        raise ValueError(f"assign is on {assign.device} but x is on {x.device}")
    if assign.numel():
        lo, hi = int(assign.min()), int(assign.max())
        if lo < -1 or hi >= num_targets:
            raise ValueError(
                f"assign values must be -1 (not merged) or a target in 0..num_targets-1={num_targets - 1}, "
                f"got values in [{lo}, {hi}]"
            )
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.shape != (B, N) or not weights.is_floating_point():
            raise ValueError(f"weights must be a floating-point tensor [B, N]=({B}, {N}), got "
                             f"{getattr(weights, 'dtype', type(weights))} {tuple(getattr(weights, 'shape', ()))}")
        if weights.device != x.device:
            raise ValueError(f"weights are on {weights.device} but x is on {x.device}")
        if weights.numel() and bool((weights < 0).any()):
            raise ValueError("weights must be >= 0 (they are averaging weights)")
    return num_targets


def merge_tokens_reference(
    x: torch.Tensor,
    assign: torch.Tensor,
    num_targets: int,
    *,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact PyTorch ``merge_tokens`` via fp32 scatter-add of weighted tokens and of weights."""
    T = _check_inputs(x, assign, num_targets, weights)
    B, N, D = x.shape
    member = assign >= 0  # [B, N]
    w = torch.ones(B, N, device=x.device) if weights is None else weights.float()
    w = torch.where(member, w, 0.0)  # [B, N] non-members contribute nothing
    tgt = assign.clamp(min=0).long()  # [B, N] (non-members point at 0 with weight 0)
    num = torch.zeros(B, T + 1, D, dtype=torch.float32, device=x.device)  # [B, T(+1 spare), D]
    den = torch.zeros(B, T + 1, dtype=torch.float32, device=x.device)  # [B, T(+1 spare)]
    tgt = torch.where(member, tgt, T)  # non-members go to the spare slot, dropped below
    num.scatter_add_(1, tgt[..., None].expand(B, N, D), x.float() * w[..., None])
    den.scatter_add_(1, tgt, w)
    num, den = num[:, :T], den[:, :T]
    out = torch.where(den[..., None] > 0, num / den.clamp(min=torch.finfo(torch.float32).tiny)[..., None], 0.0)
    return out.to(x.dtype)  # [B, T, D]


if HAS_TRITON:

    @triton.jit
    def _merge_kernel(
        x_ptr, a_ptr, w_ptr, out_ptr, N, D, T,
        s_xb, s_xn, s_xd, s_ab, s_an, s_wb, s_wn, s_ob, s_ot, s_od,
        HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out[b, t, d] for a block of targets t and features d: (onehot * w) @ x / sum w."""
        pid_t = tl.program_id(0)
        pid_d = tl.program_id(1)
        b = tl.program_id(2)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        vd = offs_d < D
        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        den = tl.zeros([BLOCK_T], tl.float32)
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            vn = offs_n < N
            a = tl.load(a_ptr + b * s_ab + offs_n * s_an, mask=vn, other=-1)
            w = tl.full([BLOCK_N], 1.0, tl.float32)
            if HAS_W:
                w = tl.load(w_ptr + b * s_wb + offs_n * s_wn, mask=vn, other=0.0).to(tl.float32)
            sel = (a[None, :] == offs_t[:, None]) & vn[None, :]  # [BLOCK_T, BLOCK_N]
            ow = tl.where(sel, w[None, :], 0.0)
            xb = tl.load(
                x_ptr + b * s_xb + offs_n[:, None] * s_xn + offs_d[None, :] * s_xd,
                mask=vn[:, None] & vd[None, :], other=0.0,
            ).to(tl.float32)  # [BLOCK_N, BLOCK_D]
            acc += tl.dot(ow, xb, input_precision="ieee")
            den += tl.sum(ow, 1)
        has = den > 0.0
        inv = tl.where(has, 1.0 / tl.where(has, den, 1.0), 0.0)
        res = acc * inv[:, None]
        tl.store(
            out_ptr + b * s_ob + offs_t[:, None] * s_ot + offs_d[None, :] * s_od,
            res.to(out_ptr.dtype.element_ty), mask=(offs_t < T)[:, None] & vd[None, :],
        )


def merge_tokens_triton(
    x: torch.Tensor,
    assign: torch.Tensor,
    num_targets: int,
    *,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton ``merge_tokens`` (CUDA tensors, or CPU under TRITON_INTERPRET=1); same contract."""
    if not HAS_TRITON:
        raise ValueError("merge_tokens: impl='triton' needs the triton package")
    T = _check_inputs(x, assign, num_targets, weights)
    B, N, D = x.shape
    out = torch.empty(B, T, D, dtype=x.dtype, device=x.device)  # [B, T, D]
    if out.numel() == 0:
        return out
    if N == 0:
        return out.zero_()
    w = weights if weights is not None else assign  # dummy pointer when absent
    BLOCK_T = min(next_pow2(T, 16), 32)
    BLOCK_D = min(next_pow2(D, 16), 64)
    BLOCK_N = min(next_pow2(N, 16), 32)
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D), B)
    _merge_kernel[grid](
        x, assign, w, out, N, D, T,
        *x.stride(), *assign.stride(), *w.stride(), *out.stride(),
        HAS_W=weights is not None, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )
    return out


def merge_tokens(
    x: torch.Tensor,
    assign: torch.Tensor,
    num_targets: int,
    *,
    weights: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Weighted mean of the tokens assigned to each target.

    Args:
        x: [B, N, D] tokens (any float dtype).
        assign: [B, N] integer target of each token in 0..num_targets-1, or -1 = not merged.
        num_targets: number of output slots T.
        weights: [B, N] >= 0 averaging weights; None = 1 for every token.
        impl: "auto" | "reference" | "triton" (see ``pruners.ops._dispatch``).

    Returns:
        [B, T, D] in x.dtype (fp32 accumulation). Targets with no member or zero total weight are 0.
    """
    if resolve_impl("merge_tokens", impl, getattr(x, "device", torch.device("cpu"))) == "triton":
        return merge_tokens_triton(x, assign, num_targets, weights=weights)
    return merge_tokens_reference(x, assign, num_targets, weights=weights)
