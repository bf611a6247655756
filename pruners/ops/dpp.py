"""``greedy_dpp``: greedy MAP inference of a determinantal point process (fast greedy, Chen et al. 2018).

Why: CDPruner (and any diversity-by-determinant method) picks the k tokens whose kernel sub-matrix
has the largest determinant, greedily: each step adds the token with the largest marginal gain
``log det(L_{S+j}) - log det(L_S)``. Chen, Zhang & Zhou (NeurIPS 2018, "Fast Greedy MAP Inference
for Determinantal Point Process") keep the Cholesky factor of ``L_S`` incrementally, so that gain is
a residual d_j^2 updated in O(N) per selected token: O(N k^2) in all, never a determinant.

Semantics (the reference below is the ground truth). ``kernel`` is [B, N, N], a symmetric PSD
matrix per sample (only row j of the selected token j is ever read), compared in fp32 (fp16/bf16
upcast exactly). Per sample, with d = diag(L) and no token taken:

    for i in 0..k-1:
        j      = argmax of d over the tokens not yet taken (ties: the lowest index)
        e      = (L[j, :] - sum_{t<i} c_t[j] * c_t) / sqrt(d_j)     (e = 0 when d_j <= 0)
        c_i    = e;   d <- max(d - e^2, 0);   token j taken

and the result is [B, k] long, the tokens in selection order (the first is the largest diagonal
entry). This is CDPruner's ``encode_images`` loop (Theia-4869/CDPruner, llava/model/llava_arch.py)
with two guards that only act once the kernel's numerical rank is used up (d_j <= 0, where their
loop takes the square root of a non-positive number and then returns NaN-driven, repeated picks):
residual gains are clamped at 0 and a token of gain 0 adds a zero factor row. A taken token is
never picked again, so the k indices are always distinct. NaN/inf kernels are refused.

Triton path: one program per sample. The residual gains d ([B, N] fp32) and the factor rows c
([B, k, N] fp32) live in scratch memory; each step finds the argmax in one streaming pass over
blocks of N (leftmost tie across and within blocks), then streams row j of the kernel once,
subtracting sum_t c_t[j] c_t block by block, and updates d. A barrier ends each step so the next
reads every lane's writes. The work is O(N k^2) per sample, as the reference.
"""

from __future__ import annotations

import torch

from pruners.ops._dispatch import HAS_TRITON, next_pow2, resolve_impl, tl, triton

__all__ = ["greedy_dpp", "greedy_dpp_reference", "greedy_dpp_triton"]


def _check_inputs(kernel, k) -> int:
    """Validate; return k as int."""
    if not isinstance(kernel, torch.Tensor) or kernel.dim() != 3 or not kernel.is_floating_point():
        raise ValueError(f"kernel must be a floating-point tensor [B, N, N], got {getattr(kernel, 'dtype', type(kernel))} "
                         f"{tuple(getattr(kernel, 'shape', ()))}")
    B, N, M = kernel.shape
    if N != M:
        raise ValueError(f"kernel must be square per sample, [B, N, N], got {tuple(kernel.shape)}")
    if isinstance(k, torch.Tensor):
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= N:
        raise ValueError(f"k must be an int in 0..N={N} (the number of tokens to select per sample), got {k!r}")
    if kernel.numel() and not bool(torch.isfinite(kernel).all()):
        raise ValueError("kernel contains NaN or inf; greedy DPP inference needs a finite PSD kernel")
    return k


