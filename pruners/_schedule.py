"""Pure helpers for progressive in-LLM schedules (no model needed).

Progressive pruners (TransPrune, PDrop, VFlowOpt) are defined by the decoder layers K_1 < K_2 < ...
after which they drop tokens and the visual-token count kept at each. These helpers turn that into
the per-layer counts and layer-averaged "equivalent tokens" of docs/flops.md ("Equivalent tokens") and scale a
published layer schedule (given for a reference depth, e.g. 32 layers of LLaVA-1.5) to models of
other depths, so the issue's definition tests run without a model.
"""

from __future__ import annotations

from collections.abc import Sequence


def scale_layers(ref_layers: Sequence[int], ref_depth: int, n_layers: int) -> list[int]:
    """Scale pruning layers K (``layers >= K`` see the kept tokens) from a ``ref_depth``-layer model to
    ``n_layers`` layers, keeping them strictly increasing inside 1..n_layers-1.

    Example: PDrop's 8/16/24 of 32 -> 1/2/3 of 4; TransPrune's 7/9/12 of 32 -> 2/3/4 of 8.
    Raises ValueError when the model has too few layers for that many pruning points.
    """
    n = len(ref_layers)
    if n_layers - 1 < n:
        raise ValueError(
            f"a {n_layers}-layer model cannot hold {n} pruning layers (each K must be in 1..{n_layers - 1} and distinct)"
        )
    out: list[int] = []
    for i, k in enumerate(ref_layers):
        v = max(1, int(round(k * n_layers / ref_depth)))
        if out:
            v = max(v, out[-1] + 1)
        v = min(v, n_layers - 1 - (n - 1 - i))  # leave room for the later pruning points
        out.append(v)
    return out


def check_layers(layers: Sequence[int], n_layers: int, param: str = "layers") -> list[int]:
    """Validate user-given pruning layers: ints, strictly increasing, inside 1..n_layers-1."""
    layers = list(layers)
    ok = bool(layers) and all(isinstance(k, int) and not isinstance(k, bool) for k in layers)
    ok = ok and all(1 <= k < n_layers for k in layers) and all(a < b for a, b in zip(layers, layers[1:]))
    if not ok:
        raise ValueError(
            f"{param} must be a non-empty, strictly increasing list of ints in 1..{n_layers - 1} "
            f"(decoder layers K after which tokens are dropped), got {layers!r}"
        )
    return layers


def layer_counts(n_visual: int, n_layers: int, layers: Sequence[int], counts: Sequence[int]) -> list[int]:
    """Visual tokens entering each decoder layer: ``n_visual`` before ``layers[0]``, ``counts[i]`` from
    ``layers[i]`` on. Returns a list of ``n_layers`` ints."""
    if len(layers) != len(counts):
        raise ValueError(f"{len(layers)} pruning layers but {len(counts)} token counts")
    per_layer = [n_visual] * n_layers
    for k, c in zip(layers, counts):
        for j in range(k, n_layers):
            per_layer[j] = int(c)
    return per_layer


def equivalent_tokens(per_layer: Sequence[int]) -> float:
    """Layer-averaged visual tokens, sum_l n_vis(l) / L (docs/flops.md "Equivalent tokens")."""
    return sum(per_layer) / len(per_layer)


class ProgressiveSchedule:
    """Mixin for progressive in-LLM pruners (list it before ``Pruner``): ``attach()`` stores a schedule
    dict ``{"layers": [K...], "counts": [tokens kept from each K], "per_layer": [...]}`` in
    ``self._schedule``; this supplies the pruning layers, per-layer counts and each K's count."""

    _schedule: dict | None = None

    def token_schedule(self) -> list[int]:
        """Visual tokens entering each decoder layer (after attach)."""
        assert self.info is not None, "attach() first"
        if self.keeps_all:
            return [self.info.num_visual_tokens] * self.info.llm_num_layers
        return list(self._schedule["per_layer"])

    def llm_layers(self) -> list[int]:
        return list(self._schedule["layers"]) if self._schedule and not self.keeps_all else []

    def count_at(self, layer: int) -> int:
        """Visual tokens kept from pruning layer ``layer`` on."""
        return self._schedule["counts"][self._schedule["layers"].index(layer)]

    def llm_keep_count(self, layer: int) -> int:
        return self.count_at(layer)
