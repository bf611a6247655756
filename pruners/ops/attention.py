"""``attention_rows``: head-averaged softmax attention of a few query rows, without the N x N map.

Why: FastV, PDrop, TransPrune's IGA, FlowCut, VisionZip and FasterVLM score visual tokens by the
attention that one or a few queries (the last token, the instruction tokens, the ViT [CLS]) pay to
them. Asking the model for ``output_attentions`` would force eager attention in every layer and
materialise [B, H, N, N]; instead the pruner recomputes just those rows from the layer's q and k.

Semantics (the reference below is the ground truth):
- q: [B, Hq, Nq, D] the query rows only (RoPE applied); k: [B, Hkv, Nk, D] all keys. Grouped-query
  attention: query head h reads key head h // (Hq // Hkv).
- A key j is allowed for query i of sample b iff key_mask[b, j] (real token, not padding) and, when
  query_pos is given, j <= query_pos[b, i] (causal). The softmax runs over ALL allowed keys, as the
  model's own attention normalises, and only then are the columns of the span
  [key_start[b], key_start[b] + key_len) returned, averaged over the Hq query heads.
- A query with no allowed key at all (e.g. a padding row) gets an all-zero row instead of NaN, so
  callers can weight such rows by 0.

Triton path: two kernels in the flash-attention style. Pass 1 streams the key blocks once per
(sample, head, query block) and keeps only the running max and normaliser of the softmax (online
softmax). Pass 2 recomputes the logits of the span columns only, normalises them with the pass-1
statistics and sums over heads inside the program (no atomics, deterministic). Extra memory is
O(B * H * Nq) floats besides the output. Inputs of any float dtype are upcast to fp32 in-kernel
before ``tl.dot`` (exact products, fp32 accumulation; also required by the Triton interpreter, whose
bf16 ``tl.dot`` is wrong), and fp32 dots use ``input_precision="ieee"`` (no TF32) so the kernel
ranks tokens like the reference does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pruners.ops._dispatch import HAS_TRITON, next_pow2, resolve_impl, tl, triton

__all__ = ["attention_rows", "attention_rows_reference", "attention_rows_triton"]


# ---------------------------------------------------------------------------------------------
# validation shared by both paths
# ---------------------------------------------------------------------------------------------
def _check_inputs(q, k, key_mask, query_pos, key_start, key_len, scale):
    """Validate shapes/dtypes; return (key_start [B] long on q.device, key_len int, scale float)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [B, Hq, Nq, D], got {getattr(q, 'shape', type(q))}")
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"k must be a 4-D tensor [B, Hkv, Nk, D], got {getattr(k, 'shape', type(k))}")
    if not (q.is_floating_point() and k.is_floating_point()):
        raise ValueError(f"q and k must be floating point, got {q.dtype} and {k.dtype}")
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"q [B, Hq, Nq, D]={tuple(q.shape)} and k [B, Hkv, Nk, D]={tuple(k.shape)} disagree on B or D")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the number of key heads ({Hkv})")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    if key_mask is not None:
        if key_mask.shape != (B, Nk) or key_mask.dtype != torch.bool:
            raise ValueError(
                f"key_mask must be a bool tensor [B, Nk]=({B}, {Nk}), got {key_mask.dtype} {tuple(key_mask.shape)}"
            )
    if query_pos is not None:
        if query_pos.shape != (B, Nq) or query_pos.is_floating_point() or query_pos.dtype == torch.bool:
            raise ValueError(
                f"query_pos must be an integer tensor [B, Nq]=({B}, {Nq}), got {query_pos.dtype} {tuple(query_pos.shape)}"
            )
    if key_len is None:
        if key_start is not None:
            raise ValueError("key_start needs key_len (the number of columns to return); pass both or neither")
        key_len = Nk
    if isinstance(key_len, torch.Tensor):
        key_len = int(key_len)
    if isinstance(key_len, bool) or not isinstance(key_len, int) or not 0 <= key_len <= Nk:
        raise ValueError(f"key_len must be an int in 0..Nk={Nk}, got {key_len!r}")
    if key_start is None:
        key_start = torch.zeros(B, dtype=torch.long, device=q.device)
    else:
        if key_start.shape != (B,) or key_start.is_floating_point() or key_start.dtype == torch.bool:
            raise ValueError(f"key_start must be an integer tensor [B]=({B},), got {key_start.dtype} {tuple(key_start.shape)}")
        key_start = key_start.to(device=q.device, dtype=torch.long)
        if B and (int(key_start.min()) < 0 or int(key_start.max()) + key_len > Nk):
            raise ValueError(
                f"key_start + key_len must lie in 0..Nk={Nk} for every sample, got key_start="
                f"{key_start.tolist()} with key_len={key_len}"
            )
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    return key_start, key_len, float(scale)


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------
def attention_rows_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
    key_len: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact PyTorch ``attention_rows`` (fp32). Extra memory O(B * Hq * Nq * Nk + B * Nk * D), never Nk x Nk."""
    key_start, key_len, scale = _check_inputs(q, k, key_mask, query_pos, key_start, key_len, scale)
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv  # query heads per key head
    qf = q.float().reshape(B, Hkv, G * Nq, D)  # [B, Hkv, G*Nq, D] (query head h = kv * G + g)
    logits = torch.empty(B, Hkv, G * Nq, Nk, dtype=torch.float32, device=q.device)  # [B, Hkv, G*Nq, Nk]
    for h in range(Hkv):  # one key head at a time: a half-precision k is upcast O(B*Nk*D) at a time
        logits[:, h] = torch.matmul(qf[:, h], k[:, h].float().transpose(-1, -2))  # [B, G*Nq, Nk]
    logits = (logits * scale).view(B, Hkv, G, Nq, Nk)  # [B, Hkv, G, Nq, Nk]

    allowed = torch.ones(B, Nq, Nk, dtype=torch.bool, device=q.device)  # [B, Nq, Nk]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
    if query_pos is not None:
        j = torch.arange(Nk, device=q.device)
        allowed = allowed & (j[None, None, :] <= query_pos.to(q.device)[:, :, None])
    allowed = allowed[:, None, None]  # [B, 1, 1, Nq, Nk]

    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [B, Hkv, G, Nq, Nk]; NaN on rows with no allowed key
    probs = torch.where(allowed.any(-1, keepdim=True), probs, 0.0)  # such rows -> 0
    rows = probs.mean(dim=(1, 2))  # [B, Nq, Nk] head mean over all Hq heads
    cols = key_start[:, None] + torch.arange(key_len, device=q.device)  # [B, key_len]
    return rows.gather(2, cols[:, None, :].expand(B, Nq, key_len)).contiguous()  # [B, Nq, key_len]


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _allowed(offs_m, offs_n, valid_n, b, kmask_ptr, s_kmb, s_kmn, qpos, HAS_KMASK: tl.constexpr,
                 HAS_QPOS: tl.constexpr):
        """[BLOCK_M, BLOCK_N] bool: key offs_n is allowed for query offs_m (padding + causal)."""
        ok = valid_n[None, :] & (offs_m[:, None] >= 0)
        if HAS_KMASK:
            km = tl.load(kmask_ptr + b * s_kmb + offs_n * s_kmn, mask=valid_n, other=0)
            ok = ok & (km != 0)[None, :]
        if HAS_QPOS:
            ok = ok & (offs_n[None, :] <= qpos[:, None])
        return ok

    @triton.jit
    def _attn_rows_stats_kernel(
        q_ptr, k_ptr, kmask_ptr, qpos_ptr, m_ptr, l_ptr,
        Nq, Nk, D, GROUP, scale,
        s_qb, s_qh, s_qn, s_qd,
        s_kb, s_kh, s_kn, s_kd,
        s_kmb, s_kmn, s_pb, s_pn,
        HAS_KMASK: tl.constexpr, HAS_QPOS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Pass 1, one program per (query block, query head, sample): softmax max m and sum l."""
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        kvh = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        valid_m = offs_m < Nq
        valid_d = offs_d < D
        q = tl.load(
            q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
            mask=valid_m[:, None] & valid_d[None, :], other=0.0,
        ).to(tl.float32)  # [BLOCK_M, BLOCK_D]
        hi = Nk
        qpos = offs_m  # placeholder when there is no causal limit
        if HAS_QPOS:
            qpos = tl.load(qpos_ptr + b * s_pb + offs_m * s_pn, mask=valid_m, other=-1).to(tl.int64)
            hi = tl.minimum(Nk, tl.max(qpos, 0) + 1)  # keys after the last query are never allowed
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            valid_n = offs_n < Nk
            kt = tl.load(
                k_ptr + b * s_kb + kvh * s_kh + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
                mask=valid_d[:, None] & valid_n[None, :], other=0.0,
            ).to(tl.float32)  # [BLOCK_D, BLOCK_N]
            s = tl.dot(q, kt, input_precision="ieee") * scale  # [BLOCK_M, BLOCK_N]
            ok = _allowed(offs_m, offs_n, valid_n, b, kmask_ptr, s_kmb, s_kmn, qpos, HAS_KMASK, HAS_QPOS)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        out = (b * tl.num_programs(1) + h) * Nq + offs_m
        tl.store(m_ptr + out, m_i, mask=valid_m)
        tl.store(l_ptr + out, l_i, mask=valid_m)

    @triton.jit
    def _attn_rows_probs_kernel(
        q_ptr, k_ptr, kmask_ptr, qpos_ptr, kstart_ptr, m_ptr, l_ptr, out_ptr,
        Nq, Nk, D, Hq, GROUP, key_len, scale,
        s_qb, s_qh, s_qn, s_qd,
        s_kb, s_kh, s_kn, s_kd,
        s_kmb, s_kmn, s_pb, s_pn,
        s_ob, s_on, s_oc,
        HAS_KMASK: tl.constexpr, HAS_QPOS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Pass 2, one program per (span column block, query block, sample): head-mean probabilities."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = tl.program_id(2)
        offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # column inside the span
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        valid_c = offs_c < key_len
        valid_m = offs_m < Nq
        valid_d = offs_d < D
        kstart = tl.load(kstart_ptr + b)
        offs_n = kstart + offs_c  # key index
        valid_n = valid_c & (offs_n < Nk)
        qpos = offs_m
        if HAS_QPOS:
            qpos = tl.load(qpos_ptr + b * s_pb + offs_m * s_pn, mask=valid_m, other=-1).to(tl.int64)
        ok = _allowed(offs_m, offs_n, valid_n, b, kmask_ptr, s_kmb, s_kmn, qpos, HAS_KMASK, HAS_QPOS)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for h in range(0, Hq):
            kvh = h // GROUP
            q = tl.load(
                q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                mask=valid_m[:, None] & valid_d[None, :], other=0.0,
            ).to(tl.float32)  # [BLOCK_M, BLOCK_D]
            kt = tl.load(
                k_ptr + b * s_kb + kvh * s_kh + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
                mask=valid_d[:, None] & valid_n[None, :], other=0.0,
            ).to(tl.float32)  # [BLOCK_D, BLOCK_N]
            s = tl.dot(q, kt, input_precision="ieee") * scale  # [BLOCK_M, BLOCK_N]
            stat = (b * Hq + h) * Nq + offs_m
            m = tl.load(m_ptr + stat, mask=valid_m, other=0.0)
            denom = tl.load(l_ptr + stat, mask=valid_m, other=0.0)
            has = denom > 0.0
            m = tl.where(has, m, 0.0)
            inv_l = tl.where(has, 1.0 / tl.where(has, denom, 1.0), 0.0)
            p = tl.exp(tl.where(ok, s, float("-inf")) - m[:, None]) * inv_l[:, None]
            acc += tl.where(ok, p, 0.0)
        acc = acc / Hq
        tl.store(
            out_ptr + b * s_ob + offs_m[:, None] * s_on + offs_c[None, :] * s_oc,
            acc, mask=valid_m[:, None] & valid_c[None, :],
        )


def attention_rows_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
    key_len: int | None = None,
    scale: float | None = None,
    block_n: int = 64,
) -> torch.Tensor:
    """Triton ``attention_rows`` (CUDA tensors, or CPU under TRITON_INTERPRET=1); same contract as the reference."""
    if not HAS_TRITON:
        raise ValueError("attention_rows: impl='triton' needs the triton package")
    key_start, key_len, scale = _check_inputs(q, k, key_mask, query_pos, key_start, key_len, scale)
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = torch.zeros(B, Nq, key_len, dtype=torch.float32, device=q.device)  # [B, Nq, key_len]
    if B == 0 or Nq == 0 or key_len == 0:
        return out
    m_buf = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)  # softmax max per row
    l_buf = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)  # softmax sum per row
    has_kmask, has_qpos = key_mask is not None, query_pos is not None
    kmask = key_mask.to(torch.int8) if has_kmask else m_buf  # dummy pointer when absent
    qpos = query_pos.to(device=q.device, dtype=torch.long) if has_qpos else key_start
    s_km = kmask.stride() if has_kmask else (0, 0)
    s_p = qpos.stride() if has_qpos else (0, 0)
    BLOCK_M = 16  # tl.dot needs >= 16 rows; Nq is usually 1..a few dozen
    BLOCK_N = next_pow2(block_n, 16)
    BLOCK_D = next_pow2(D, 16)
    G = Hq // Hkv
    _attn_rows_stats_kernel[(triton.cdiv(Nq, BLOCK_M), Hq, B)](
        q, k, kmask, qpos, m_buf, l_buf,
        Nq, Nk, D, G, scale,
        *q.stride(), *k.stride(), *s_km, *s_p,
        HAS_KMASK=has_kmask, HAS_QPOS=has_qpos, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )
    _attn_rows_probs_kernel[(triton.cdiv(key_len, BLOCK_N), triton.cdiv(Nq, BLOCK_M), B)](
        q, k, kmask, qpos, key_start, m_buf, l_buf, out,
        Nq, Nk, D, Hq, G, key_len, scale,
        *q.stride(), *k.stride(), *s_km, *s_p, *out.stride(),
        HAS_KMASK=has_kmask, HAS_QPOS=has_qpos, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )
    return out


