"""``pruners.ops.select_and_gather``: the reference against a naive per-sample sort, the Triton
kernels (in Triton's CPU interpreter, in a subprocess) against the reference (bit-exact), and the
input checks."""

from __future__ import annotations

import pytest
import torch

from pruners.ops import select_and_gather
from pruners.ops.select import select_and_gather_reference
from tests._ops_interp import DTYPES, interpreter_suite


def naive_topk(scores: torch.Tensor, k: int, valid_len: list[int]) -> torch.Tensor:
    """Python sort per sample by (-score, index) over the valid prefix, then ascending indices."""
    out = []
    for b, n in enumerate(valid_len):
        s = scores[b].float().tolist()
        best = sorted(range(n), key=lambda i: (-s[i], i))[:k]
        out.append(sorted(best))
    return torch.tensor(out, dtype=torch.long).view(len(valid_len), k)


def make_scores(B, N, dtype, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: most of the ranking is decided by the tie rule
        s = torch.randint(-3, 4, (B, N), generator=g).float()
        s[0, 1] = float("-inf")
        s[0, 2] = -0.0  # equal to +0.0
    else:
        s = torch.randn(B, N, generator=g)
    return s.to(dtype)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("B,N,k,vl", [(1, 9, 3, None), (3, 41, 7, [41, 30, 7]), (2, 16, 16, None)])
def test_reference_equals_naive_sort(B, N, k, vl, ties):
    s = make_scores(B, N, torch.float32, seed=N, ties=ties)
    valid_len = torch.tensor(vl) if vl is not None else None
    idx, _ = select_and_gather_reference(s, k, valid_len=valid_len)
    assert torch.equal(idx, naive_topk(s, k, vl if vl is not None else [N] * B))


def test_gather_semantics_and_broadcast():
    B, N, k = 2, 11, 4
    s = make_scores(B, N, torch.float32, seed=0)
    h = torch.randn(B, N, 3, 2)
    pos = torch.arange(N).expand(B, N)
    cos = torch.randn(1, N, 5)  # one copy for the batch, as RoPE tables often are
    idx, (hg, pg, cg) = select_and_gather(s, k, tensors=(h, pos, cos), impl="reference")
    for b in range(B):
        assert torch.equal(hg[b], h[b, idx[b]])
        assert torch.equal(pg[b], idx[b])
        assert torch.equal(cg[b], cos[0, idx[b]])
    assert (idx.diff(dim=1) > 0).all()  # original order


def test_bad_inputs_raise_clear_errors():
    s = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"k=6 exceeds the smallest valid_len \(5\)"):
        select_and_gather(s, 6, valid_len=torch.tensor([10, 5]))
    with pytest.raises(ValueError, match="k must be an int in 0..N=10"):
        select_and_gather(s, 11)
    with pytest.raises(ValueError, match="valid_len must lie in 0..N=10"):
        select_and_gather(s, 2, valid_len=torch.tensor([12, 5]))
    with pytest.raises(ValueError, match="NaN"):
        select_and_gather(torch.tensor([[0.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match=r"tensors\[0\] must have shape \[B, N, ...\]"):
        select_and_gather(s, 2, tensors=(torch.randn(2, 9),))


# ---------------------------------------------------------------------------------------------
# Triton kernels == reference (interpreter subprocess), exactly
# ---------------------------------------------------------------------------------------------
INTERP_CASES = {
    **{f"ties_valid_len_multiblock_{n}": dict(dtype=n, B=3, N=37, k=6, vl=[37, 20, 6], ties=True, block=16)
       for n in DTYPES},
    "random_odd_fp16": dict(dtype="fp16", B=2, N=77, k=13, vl=None, ties=False, block=1024),
    "keep_all_valid_fp32": dict(dtype="fp32", B=2, N=13, k=9, vl=[13, 9], ties=True, block=1024),
    "strided_scores_fp32": dict(dtype="fp32", B=2, N=21, k=5, vl=None, ties=False, block=16, transpose=True),
}


def _check(params: dict) -> None:
    from pruners.ops.select import select_and_gather_triton

    p = dict(params)
    dtype = DTYPES[p["dtype"]]
    B, N, k = p["B"], p["N"], p["k"]
    s = make_scores(B, N, dtype, seed=N, ties=p["ties"])
    if p.get("transpose"):
        s = s.t().contiguous().t()  # non-unit stride along N
    valid_len = torch.tensor(p["vl"]) if p["vl"] is not None else None
    g = torch.Generator().manual_seed(1)
    tensors = (
        torch.randn(B, N, 5, generator=g).to(dtype),  # hidden states, odd width
        torch.arange(N).expand(B, N),  # position ids (long, stride-0 batch)
        torch.randn(1, N, 3, 2, generator=g),  # broadcast side tensor, 2 trailing dims
        torch.rand(B, N, generator=g) > 0.5,  # bool
        torch.randn(B, 2 * N, 4, generator=g)[:, ::2],  # strided along N
    )
    idx_t, got = select_and_gather_triton(s, k, valid_len=valid_len, tensors=tensors, block=p["block"])
    idx_r, want = select_and_gather_reference(s, k, valid_len=valid_len, tensors=tensors)
    assert torch.equal(idx_t, idx_r), f"{idx_t} != {idx_r}"
    assert torch.equal(idx_r, naive_topk(s, k, p["vl"] if p["vl"] is not None else [N] * B))
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"tensors[{i}]: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert torch.equal(a, b), f"tensors[{i}] differs"
    idx_p, _ = select_and_gather(s, k, valid_len=valid_len, impl="triton")
    assert torch.equal(idx_p, idx_r)


# interpreter_results() runs in the TRITON_INTERPRET=1 subprocess; interp + the test compare in pytest.
interpreter_results, interp, test_triton_kernel_matches_reference = interpreter_suite(__file__, INTERP_CASES, _check)
