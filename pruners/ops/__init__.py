"""Fused pruning ops: Triton kernels with exact PyTorch references (Liger-Kernel style).

One module per op, each holding the Triton kernel, the PyTorch reference (the ground truth) and the
public dispatching function. Dispatch (``impl="auto"``): Triton on CUDA tensors when triton imports,
the reference elsewhere; ``PRUNEBENCH_OPS=reference|triton`` forces one; an explicit
``impl="reference"|"triton"`` argument wins over both. The Triton path runs on CPU tensors only
under ``TRITON_INTERPRET=1`` (set before importing this package), which is how the tests check it.

Every pruner that needs one of these calls the op; no pruner keeps its own copy of the math.
"""

from pruners.ops.attention import attention_rows, attention_rows_at
from pruners.ops.dpp import greedy_dpp
from pruners.ops.merge import merge_tokens
from pruners.ops.select import select_and_gather
from pruners.ops.transition import transition_variation

__all__ = ["attention_rows", "attention_rows_at", "greedy_dpp", "merge_tokens", "select_and_gather", "transition_variation"]
