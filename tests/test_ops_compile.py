"""Every Triton kernel in ``pruners.ops`` compiles for real NVIDIA GPUs, checked without a GPU.

The interpreter tests (``test_ops_<name>.py``) check the kernels' numbers, but the interpreter runs
them as numpy and accepts code the GPU compiler would reject (type mismatches, unsupported ops,
layouts). Here each kernel is compiled ahead of time (``triton.compile`` down to PTX and, with the
bundled ptxas, to a cubin) for sm_80 (A100) in fp32/fp16/bf16, and in fp16 for sm_75 (T4) and sm_90
(H100). Runs in a few seconds; compiled kernels land in Triton's cache.
"""

from __future__ import annotations

import pytest

from pruners.ops import _dispatch

pytestmark = pytest.mark.skipif(
    not _dispatch.HAS_TRITON or _dispatch.INTERPRET,
    reason="needs triton with compiled (not interpreted) kernels",
)

PTR_DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _kernels(dt: str) -> list[tuple[object, dict[str, str], dict[str, object]]]:
    """(kernel, pointer dtypes, constexprs) as the launch wrappers use them for input dtype ``dt``."""
    from pruners.ops import attention, merge, select, transition

    x = PTR_DTYPES[dt]
    attn_ptrs = {"q_ptr": x, "k_ptr": x, "kmask_ptr": "*i8", "qpos_ptr": "*i64", "kstart_ptr": "*i64",
                 "m_ptr": "*fp32", "l_ptr": "*fp32", "out_ptr": "*fp32"}
    attn_cx = {"HAS_KMASK": True, "HAS_QPOS": True, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_D": 128}
    return [
        (attention._attn_rows_stats_kernel, attn_ptrs, attn_cx),
        (attention._attn_rows_probs_kernel, attn_ptrs, attn_cx),
        (select._topk_indices_kernel, {"s_ptr": x, "vlen_ptr": "*i64", "out_ptr": "*i64"},
         {"HAS_VLEN": True, "BLOCK": 1024}),
        (select._gather_rows_kernel, {"src_ptr": x, "idx_ptr": "*i64", "out_ptr": x},
         {"BLOCK_K": 16, "BLOCK_F": 256}),
        (merge._merge_kernel, {"x_ptr": x, "a_ptr": "*i64", "w_ptr": "*fp32", "out_ptr": x},
         {"HAS_W": True, "BLOCK_T": 32, "BLOCK_N": 32, "BLOCK_D": 64}),
        (transition._ttv_token_kernel, {"x_ptr": x, "y_ptr": x, "mask_ptr": "*i8", "mag_ptr": "*fp32",
                                        "z_ptr": "*fp32"}, {"HAS_MASK": True, "BLOCK_N": 16, "BLOCK_D": 256}),
        (transition._ttv_softmax_kernel, {"mag_ptr": "*fp32", "z_ptr": "*fp32", "out_ptr": "*fp32"},
         {"BLOCK_N": 1024}),
    ]


FLOAT_ARGS = {"scale", "eps"}


def _compile(kernel, ptrs: dict[str, str], constexprs: dict[str, object], arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = ptrs[p.name]
        else:
            sig[p.name] = "fp32" if p.name in FLOAT_ARGS else "i32"
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))


CASES = [(80, dt) for dt in PTR_DTYPES] + [(75, "fp16"), (90, "fp16")]


@pytest.mark.parametrize("arch,dt", CASES, ids=[f"sm{a}-{d}" for a, d in CASES])
def test_kernels_compile_for_gpu(arch, dt):
    failures = []
    for kernel, ptrs, cx in _kernels(dt):
        try:
            compiled = _compile(kernel, ptrs, cx, arch)
            assert compiled.asm.get("ptx"), "no PTX produced"
        except Exception as e:  # collect all, report together
            failures.append(f"{kernel.fn.__name__}: {type(e).__name__}: {str(e)[:500]}")
    assert not failures, "\n".join(failures)
