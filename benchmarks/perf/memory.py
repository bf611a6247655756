"""Exact accounting of the tensor memory an op allocates, on any device (CPU included).

Why not RSS or the profiler: process RSS on CPU is noisy (allocator caching, other threads), and
torch.profiler's CPU memory events are incomplete in this torch build (frees without allocations).
``LiveTensorBytes`` sees every tensor the ATen dispatcher returns inside the block, counts each
distinct storage once while some Python tensor still refers to it, and records the peak of the live
total. Tensors that existed before the block (the inputs) are excluded, so the figure is the op's
extra memory. Kernel-internal scratch buffers that never become tensors are not seen (for the ops
here: none of significant size on CPU).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes(inputs) as m: op(...)`` -> ``m.peak_bytes`` (peak live new-tensor bytes)."""

    def __init__(self, existing: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.external = {t.untyped_storage().data_ptr() for t in existing if isinstance(t, torch.Tensor)}
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [nbytes, live tensor wrappers]
        self.current_bytes = 0
        self.peak_bytes = 0
        self.largest_tensor_bytes = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current_bytes -= entry[0]
            del self.live[key]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self.external:
            return
        if key not in self.live:
            self.live[key] = [nbytes, 0]
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            self.largest_tensor_bytes = max(self.largest_tensor_bytes, nbytes)
        self.live[key][1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