# ---------------------------------------------------------------------------------------------
# public
# ---------------------------------------------------------------------------------------------
def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    key_start: torch.Tensor | None = None,
    key_len: int | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Head-mean softmax attention of the query rows ``q`` over keys ``k``, span columns only.

    Args:
        q: [B, Hq, Nq, D] query rows (RoPE applied). k: [B, Hkv, Nk, D] all keys; Hq % Hkv == 0 (GQA).
        key_mask: [B, Nk] bool, True = real key (padding False). None = every key is real.
        query_pos: [B, Nq] integer index of each query in the key sequence; key j is allowed iff
            j <= query_pos (causal). None = no causal limit (e.g. ViT [CLS]).
        key_start: [B] integer first returned column per sample; key_len: number of returned
            columns (int). Both None = all Nk keys.
        scale: logit scale; None = 1/sqrt(D).
        impl: "auto" | "reference" | "triton" (see ``pruners.ops._dispatch``).

    Returns:
        [B, Nq, key_len] float32: softmax over all allowed keys per head, averaged over the Hq
        heads, restricted to the span. Rows of queries with no allowed key are 0.
    """
    if resolve_impl("attention_rows", impl, q.device) == "triton":
        return attention_rows_triton(
            q, k, key_mask=key_mask, query_pos=query_pos, key_start=key_start, key_len=key_len, scale=scale
        )
    return attention_rows_reference(
        q, k, key_mask=key_mask, query_pos=query_pos, key_start=key_start, key_len=key_len, scale=scale
    )


def attention_rows_at(q: torch.Tensor, k: torch.Tensor, key_pos: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """`attention_rows` returned at the key positions ``key_pos`` [B, Nv] (sorted, distinct per row; e.g.
    the visual tokens of a sample): [B, Nq, Nv]. When every row's positions are one contiguous span it is
    the op's own span (``key_start``, ``key_len``); otherwise (a sample with several images, text between
    their runs) the rows over all keys, gathered at ``key_pos``: the same values, since each row is a
    softmax over all allowed keys either way. ``kwargs``: the op's other arguments."""
    n = key_pos.shape[1]
    if n == 0 or bool((key_pos[:, -1] - key_pos[:, 0] == n - 1).all()):
        return attention_rows(q, k, key_start=key_pos[:, 0] if n else None, key_len=n if n else None, **kwargs)
    rows = attention_rows(q, k, **kwargs)  # [B, Nq, Nk]
    return rows.gather(2, key_pos[:, None, :].expand(-1, rows.shape[1], -1))
