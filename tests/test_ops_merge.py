"""``pruners.ops.merge_tokens``: the reference against a naive per-target loop, the Triton kernel
(in Triton's CPU interpreter, in a subprocess) against the reference, and the input checks."""

from __future__ import annotations

import pytest
import torch

from pruners.ops import merge_tokens
from pruners.ops.merge import merge_tokens_reference
from tests._ops_interp import DTYPES, TOL, interpreter_suite


def make_inputs(B=2, N=45, D=70, T=37, dtype=torch.float32, seed=0, weighted=True, non_contiguous=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g).to(dtype)
    if non_contiguous:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    assign = torch.randint(-1, T, (B, N), generator=g)
    assign[:, :3] = -1  # some tokens not merged
    w = None
    if weighted:
        w = torch.rand(B, N, generator=g)
        w[assign == 0] = 0.0  # target 0: members with zero total weight -> 0
    return x, assign, T, w


def naive_merge(x, assign, T, w):
    B, N, D = x.shape
    out = torch.zeros(B, T, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            members = (assign[b] == t).nonzero().flatten().tolist()
            ws = [1.0 if w is None else float(w[b, j]) for j in members]
            if sum(ws) > 0:
                out[b, t] = sum(wj * x[b, j].double() for wj, j in zip(ws, members)) / sum(ws)
    return out


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("B,N,D,T", [(1, 7, 3, 2), (2, 30, 9, 11)])
def test_reference_equals_naive_loop(B, N, D, T, weighted):
    x, assign, T, w = make_inputs(B, N, D, T, weighted=weighted, seed=N)
    got = merge_tokens_reference(x, assign, T, weights=w)
    assert got.shape == (B, T, D) and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), naive_merge(x, assign, T, w), rtol=1e-5, atol=1e-6)


def test_empty_targets_are_zero_and_dtype_kept():
    x = torch.randn(1, 4, 3, dtype=torch.bfloat16)
    out = merge_tokens(x, torch.tensor([[0, 0, -1, 2]]), 4, impl="reference")
    assert out.dtype == torch.bfloat16
    assert out[0, 1].abs().sum() == 0 and out[0, 3].abs().sum() == 0
    torch.testing.assert_close(out[0, 0], ((x[0, 0].float() + x[0, 1].float()) / 2).bfloat16())


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 5, 3)
    a = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"assign values must be -1 \(not merged\) or a target in 0..num_targets-1=1"):
        merge_tokens(x, a + 2, 2)
    with pytest.raises(ValueError, match="assign must be an integer tensor"):
        merge_tokens(x, a.float(), 2)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        merge_tokens(x, a, 2, weights=-torch.ones(2, 5))
    with pytest.raises(ValueError, match="num_targets must be a non-negative int"):
        merge_tokens(x, a, -1)


# ---------------------------------------------------------------------------------------------
# Triton kernel == reference (interpreter subprocess)
# ---------------------------------------------------------------------------------------------
INTERP_CASES = {
    **{f"weighted_two_target_blocks_{n}": dict(dtype=n) for n in DTYPES},  # T=37 > 32, D=70 > 64
    "unweighted_one_target_fp32": dict(dtype="fp32", B=3, N=19, D=5, T=1, weighted=False),
    "strided_x_fp16": dict(dtype="fp16", B=2, N=33, D=17, T=6, non_contiguous=True),
}


def _check(params: dict) -> None:
    from pruners.ops.merge import merge_tokens_triton

    p = dict(params)
    dtype = DTYPES[p.pop("dtype")]
    x, assign, T, w = make_inputs(dtype=dtype, **p)
    got = merge_tokens_triton(x, assign, T, weights=w)
    want = merge_tokens_reference(x, assign, T, weights=w)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    rtol, atol = TOL[dtype]  # fp32 sums in a different order; then one rounding to the output dtype
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    empty = want.float().abs().sum(-1) == 0
    assert torch.equal(got.float().abs().sum(-1) == 0, empty)
    torch.testing.assert_close(merge_tokens(x, assign, T, weights=w, impl="triton"), want, rtol=rtol, atol=atol)


# interpreter_results() runs in the TRITON_INTERPRET=1 subprocess; interp + the test compare in pytest.
interpreter_results, interp, test_triton_kernel_matches_reference = interpreter_suite(__file__, INTERP_CASES, _check)
