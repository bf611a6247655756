"""``transition_variation``: TransPrune's Token Transition Variation (TTV) of one sub-layer.

Why: TransPrune scores tokens by how much each attention/MLP sub-layer changes them, with no
attention map at all. Per sub-layer, x = its input after the RMSNorm, y = its output (the residual
update before it is added), both [B, N, D]:

    magnitude_j = ||y_j|| / (||x_j|| + eps)
    cos_j       = (x_j . y_j) / max(||x_j|| * ||y_j||, eps)
    direction   = softmax over the valid tokens j of (1 - cos_j)
    TTV_j       = magnitude_j * direction_j          (0 at masked positions)

The layer TTV is the sum over its two sub-layers; the pruner accumulates it over layers (see the
TransPrune spec). The reference below is the ground truth. A sample with no valid token is all 0.

Triton path: kernel 1 (one program per token block and sample) streams D once and accumulates
x.x, y.y and x.y in fp32, writing magnitude and 1 - cos; kernel 2 (one program per sample) does the
masked softmax over tokens online (running max and sum) and multiplies by the magnitude. x and y
are read exactly once.
"""

from __future__ import annotations

import torch

from pruners.ops._dispatch import HAS_TRITON, next_pow2, resolve_impl, tl, triton

__all__ = ["transition_variation", "transition_variation_reference", "transition_variation_triton"]


def _check_inputs(x, y, mask, eps) -> float:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor [B, N, D], got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    if x.shape != y.shape or x.device != y.device:
        raise ValueError(f"x and y must have the same shape and device, got {tuple(x.shape)} on {x.device} "
                         f"and {tuple(y.shape)} on {y.device}")
    B, N, _ = x.shape
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != (B, N) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor [B, N]=({B}, {N}), got "
                         f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}")
    if mask is not None and mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return eps


def transition_variation_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Exact PyTorch TTV (fp32): [B, N]."""
    eps = _check_inputs(x, y, mask, eps)
    xf, yf = x.float(), y.float()  # [B, N, D]
    nx = (xf * xf).sum(-1).sqrt()  # [B, N]
    ny = (yf * yf).sum(-1).sqrt()  # [B, N]
    cos = (xf * yf).sum(-1) / (nx * ny).clamp(min=eps)  # [B, N]
    magnitude = ny / (nx + eps)  # [B, N]
    z = 1.0 - cos  # [B, N]
    if mask is None:
        mask = torch.ones_like(z, dtype=torch.bool)
    direction = torch.softmax(z.masked_fill(~mask, float("-inf")), dim=1)  # NaN for all-masked samples
    return torch.where(mask, magnitude * direction, 0.0)  # [B, N]


if HAS_TRITON:

    @triton.jit
    def _ttv_token_kernel(
        x_ptr, y_ptr, mask_ptr, mag_ptr, z_ptr, N, D, eps,
        s_xb, s_xn, s_xd, s_yb, s_yn, s_yd, s_mb, s_mn,
        HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Per token: magnitude ||y||/(||x||+eps) and z = 1 - cos (-inf where masked)."""
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        vn = offs_n < N
        sxx = tl.zeros([BLOCK_N], tl.float32)
        syy = tl.zeros([BLOCK_N], tl.float32)
        sxy = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, D, BLOCK_D):
            offs_d = start + tl.arange(0, BLOCK_D)
            m = vn[:, None] & (offs_d < D)[None, :]
            xb = tl.load(x_ptr + b * s_xb + offs_n[:, None] * s_xn + offs_d[None, :] * s_xd, mask=m, other=0.0)
            yb = tl.load(y_ptr + b * s_yb + offs_n[:, None] * s_yn + offs_d[None, :] * s_yd, mask=m, other=0.0)
            xb = xb.to(tl.float32)
            yb = yb.to(tl.float32)
            sxx += tl.sum(xb * xb, 1)
            syy += tl.sum(yb * yb, 1)
            sxy += tl.sum(xb * yb, 1)
        nx = tl.sqrt(sxx)
        ny = tl.sqrt(syy)
        cos = sxy / tl.maximum(nx * ny, eps)
        z = 1.0 - cos
        ok = vn
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + b * s_mb + offs_n * s_mn, mask=vn, other=0) != 0)
        tl.store(mag_ptr + b * N + offs_n, ny / (nx + eps), mask=vn)
        tl.store(z_ptr + b * N + offs_n, tl.where(ok, z, float("-inf")), mask=vn)

    @triton.jit
    def _ttv_softmax_kernel(mag_ptr, z_ptr, out_ptr, N, s_ob, s_on, BLOCK_N: tl.constexpr):
        """One program per sample: out = magnitude * softmax over tokens of z (masked = -inf -> 0)."""
        b = tl.program_id(0)
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.zeros([], tl.float32)
        for start in range(0, N, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            z = tl.load(z_ptr + b * N + offs, mask=offs < N, other=float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(z - m_safe), 0)
            m_i = m_new
        has = l_i > 0.0
        m_safe = tl.where(has, m_i, 0.0)
        inv = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)
        for start in range(0, N, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            vn = offs < N
            z = tl.load(z_ptr + b * N + offs, mask=vn, other=float("-inf"))
            mag = tl.load(mag_ptr + b * N + offs, mask=vn, other=0.0)
            p = tl.exp(z - m_safe) * inv
            tl.store(out_ptr + b * s_ob + offs * s_on, tl.where(z == float("-inf"), 0.0, mag * p), mask=vn)


def transition_variation_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Triton TTV (CUDA tensors, or CPU under TRITON_INTERPRET=1); same contract as the reference."""
    if not HAS_TRITON:
        raise ValueError("transition_variation: impl='triton' needs the triton package")
    eps = _check_inputs(x, y, mask, eps)
    B, N, D = x.shape
    out = torch.zeros(B, N, dtype=torch.float32, device=x.device)  # [B, N]
    if out.numel() == 0:
        return out
    mag = torch.empty(B, N, dtype=torch.float32, device=x.device)
    z = torch.empty(B, N, dtype=torch.float32, device=x.device)
    m = mask.to(torch.int8) if mask is not None else mag  # dummy pointer when absent
    s_m = m.stride() if mask is not None else (0, 0)
    BLOCK_N = min(next_pow2(N, 16), 16)
    BLOCK_D = min(next_pow2(D, 16), 256)
    _ttv_token_kernel[(triton.cdiv(N, BLOCK_N), B)](
        x, y, m, mag, z, N, D, eps, *x.stride(), *y.stride(), *s_m,
        HAS_MASK=mask is not None, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )
    _ttv_softmax_kernel[(B,)](mag, z, out, N, *out.stride(), BLOCK_N=min(next_pow2(N, 16), 1024))
    return out


def transition_variation(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    impl: str = "auto",
) -> torch.Tensor:
    """TransPrune's TTV of one sub-layer: ||y||/(||x||+eps) * softmax_tokens(1 - cos(x, y)).

    Args:
        x: [B, N, D] sub-layer input after its norm. y: [B, N, D] sub-layer output (residual update).
        mask: [B, N] bool, True = token takes part in the softmax (padding False). None = all.
        eps: guards both divisions (see the module docstring for the exact formula).
        impl: "auto" | "reference" | "triton" (see ``pruners.ops._dispatch``).

    Returns:
        [B, N] float32, 0 at masked positions (and for samples with no valid token).
    """
    if resolve_impl("transition_variation", impl, getattr(x, "device", torch.device("cpu"))) == "triton":
        return transition_variation_triton(x, y, mask=mask, eps=eps)
    return transition_variation_reference(x, y, mask=mask, eps=eps)
