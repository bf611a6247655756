"""``pruners.ops.attention_rows``: the reference against full attention maps, the Triton kernel
(in Triton's CPU interpreter, in a subprocess) against the reference, and the input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pruners.ops import attention_rows
from pruners.ops.attention import attention_rows_reference
from tests._ops_interp import DTYPES, interpreter_suite


def make_inputs(B=2, Hq=4, Hkv=2, Nq=3, Nk=37, D=24, dtype=torch.float32, seed=0, pad=(0, 5), causal=True,
                span=True, non_contiguous=False):
    """Random q/k with left padding ``pad[b]`` per sample, causal query positions and a per-sample span."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    if non_contiguous:  # [B, N, H, D] storage viewed as [B, H, N, D], as q_proj(x).view().transpose() gives
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
    kw = {}
    if pad is not None:
        key_mask = torch.ones(B, Nk, dtype=torch.bool)
        for b in range(B):
            key_mask[b, : pad[b % len(pad)]] = False
        kw["key_mask"] = key_mask
    if causal:
        qp = torch.randint(0, Nk, (B, Nq), generator=g)
        qp[:, -1] = Nk - 1  # the last token sees everything
        kw["query_pos"] = qp
    if span:
        kw["key_start"] = torch.tensor([(2 + 3 * b) % 7 for b in range(B)])
        kw["key_len"] = Nk - 8
    return q, k, kw


# ---------------------------------------------------------------------------------------------
# the reference is pinned to the full attention map
# ---------------------------------------------------------------------------------------------
def full_map_rows(q_all, k, key_mask, query_pos, key_start, key_len, scale):
    """Naive: the whole [B, Hq, Nk, Nk] causal+padding attention map in float64, then pick rows/cols."""
    B, Hq, Nk, D = q_all.shape
    G = Hq // k.shape[1]
    kk = k.double().repeat_interleave(G, dim=1)  # [B, Hq, Nk, D]
    logits = q_all.double() @ kk.transpose(-1, -2) * scale  # [B, Hq, Nk, Nk]
    i = torch.arange(Nk)
    allowed = (i[None, :] <= i[:, None])[None] & key_mask[:, None, :]  # [B, Nk(query), Nk(key)]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    A = torch.softmax(logits, -1).nan_to_num(0.0).mean(1)  # [B, Nk, Nk] head mean
    out = []
    for b in range(B):
        rows = A[b, query_pos[b]]  # [Nq, Nk]
        out.append(rows[:, int(key_start[b]) : int(key_start[b]) + key_len])
    return torch.stack(out)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("Nk,D", [(29, 16), (40, 24)])
def test_reference_equals_rows_of_full_attention_map(Hq, Hkv, Nk, D):
    g = torch.Generator().manual_seed(1)
    B, Nq = 3, 4
    q_all = torch.randn(B, Hq, Nk, D, generator=g)  # queries at every position
    k = torch.randn(B, Hkv, Nk, D, generator=g)
    key_mask = torch.ones(B, Nk, dtype=torch.bool)
    key_mask[1, :4] = False  # left padding, different per sample
    key_mask[2, :9] = False
    query_pos = torch.stack([torch.randperm(Nk, generator=g)[:Nq] for _ in range(B)])
    query_pos[2, 0] = 3  # a padding query: no allowed key -> zero row
    key_start = torch.tensor([0, 5, 11])
    key_len = Nk - 12
    q = torch.stack([q_all[b][:, query_pos[b]] for b in range(B)])  # [B, Hq, Nq, D]
    scale = 0.3
    got = attention_rows_reference(
        q, k, key_mask=key_mask, query_pos=query_pos, key_start=key_start, key_len=key_len, scale=scale
    )
    want = full_map_rows(q_all, k, key_mask, query_pos, key_start, key_len, scale)
    assert got.shape == (B, Nq, key_len) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert got[2, 0].abs().sum() == 0


def test_reference_equals_sdpa_weights_with_gqa_and_padding():
    """Independent check with PyTorch's SDPA: attention against one-hot values returns the weights."""
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, Nq, Nk, D = 2, 8, 2, 5, 23, 32
    q = torch.randn(B, Hq, Nq, D, generator=g)
    k = torch.randn(B, Hkv, Nk, D, generator=g)
    key_mask = torch.ones(B, Nk, dtype=torch.bool)
    key_mask[0, :6] = False
    query_pos = torch.tensor([[6, 10, 15, 20, 22], [0, 3, 11, 19, 22]])
    allowed = key_mask[:, None, :] & (torch.arange(Nk)[None, None, :] <= query_pos[:, :, None])  # [B, Nq, Nk]
    eye = torch.eye(Nk).expand(B, Hkv, Nk, Nk)  # value j = e_j: output = attention weights
    w = F.scaled_dot_product_attention(q, k, eye, attn_mask=allowed[:, None], enable_gqa=True)  # [B, Hq, Nq, Nk]
    want = w.mean(1)
    got = attention_rows_reference(q, k, key_mask=key_mask, query_pos=query_pos)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(B, Nq))  # a full row sums to 1