def greedy_dpp_reference(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Exact PyTorch ``greedy_dpp`` (fp32, batched): [B, k] indices in selection order."""
    k = _check_inputs(kernel, k)
    B, N, _ = kernel.shape
    dev = kernel.device
    L = kernel.float()  # [B, N, N]
    gain = torch.diagonal(L, dim1=1, dim2=2).clone()  # [B, N] residual d_j^2 of each token
    factor = torch.zeros(B, k, N, dtype=torch.float32, device=dev)  # [B, k, N] rows c_t of the Cholesky factor
    taken = torch.zeros(B, N, dtype=torch.bool, device=dev)
    order = torch.empty(B, k, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)
    for i in range(k):
        j = gain.masked_fill(taken, float("-inf")).argmax(dim=1)  # [B] first maximum = lowest index
        order[:, i] = j
        dj = gain[rows, j]  # [B]
        cj = factor[rows, :i, j]  # [B, i]: c_t[j] for the earlier rows
        residual = L[rows, j] - torch.einsum("bt,btn->bn", cj, factor[:, :i])  # [B, N]
        ok = dj > 0
        e = torch.where(ok[:, None], residual / dj.clamp(min=torch.finfo(torch.float32).tiny).sqrt()[:, None], 0.0)
        factor[:, i] = e
        gain = (gain - e * e).clamp(min=0.0)
        taken[rows, j] = True
    return order


if HAS_TRITON:

    @triton.jit
    def _greedy_dpp_kernel(
        l_ptr, d_ptr, c_ptr, out_ptr, N, K,
        s_lb, s_ln, s_lm, s_db, s_cb, s_ck, s_ob,
        BLOCK: tl.constexpr,
    ):
        """One program per sample: k greedy steps over scratch gains d [N] and factor rows c [K, N]."""
        b = tl.program_id(0)
        lb = l_ptr + b * s_lb
        db = d_ptr + b * s_db
        cb = c_ptr + b * s_cb
        neg_inf = float("-inf")
        for start in range(0, N, BLOCK):  # gains start at the diagonal
            offs = start + tl.arange(0, BLOCK)
            m = offs < N
            diag = tl.load(lb + offs * s_ln + offs * s_lm, mask=m, other=0.0).to(tl.float32)
            tl.store(db + offs, diag, mask=m)
        tl.debug_barrier()
        for i in range(0, K):
            # argmax of the gains of tokens not taken (taken = -inf; the others are >= 0)
            best_v = tl.full([], neg_inf, tl.float32)
            best_j = tl.zeros([], tl.int32)
            for start in range(0, N, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                d = tl.load(db + offs, mask=offs < N, other=neg_inf)
                v, ix = tl.max(d, 0, return_indices=True, return_indices_tie_break_left=True)
                better = v > best_v  # strict: an earlier block wins a tie
                best_j = tl.where(better, (ix + start).to(tl.int32), best_j)
                best_v = tl.where(better, v, best_v)
            tl.store(out_ptr + b * s_ob + i, best_j.to(tl.int64))
            ok = best_v > 0.0
            root = tl.sqrt(tl.where(ok, best_v, 1.0))
            for start in range(0, N, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                m = offs < N
                acc = tl.load(lb + best_j * s_ln + offs * s_lm, mask=m, other=0.0).to(tl.float32)
                for t in range(0, i):
                    ctj = tl.load(cb + t * s_ck + best_j)
                    ct = tl.load(cb + t * s_ck + offs, mask=m, other=0.0)
                    acc -= ctj * ct
                e = tl.where(ok, acc / root, 0.0)
                tl.store(cb + i * s_ck + offs, e, mask=m)
                d = tl.load(db + offs, mask=m, other=neg_inf)
                upd = tl.maximum(d - e * e, 0.0)
                upd = tl.where((d == neg_inf) | (offs == best_j), neg_inf, upd)
                tl.store(db + offs, upd, mask=m)
            tl.debug_barrier()


def greedy_dpp_triton(kernel: torch.Tensor, k: int, *, block: int = 1024) -> torch.Tensor:
    """Triton ``greedy_dpp`` (CUDA tensors, or CPU under TRITON_INTERPRET=1); same contract."""
    if not HAS_TRITON:
        raise ValueError("greedy_dpp: impl='triton' needs the triton package")
    k = _check_inputs(kernel, k)
    B, N, _ = kernel.shape
    out = torch.empty(B, k, dtype=torch.long, device=kernel.device)  # [B, k]
    if B == 0 or k == 0:
        return out
    L = kernel if kernel.dtype in (torch.float32, torch.float16, torch.bfloat16) else kernel.float()
    gain = torch.empty(B, N, dtype=torch.float32, device=kernel.device)  # scratch residual gains
    factor = torch.empty(B, k, N, dtype=torch.float32, device=kernel.device)  # scratch factor rows
    _greedy_dpp_kernel[(B,)](
        L, gain, factor, out, N, k,
        L.stride(0), L.stride(1), L.stride(2), gain.stride(0), factor.stride(0), factor.stride(1), out.stride(0),
        BLOCK=min(next_pow2(block, 16), next_pow2(N, 16)),
    )
    return out


def greedy_dpp(kernel: torch.Tensor, k: int, *, impl: str = "auto") -> torch.Tensor:
    """Greedy MAP selection of ``k`` items of a DPP with kernel ``kernel``, per sample.

    Args:
        kernel: [B, N, N] symmetric PSD kernel per sample (any float dtype, compared in fp32; finite).
        k: items to select per sample, 0 <= k <= N (ValueError otherwise).
        impl: "auto" | "reference" | "triton" (see ``pruners.ops._dispatch``).

    Returns:
        [B, k] long: the selected indices in selection order (distinct; ties go to the lower index).
    """
    if resolve_impl("greedy_dpp", impl, getattr(kernel, "device", torch.device("cpu"))) == "triton":
        return greedy_dpp_triton(kernel, k)
    return greedy_dpp_reference(kernel, k)
