"""``pruners.ops.transition_variation`` (TransPrune TTV): the reference against a naive float64
computation with torch's cosine similarity, the Triton kernels (in Triton's CPU interpreter, in a
subprocess) against the reference, and the input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pruners.ops import transition_variation
from pruners.ops.transition import transition_variation_reference
from tests._ops_interp import DTYPES, interpreter_suite


def make_inputs(B=2, N=45, D=300, dtype=torch.float32, seed=0, lengths=(45, 30), masked=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g).to(dtype)
    y = (0.3 * torch.randn(B, N, D, generator=g) + 0.5 * x.float()).to(dtype)  # correlated, like a residual update
    mask = None
    if masked:
        mask = torch.zeros(B, N, dtype=torch.bool)
        for b in range(B):
            mask[b, : lengths[b % len(lengths)]] = True
    return x, y, mask


def naive_ttv(x, y, mask):
    xd, yd = x.double(), y.double()
    mag = yd.norm(dim=-1) / xd.norm(dim=-1)
    z = 1 - F.cosine_similarity(xd, yd, dim=-1)  # [B, N]
    out = torch.zeros_like(z)
    for b in range(x.shape[0]):
        m = mask[b] if mask is not None else torch.ones(x.shape[1], dtype=torch.bool)
        if m.any():
            e = z[b, m].exp()
            out[b, m] = mag[b, m] * e / e.sum()
    return out


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("N,D", [(9, 7), (40, 33)])
def test_reference_equals_naive(N, D, masked):
    x, y, mask = make_inputs(B=3, N=N, D=D, lengths=(N, N - 4, 1), masked=masked, seed=D)
    got = transition_variation_reference(x, y, mask=mask)
    assert got.shape == (3, N) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_ttv(x, y, mask), rtol=1e-5, atol=1e-8)
    if masked:
        assert (got[~mask] == 0).all()


def test_all_masked_sample_is_zero_not_nan():
    x, y, _ = make_inputs(B=2, N=6, D=4, masked=False)
    mask = torch.tensor([[True] * 6, [False] * 6])
    out = transition_variation(x, y, mask=mask, impl="reference")
    assert torch.isfinite(out).all() and out[1].abs().sum() == 0


def test_bad_inputs_raise_clear_errors():
    x, y, _ = make_inputs(B=1, N=4, D=3, masked=False)
    with pytest.raises(ValueError, match="x and y must have the same shape"):
        transition_variation(x, y[:, :3])
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        transition_variation(x, y, mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="eps must be > 0"):
        transition_variation(x, y, eps=0)


# ---------------------------------------------------------------------------------------------
# Triton kernels == reference (interpreter subprocess)
# ---------------------------------------------------------------------------------------------
INTERP_CASES = {
    **{f"masked_lengths_two_d_blocks_{n}": dict(dtype=n) for n in DTYPES},  # D=300 > 256, N=45 odd
    "no_mask_fp32": dict(dtype="fp32", B=1, N=17, D=8, masked=False),
    "one_sample_all_masked_fp16": dict(dtype="fp16", B=2, N=11, D=16, lengths=(11, 0)),
    "strided_fp32": dict(dtype="fp32", B=2, N=13, D=24, transpose=True),
}


def _check(params: dict) -> None:
    from pruners.ops.transition import transition_variation_triton

    p = dict(params)
    dtype = DTYPES[p.pop("dtype")]
    transpose = p.pop("transpose", False)
    x, y, mask = make_inputs(dtype=dtype, **p)
    if transpose:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    got = transition_variation_triton(x, y, mask=mask)
    want = transition_variation_reference(x, y, mask=mask)
    assert got.dtype == torch.float32
    # exact upcast of the inputs and fp32 accumulation in both: tight for every input dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(transition_variation(x, y, mask=mask, impl="triton"), got, rtol=0, atol=0)


# interpreter_results() runs in the TRITON_INTERPRET=1 subprocess; interp + the test compare in pytest.
interpreter_results, interp, test_triton_kernel_matches_reference = interpreter_suite(__file__, INTERP_CASES, _check)
