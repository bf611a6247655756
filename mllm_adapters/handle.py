"""The handle `apply_pruner` returns: what the last forward kept, token counts, and `remove()`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from pruners.base import Pruner


class _PerThread:
    """A handle field with one value per thread: what the calling thread's last forward left there.

    Two threads sharing one pruned model each read their own prefill's kept indices and counts; a
    single-threaded user sees plain attributes.
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        local = obj._local
        if not hasattr(local, self.name):
            setattr(local, self.name, self.factory())
        return getattr(local, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj._local, self.name, value)


class PruningHandle:
    """State shared between a user and the adapter for one attached pruner.

    kept_indices:  after each prefill, per sample a LongTensor of kept visual-token indices into the
                   ORIGINAL patch grid (raster order; LLaVA-NeXT: positions in the image's unpruned
                   packed run, see mllm_adapters/engine/views.py). Merged tokens have no grid index and
                   are not listed.
    kept_by_layer: after each prefill of an in-LLM method, {decoder layer K: per sample the kept
                   indices (as in kept_indices) of the visual tokens entering layer K}, one entry per
                   pruning layer; empty for methods that prune only before the LLM.
    token_counts:  {"visual_in": N, "vision": [tokens entering each ViT layer run, CLS included],
                    "llm_visual": [visual tokens entering each LLM decoder layer],
                    "merged": number of merged (non-grid) tokens reaching the LLM}.
    overhead_flops: FLOPs spent inside the pruner's own code (scoring, selection, merging) in the last
                   prefill, counted by torch.utils.flop_counter when ``count_overhead_flops`` is True.
    info:          facts the pruner reported (e.g. which text encoder a text-guided method used).

    These five describe the calling thread's last prefill (one value per thread, `_PerThread`), so
    concurrent forwards on one pruned model each see their own.
    """

    kept_indices = _PerThread(list)
    kept_by_layer = _PerThread(dict)
    token_counts = _PerThread(dict)
    overhead_flops = _PerThread(int)
    info = _PerThread(dict)

    def __init__(self, pruner: Pruner, adapter: Any = None) -> None:
        self._local = threading.local()
        self.pruner = pruner
        self.adapter = adapter
        self.count_overhead_flops = False
        self.removed = False

    def __repr__(self) -> str:
        return f"PruningHandle(pruner={self.pruner.name!r}, removed={self.removed})"
    def remove(self) -> None:
        """Detach every hook; the model behaves exactly as before `apply_pruner`."""
        if not self.removed and self.adapter is not None:
            self.adapter.remove()
        self.removed = True

    def __enter__(self) -> PruningHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