def test_reference_no_causal_is_vit_cls_row():
    q, k, _ = make_inputs(B=1, Hq=3, Hkv=3, Nq=1, Nk=10, D=8, pad=None, causal=False, span=False)
    got = attention_rows(q, k, impl="reference")
    want = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(8), -1).mean(1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_memory_is_linear_in_keys(dtype):
    """Peak extra memory of the reference (1 query row) is O(H x N) (+ one key head upcast), not O(N^2)."""
    from benchmarks.perf.memory import LiveTensorBytes

    B, H, D = 1, 4, 16
    peaks = {}
    for Nk in (256, 1024):
        q, k, kw = make_inputs(B=B, Hq=H, Hkv=H, Nq=1, Nk=Nk, D=D, dtype=dtype, pad=(3,), span=False)
        with torch.inference_mode(), LiveTensorBytes((q, k, *kw.values())) as m:
            attention_rows(q, k, impl="reference", **kw)
        peaks[Nk] = m.peak_bytes
        assert m.peak_bytes <= 6 * B * H * Nk * 4 + B * Nk * D * 4, m.peak_bytes  # a few [B, H, 1, Nk] fp32
        assert m.peak_bytes < B * H * Nk * Nk * 4 / 20  # far below one full map
    assert peaks[1024] < 4.5 * peaks[256]  # linear in Nk


def test_live_tensor_bytes_tracks_peak_not_total():
    """The tracker the memory figures rely on: frees are seen, views are not double-counted."""
    from benchmarks.perf.memory import LiveTensorBytes

    x = torch.ones(1000)
    with LiveTensorBytes((x,)) as m:
        a = torch.zeros(250_000)  # 1 MB
        v = a.view(500, 500)  # same storage
        del a, v
        b = torch.zeros(125_000)  # 0.5 MB, after the first is freed
        y = x.view(10, 100)  # a view of an input: not new memory
    assert m.peak_bytes == 1_000_000
    assert m.current_bytes == 500_000
    del b, y


# ---------------------------------------------------------------------------------------------
# input checks and dispatch
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    q, k, _ = make_inputs(pad=None, causal=False, span=False)
    with pytest.raises(ValueError, match="multiple of the number of key heads"):
        attention_rows(q[:, :3], k)
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        attention_rows(q, k, key_mask=torch.ones(2, 37))
    with pytest.raises(ValueError, match="query_pos must be an integer tensor"):
        attention_rows(q, k, query_pos=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="key_start \\+ key_len must lie in 0..Nk=37"):
        attention_rows(q, k, key_start=torch.tensor([0, 30]), key_len=10)
    with pytest.raises(ValueError, match="key_start needs key_len"):
        attention_rows(q, k, key_start=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="impl must be one of"):
        attention_rows(q, k, impl="cuda")


def test_dispatch_env_var(monkeypatch):
    q, k, _ = make_inputs(pad=None, causal=False, span=False)
    monkeypatch.setenv("PRUNEBENCH_OPS", "reference")
    torch.testing.assert_close(attention_rows(q, k), attention_rows_reference(q, k))
    monkeypatch.setenv("PRUNEBENCH_OPS", "bogus")
    with pytest.raises(ValueError, match="PRUNEBENCH_OPS must be one of"):
        attention_rows(q, k)
    from pruners.ops import _dispatch

    if _dispatch.HAS_TRITON and not _dispatch.INTERPRET:
        monkeypatch.setenv("PRUNEBENCH_OPS", "triton")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            attention_rows(q, k)  # CPU tensors, compiled kernels: refused, not silently replaced


# ---------------------------------------------------------------------------------------------
# Triton kernel == reference (interpreter subprocess)
# ---------------------------------------------------------------------------------------------
INTERP_CASES = {
    **{
        f"gqa_pad_causal_span_{n}": dict(dtype=n, block_n=16)  # 3 key blocks, 2 sample lengths, GQA 4:2
        for n in DTYPES
    },
    "vit_cls_no_mask_fp32": dict(dtype="fp32", B=1, Hq=3, Hkv=3, Nq=1, Nk=50, D=64, pad=None, causal=False,
                                 span=False),
    "mqa_two_query_blocks_padding_query_fp32": dict(dtype="fp32", B=2, Hq=4, Hkv=1, Nq=17, Nk=21, D=8,
                                                    pad=(3, 0), zero_row=True),
    "strided_inputs_fp16": dict(dtype="fp16", B=2, Hq=2, Hkv=1, Nq=2, Nk=19, D=40, non_contiguous=True),
}


def _check(params: dict) -> None:
    p = dict(params)
    dtype = DTYPES[p.pop("dtype")]
    block_n = p.pop("block_n", 64)
    zero_row = p.pop("zero_row", False)
    q, k, kw = make_inputs(dtype=dtype, **p)
    if zero_row:
        kw["query_pos"][0, 0] = 1  # inside sample 0's padding: no allowed key
    from pruners.ops.attention import attention_rows_triton

    got = attention_rows_triton(q, k, block_n=block_n, **kw)
    want = attention_rows_reference(q, k, **kw)
    # both paths upcast the inputs exactly and accumulate in fp32: tight for every input dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.dtype == torch.float32
    if zero_row:
        assert got[0, 0].abs().sum() == 0
    # the public function with impl="triton" goes to the kernel too (default key block size)
    torch.testing.assert_close(attention_rows(q, k, impl="triton", **kw), want, rtol=1e-5, atol=1e-6)


# interpreter_results() runs in the TRITON_INTERPRET=1 subprocess; interp + the test compare in pytest.
interpreter_results, interp, test_triton_kernel_matches_reference = interpreter_suite(__file__, INTERP_CASES, _check)
