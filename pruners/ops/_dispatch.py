"""Choosing between an op's Triton kernel and its PyTorch reference.

Rules (the same for every op in ``pruners.ops``):

- ``impl="reference"`` or ``impl="triton"`` passed by the caller always wins.
- ``impl="auto"`` (default) reads ``PRUNEBENCH_OPS`` (``reference`` | ``triton`` | ``auto``/unset).
  Unset/``auto``: Triton for CUDA tensors when triton imports, the reference everywhere else.
- The Triton path on CPU tensors runs only in Triton's interpreter, which must be switched on with
  ``TRITON_INTERPRET=1`` *before* ``pruners.ops`` is imported (``@triton.jit`` reads it at
  decoration time). That is how the tests check the kernels on a machine without a GPU.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional: without it every op runs its reference
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

#: True when the kernels in this package were decorated in interpreter mode (TRITON_INTERPRET=1 at import).
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

IMPLS = ("auto", "reference", "triton")
ENV_VAR = "PRUNEBENCH_OPS"


def resolve_impl(op: str, impl: str, device: torch.device) -> str:
    """Return ``"reference"`` or ``"triton"`` for op ``op`` on ``device`` (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        env = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if env not in IMPLS:
            raise ValueError(f"{op}: environment variable {ENV_VAR} must be one of {IMPLS}, got {env!r}")
        impl = env
    if impl == "auto":
        return "triton" if HAS_TRITON and device.type == "cuda" else "reference"
    if impl == "triton":
        if not HAS_TRITON:
            raise ValueError(f"{op}: impl='triton' needs the triton package, which failed to import")
        if device.type != "cuda" and not INTERPRET:
            raise ValueError(
                f"{op}: impl='triton' needs CUDA tensors (got {device.type}); to run the kernel on CPU set "
                "TRITON_INTERPRET=1 before importing pruners.ops, or use impl='reference'"
            )
    return impl


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum) (Triton block sizes must be powers of two)."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()
