"""The handle `apply_pruner` returns: what the last forward kept, token counts, and `remove()`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pruners.base import Pruner


@dataclass
class TokenCounts:
    """One sample's token counts in the last prefill: what its FLOPs and the runner's figures are computed from.

    visual_in:  visual tokens its image reaches the LLM with unpruned (its whole run, extra slots included).
    llm_visual: its visual tokens entering each decoder layer (inert slots excluded); None: ``visual_in``
                in every layer.
    vision:     per view (ViT pass) that ran, the tokens entering each of its ViT layers, CLS included;
                None when the tower ran untouched (every layer on every one of ``views`` views).
    views:      ViT passes the unpruned model runs for the image (LLaVA-1.5: 1; LLaVA-NeXT: its tiles).
    projector:  tokens entering the projector (None: ``llm_visual[0]``).
    merged:     merged tokens (no grid index) among those reaching the LLM.
    reference_vision: ``vision`` of the same sample in the keep-all run (what its unpruned cost counts);
                None when that run leaves the tower untouched.
    feature_grids: per view of an image the family spec encoded itself (``FamilySpec.vision_loop = False``,
                Qwen2-VL / Qwen2.5-VL), the (rows, cols) grid of the features it gave, as its layout's
                rectangle (Qwen: merged 2x2 units; its tower ran in full on merge*rows x merge*cols patches).
                What the spec's ``vision_flops`` needs; None when the engine ran the tower itself.
    spec_encoded: True when the engine had the family spec encode the images (`FamilySpec.encode_images`,
                `engine/encoded.py`) and projected what reaches the LLM itself (``projector``); False when
                the model ran untouched. The spec's ``vision_flops`` counts what its ``encode_images`` runs
                (Qwen: the whole tower, its own PatchMerger on every unit included, whose output is unused).
    """

    visual_in: int | None = None
    llm_visual: list[int] | None = None
    vision: list[list[int]] | None = None
    views: int = 1
    projector: int | None = None
    merged: int = 0
    reference_vision: list[list[int]] | None = None
    feature_grids: list[tuple[int, int]] | None = None
    spec_encoded: bool = False

    @classmethod
    def total(cls, images: list[TokenCounts], n_layers: int) -> TokenCounts:
        """A sample's counts from those of its images (one image: its counts unchanged; none: zeros)."""
        if len(images) == 1:
            return images[0]

        def views(field: str) -> list | None:
            parts = [getattr(c, field) for c in images]
            return None if any(p is None for p in parts) else [v for p in parts for v in p]

        return cls(
            visual_in=sum(int(c.visual_in or 0) for c in images),
            llm_visual=[sum(c.llm_visual[i] for c in images) for i in range(n_layers)],
            vision=views("vision"), views=sum(c.views for c in images),
            projector=sum(int(c.projector or 0) for c in images), merged=sum(c.merged for c in images),
            reference_vision=views("reference_vision"), feature_grids=views("feature_grids"),
            spec_encoded=any(c.spec_encoded for c in images),
        )


@dataclass
class BatchCounts:
    """What the whole batch computed in the last prefill, padding included (ragged samples are padded
    to a common width): tokens per ViT row entering each ViT layer, and the visual width entering
    each decoder layer. None where the model ran untouched."""

    vision_width: list[int] | None = None
    llm_visual_width: list[int] | None = None


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
    token_counts:  per sample a `TokenCounts` (batch order): its own ViT, projector and decoder-layer counts.
    batch_counts:  a `BatchCounts`: the padded widths the batch actually computed.
    overhead_flops: FLOPs spent inside the pruner's own code (scoring, selection, merging) in the last
                   prefill, counted by torch.utils.flop_counter when ``count_overhead_flops`` is True
                   (the runner sets it on the first batch of each input shape of a cell only).
    info:          facts the pruner reported (e.g. which text encoder a text-guided method used).
    diagnostics:   with ``record_diagnostics`` True, the last prefill's `PrefillDiagnostics`
                   (`mllm_adapters/engine/diagnostics.py`: per layer the last prompt token's visual/text
                   attention shares, and the sink statistics); None otherwise. ``record_diagnostics``
                   (default False) only observes: outputs are bitwise the same either way.
                   ``sink_tau`` is the sink threshold it records at (default 20, the sink paper's);
                   ``diagnostics_sinks`` False records the attention shares only.

    These seven describe the calling thread's last prefill (one value per thread, `_PerThread`), so
    concurrent forwards on one pruned model each see their own.
    """

    kept_indices = _PerThread(list)
    kept_by_layer = _PerThread(dict)
    token_counts = _PerThread(list)
    batch_counts = _PerThread(BatchCounts)
    overhead_flops = _PerThread(int)
    info = _PerThread(dict)
    diagnostics = _PerThread(lambda: None)

    def __init__(self, pruner: Pruner, adapter: Any = None) -> None:
        self._local = threading.local()
        self.pruner = pruner
        self.adapter = adapter
        self.count_overhead_flops = False
        self.record_diagnostics = False
        self.diagnostics_sinks = True  # with record_diagnostics: the sink statistics too
        self.sink_tau = 20.0
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
