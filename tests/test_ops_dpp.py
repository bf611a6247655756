"""``pruners.ops.greedy_dpp``: the reference against a brute-force greedy (largest determinant at each
step, float64) and the rank-exhausted guards, the Triton kernel (in Triton's CPU interpreter, in a
subprocess) against the reference, the kernel's ahead-of-time GPU compilation, and the input checks."""

from __future__ import annotations

import pytest
import torch

from pruners.ops import _dispatch, greedy_dpp
from pruners.ops.dpp import greedy_dpp_reference
from tests._ops_interp import DTYPES, interpreter_suite


def make_kernel(B=2, N=40, D=None, dtype=torch.float32, seed=0, quality=True, transposed=False):
    """[B, N, N] PSD kernel q_i <x_i, x_j> q_j from Gaussian features (full rank when D >= N)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D or N + 4, generator=g)
    L = x @ x.transpose(1, 2)
    if quality:
        q = torch.rand(B, N, generator=g) + 0.1
        L = q[:, :, None] * L * q[:, None, :]
    L = L.to(dtype)
    if transposed:  # same values, column-major per sample (the kernel reads rows through strides)
        L = L.transpose(1, 2).contiguous().transpose(1, 2)
    return L


def brute_force_greedy(L: torch.Tensor, k: int) -> list[int]:
    """One sample: at each step the item maximising det(L[S + j]) (float64), ties to the lower index."""
    Ld = L.double()
    chosen: list[int] = []
    for _ in range(k):
        best, best_j = None, None
        for j in range(L.shape[0]):
            if j in chosen:
                continue
            idx = torch.tensor(chosen + [j])
            det = float(torch.linalg.det(Ld[idx][:, idx]))
            if best is None or det > best:
                best, best_j = det, j
        chosen.append(best_j)
    return chosen


@pytest.mark.parametrize("B,N,k,seed", [(1, 6, 3, 0), (2, 9, 9, 1), (3, 12, 5, 2), (1, 10, 7, 3)])
def test_reference_equals_brute_force_greedy(B, N, k, seed):
    L = make_kernel(B, N, seed=seed)
    got = greedy_dpp_reference(L, k)
    assert got.shape == (B, k) and got.dtype == torch.long
    for b in range(B):
        assert got[b].tolist() == brute_force_greedy(L[b], k)


def test_first_pick_is_the_largest_diagonal_and_ties_go_low():
    L = torch.diag(torch.tensor([1.0, 3.0, 2.0, 3.0]))[None]
    assert greedy_dpp(L, 4, impl="reference").tolist() == [[1, 3, 2, 0]]  # diagonal kernel: by value, ties low
    assert greedy_dpp(torch.eye(5)[None], 5, impl="reference").tolist() == [[0, 1, 2, 3, 4]]


def test_rank_exhausted_kernel_gives_distinct_picks():
    """Past the kernel's rank every residual gain is 0 (clamped): the picks stay distinct and finite,
    and an exact duplicate of a chosen item is never taken while an item of positive gain remains."""
    x = torch.eye(3)
    x = torch.cat([x, x[:1], x[1:2] * 2], dim=0)[None]  # items 3, 4 lie in the span of items 0, 1
    L = x @ x.transpose(1, 2)
    order = greedy_dpp(L, 5, impl="reference")[0].tolist()
    assert sorted(order) == [0, 1, 2, 3, 4]
    assert order[0] == 4 and set(order[:3]) == {4, 0, 2}  # 4 (norm 2) first, then the orthogonal ones
    L = make_kernel(1, 20, D=3, seed=5)  # rank 3, k = 20
    order = greedy_dpp(L, 20, impl="reference")[0]
    assert sorted(order.tolist()) == list(range(20))


def test_edge_sizes_and_dtype_upcast():
    L = make_kernel(2, 7, seed=0)
    assert greedy_dpp(L, 0, impl="reference").shape == (2, 0)
    assert greedy_dpp(L[:0], 3, impl="reference").shape == (0, 3)
    assert greedy_dpp(torch.ones(1, 1, 1), 1, impl="reference").tolist() == [[0]]
    assert torch.equal(greedy_dpp(L.bfloat16(), 5, impl="reference"), greedy_dpp(L.bfloat16().float(), 5, impl="reference"))


def test_bad_inputs_raise_clear_errors():
    L = make_kernel(1, 5)
    with pytest.raises(ValueError, match=r"k must be an int in 0..N=5"):
        greedy_dpp(L, 6)
    with pytest.raises(ValueError, match="k must be an int"):
        greedy_dpp(L, True)
    with pytest.raises(ValueError, match=r"square per sample"):
        greedy_dpp(torch.zeros(1, 5, 4), 2)
    with pytest.raises(ValueError, match=r"floating-point tensor \[B, N, N\]"):
        greedy_dpp(torch.zeros(5, 5), 2)
    bad = L.clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        greedy_dpp(bad, 2)
    with pytest.raises(ValueError, match="impl must be one of"):
        greedy_dpp(L, 2, impl="cuda")


# ---------------------------------------------------------------------------------------------
# the kernel compiles for real GPUs (as tests/test_ops_compile.py does for the other ops)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not _dispatch.HAS_TRITON or _dispatch.INTERPRET, reason="needs triton with compiled kernels")
@pytest.mark.parametrize("dt", ["fp32", "fp16", "bf16"])
def test_kernel_compiles_for_gpu(dt):
    from pruners.ops import dpp
    from tests.test_ops_compile import PTR_DTYPES, _compile

    ptrs = {"l_ptr": PTR_DTYPES[dt], "d_ptr": "*fp32", "c_ptr": "*fp32", "out_ptr": "*i64"}
    compiled = _compile(dpp._greedy_dpp_kernel, ptrs, {"BLOCK": 1024}, 80)
    assert compiled.asm.get("ptx")


# ---------------------------------------------------------------------------------------------
# Triton kernel == reference (interpreter subprocess)
# ---------------------------------------------------------------------------------------------
INTERP_CASES = {
    **{f"two_samples_{n}": dict(dtype=n, B=2, N=24, k=8) for n in DTYPES},
    "several_blocks_fp32": dict(dtype="fp32", B=1, N=37, k=10, block=16),  # 3 blocks, ragged last
    "select_all_strided_fp16": dict(dtype="fp16", B=1, N=18, k=18, transposed=True),
    "plain_gram_fp32": dict(dtype="fp32", B=2, N=20, k=6, quality=False, seed=3),
    "rank_exhausted_fp32": dict(dtype="fp32", B=1, N=16, k=9, D=4, seed=4, rank=4),
    "identity_ties_fp32": dict(dtype="fp32", eye=12, k=12, block=16),
}


def _check(params: dict) -> None:
    from pruners.ops.dpp import greedy_dpp_triton

    p = dict(params)
    dtype = DTYPES[p.pop("dtype")]
    k, block, rank, eye = p.pop("k"), p.pop("block", 1024), p.pop("rank", None), p.pop("eye", None)
    L = torch.eye(eye, dtype=dtype)[None] if eye else make_kernel(dtype=dtype, **p)
    got = greedy_dpp_triton(L, k, block=block)
    want = greedy_dpp_reference(L, k)
    assert got.dtype == want.dtype == torch.long and got.shape == want.shape
    for b in range(L.shape[0]):
        assert sorted(got[b].tolist()) == sorted(set(got[b].tolist())), f"repeated picks {got[b].tolist()}"
    if rank is None:  # fp32 sums in a different order: on these well-separated kernels the same picks
        assert torch.equal(got, want), f"{got.tolist()} != {want.tolist()}"
    else:  # past the rank the residual gains are rounding noise: only the first `rank` picks are defined
        assert torch.equal(got[:, :rank], want[:, :rank]), f"{got.tolist()} != {want.tolist()}"
    assert torch.equal(greedy_dpp(L, k, impl="triton")[:, : rank or k], want[:, : rank or k])


# interpreter_results() runs in the TRITON_INTERPRET=1 subprocess; interp + the test compare in pytest.
interpreter_results, interp, test_triton_kernel_matches_reference = interpreter_suite(__file__, INTERP_CASES, _check)
