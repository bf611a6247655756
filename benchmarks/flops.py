"""Analytic prefill FLOPs of a LLaVA-style model from its config and the actual per-layer token counts.

Definitions (two FLOPs per multiply-add; LLM, CLIP vision encoder, projector; the published
``convention="fastv"`` / ``"sparsevlm"`` counts; equivalent tokens; why analytic): docs/flops.md.
The counts cover every matmul FlopCounterMode sees in an eager forward (tests: within 1% on tiny
models); the LM head is counted once, for the last position (generate() and ``logits_to_keep=1``
compute only that row at prefill).

Contract: counts are per sample (`mllm_adapters.handle.TokenCounts`, ``handle.token_counts[b]``).
Images of several views (LLaVA-NeXT tiles) run the ViT once per view that ran, each on its own counts
(``vision``; the untouched model runs ``views`` full views); the projector runs on ``projector``
tokens (the untouched model projects every patch of every view, before unpadding); the LLM on the
sample's own visual tokens. Inert slots and the padding of shorter views are not counted, like batch
padding (docs/benchmarks.md "LLaVA-NeXT (anyres)"). One view's patch count comes from the family spec
(`view_patches`).

A family spec may count its own tower, projector and decoder MLPs (`FamilySpec.vision_flops`,
`projector_flops`, `llm_mlp_flops`; None, the default, means the CLIP / LLaVA / dense SwiGLU formulas).
Every family but LLaVA and LLaVA-NeXT counts its own tower; the formulas, per family, are in
docs/flops.md "Towers counted by their family spec".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mllm_adapters.handle import TokenCounts

CONVENTIONS = ("real", "fastv", "sparsevlm")


def _text_dims(text_config: Any) -> dict[str, int]:
    d = int(text_config.hidden_size)
    heads = int(text_config.num_attention_heads)
    kv = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or d // heads)
    return {
        "d": d,
        "m": int(text_config.intermediate_size),
        "heads": heads,
        "kv_heads": kv,
        "head_dim": head_dim,
        "layers": int(text_config.num_hidden_layers),
        "vocab": int(text_config.vocab_size),
    }


def llm_layer_flops(text_config: Any, n: int, convention: str = "real", mlp_flops: int | None = None) -> int:
    """FLOPs of one decoder layer on ``n`` tokens at prefill (see the module docstring). ``mlp_flops``: the
    layer's MLP FLOPs when it is not a dense SwiGLU (`FamilySpec.llm_mlp_flops`; "real" convention only)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    t = _text_dims(text_config)
    d, m = t["d"], t["m"]
    if convention == "fastv":
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    if convention == "sparsevlm":
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
    q_dim = t["heads"] * t["head_dim"]
    kv_dim = t["kv_heads"] * t["head_dim"]
    proj = 2 * n * d * q_dim + 2 * 2 * n * d * kv_dim + 2 * n * q_dim * d
    attn = 2 * 2 * t["heads"] * n * n * t["head_dim"]  # scores (q k^T) and values (p v)
    mlp = 3 * 2 * n * d * m if mlp_flops is None else int(mlp_flops)  # gate, up, down
    return proj + attn + mlp


def llm_prefill_flops(
    text_config: Any, layer_tokens: Sequence[int], convention: str = "real", lm_head: bool = True,
    mlp_flops: Callable[[int, int], int | None] | None = None,
) -> int:
    """FLOPs of the LLM prefill with ``layer_tokens[l]`` tokens entering decoder layer ``l``.

    With ``convention="real"`` and ``lm_head`` this adds the LM head on the last position. ``mlp_flops(l, n)``:
    layer l's MLP FLOPs on n tokens, or None for a dense SwiGLU (`FamilySpec.llm_mlp_flops`, used by
    `prefill_flops`; the published conventions count dense MLPs).
    """
    t = _text_dims(text_config)
    if len(layer_tokens) != t["layers"]:
        raise ValueError(f"layer_tokens has {len(layer_tokens)} entries; the model has {t['layers']} decoder layers")
    own = mlp_flops if convention == "real" and mlp_flops is not None else (lambda layer, n: None)
    total = sum(llm_layer_flops(text_config, int(n), convention, own(layer, int(n)))
                for layer, n in enumerate(layer_tokens))
    if convention == "real" and lm_head:
        total += 2 * t["d"] * t["vocab"]
    return total


def fastv_convention_tflops(text_config: Any, n_visual: int, convention: str = "fastv") -> float:
    """TFLOPs of the published tables: visual tokens only, the same count in every layer, multiply-adds."""
    n_layers = int(text_config.num_hidden_layers)
    return llm_prefill_flops(text_config, [n_visual] * n_layers, convention=convention) / 1e12


def view_patches(config: Any) -> int:
    """Patches of one view (ViT input) of the model ``config`` describes, asked of its family spec."""
    from benchmarks.models import family_spec

    h, w = family_spec(config).view_grid(config)
    return int(h) * int(w)


def vision_flops(vision_config: Any, layer_tokens: Sequence[int] | None = None, n_patches: int | None = None) -> int:
    """FLOPs of a CLIP-style vision encoder: patch embedding plus each layer run on its token count.

    ``layer_tokens`` lists the tokens (CLS included) entering each layer that actually ran; ``None``
    means every layer on the full sequence (the unhooked model runs all layers). ``n_patches``: patches
    of one view (`view_patches`; default from a CLIP config's image and patch sizes).
    """
    dv = int(vision_config.hidden_size)
    mv = int(vision_config.intermediate_size)
    p = int(vision_config.patch_size)
    if n_patches is None:
        n_patches = (int(vision_config.image_size) // p) ** 2
    channels = int(getattr(vision_config, "num_channels", 3))
    if layer_tokens is None:
        layer_tokens = [n_patches + 1] * int(vision_config.num_hidden_layers)
    total = 2 * n_patches * channels * p * p * dv  # conv patch embedding
    for n in layer_tokens:
        n = int(n)
        total += 4 * 2 * n * dv * dv + 2 * 2 * n * n * dv + 2 * 2 * n * dv * mv
    return total


def projector_flops(config: Any, n_visual: int) -> int:
    """FLOPs of the projector on ``n_visual`` tokens: the family spec's count (`FamilySpec.projector_flops`,
    Qwen's PatchMerger on ``n_visual`` units) or, when it gives None, LLaVA's two-layer MLP."""
    from benchmarks.models import family_spec

    own = family_spec(config).projector_flops(config, int(n_visual))
    if own is not None:
        return int(own)
    dv = int(config.vision_config.hidden_size)
    layers = config.vision_feature_layer
    dv *= len(layers) if isinstance(layers, (list, tuple)) else 1
    dt = int(config.text_config.hidden_size)
    return 2 * n_visual * (dv * dt + dt * dt)


@dataclass
class PrefillFlops:
    """Prefill FLOPs of one sample, by part."""

    vision: int
    projector: int
    llm: int
    overhead: int = 0

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm + self.overhead

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _grid_cells(counts: TokenCounts) -> int:
    """Cells of every view's feature grid (`TokenCounts.feature_grids`)."""
    return sum(int(r) * int(c) for r, c in counts.feature_grids)


def _unpruned_visual(config: Any, counts: TokenCounts) -> int:
    """The sample's visual tokens reaching the LLM unpruned: ``visual_in``, else every cell of its
    feature grids (spec-encoded images), else one view's patch grid."""
    if counts.visual_in is not None:
        return int(counts.visual_in)
    if counts.feature_grids is not None:
        return _grid_cells(counts)
    return view_patches(config)


def tower_flops(config: Any, counts: TokenCounts) -> int:
    """FLOPs of the vision tower for one sample's counts: the family spec's own count
    (`FamilySpec.vision_flops`: Qwen's tower on each image's grid) or, when it gives None, a CLIP tower per
    view that ran on its own counts (``vision``), or ``views`` full views."""
    from benchmarks.models import family_spec

    own = family_spec(config).vision_flops(config, counts)
    if own is not None:
        return int(own)
    n_vis_all = view_patches(config)
    if counts.vision is not None:  # the views that ran, each on its own counts
        return sum(vision_flops(config.vision_config, layers, n_vis_all) for layers in counts.vision)
    return int(counts.views) * vision_flops(config.vision_config, None, n_vis_all)


def prefill_flops(config: Any, n_text: int, counts: TokenCounts | None = None, overhead: int = 0) -> PrefillFlops:
    """Prefill FLOPs of one sample with ``n_text`` non-image prompt tokens.

    ``counts`` is this sample's `TokenCounts` (``handle.token_counts[b]``): ``vision``: per view that
    ran, the tokens entering each of its ViT layers (``None``: every layer on each of ``views`` full
    views), ``feature_grids``: per view of a spec-encoded image (Qwen) its grid of units, which the
    spec's tower count needs, ``llm_visual``: visual tokens entering each decoder layer (``None``: the
    unpruned count in every layer), ``projector``: tokens entering the projector (default
    ``llm_visual[0]``). ``None`` means the unpruned, unhooked single-view model (a family whose images
    have no fixed size, Qwen, needs counts with ``feature_grids``: `reference_counts` of them gives the
    unhooked model). ``overhead`` is the pruner's own FLOPs for this sample.
    """
    from benchmarks.models import family_spec

    n_layers = int(config.text_config.num_hidden_layers)
    counts = counts or TokenCounts()
    vision = tower_flops(config, counts)
    llm_visual = counts.llm_visual or [_unpruned_visual(config, counts)] * n_layers
    layer_tokens = [n_text + int(v) for v in llm_visual]
    n_proj = counts.projector
    spec = family_spec(config)
    return PrefillFlops(
        vision=vision,
        projector=projector_flops(config, int(llm_visual[0] if n_proj is None else n_proj)),
        llm=llm_prefill_flops(config.text_config, layer_tokens,
                              mlp_flops=lambda layer, n: spec.llm_mlp_flops(config, layer, n)),
        overhead=int(overhead),
    )


def reference_counts(config: Any, counts: TokenCounts) -> TokenCounts:
    """Counts of the same sample through the unpruned model, from its pruned ``counts``: what its
    keep-all (``budget=None``) cell counts. The ViT as the keep-all run ran it (``reference_vision``;
    None: every layer on every view, the untouched model; spec-encoded images: the tower in full on each
    image's ``feature_grids``), the projector on every patch of every view (spec-encoded images: every
    cell of their feature grids, i.e. all of Qwen's units), the LLM on the image's whole run (``visual_in``)."""
    n_layers = int(config.text_config.num_hidden_layers)
    n_in = _unpruned_visual(config, counts)
    grids = counts.feature_grids
    n_proj = _grid_cells(counts) if grids is not None else counts.views * view_patches(config)
    return TokenCounts(visual_in=n_in, llm_visual=[n_in] * n_layers, vision=counts.reference_vision,
                       views=counts.views, projector=n_proj, feature_grids=None if grids is None else list(grids))


def equiv_tokens(counts: TokenCounts | None, n_layers: int, n_visual: int) -> float:
    """Visual tokens averaged over the LLM's layers: sum_l n_vis(l) / L."""
    llm_visual = (counts.llm_visual if counts is not None else None) or [n_visual] * n_layers
    return sum(llm_visual) / len(llm_visual)


@dataclass
class SampleCost:
    """One sample's compute figures, from its own token counts (what the runner reports per row)."""

    counts: TokenCounts  # the sample's own counts
    flops: PrefillFlops  # its prefill FLOPs as pruned (plus the given pruner overhead)
    reference: int  # total prefill FLOPs of the same sample through the unpruned model (`reference_counts`)
    visual_in: int  # its visual tokens reaching the LLM unpruned
    equiv_tokens: float  # its visual tokens averaged over the LLM's layers


def sample_cost(
    config: Any, n_text: int, counts: TokenCounts | None, n_visual: int | None = None, overhead: int = 0,
) -> SampleCost:
    """One sample's figures from its `TokenCounts` (``handle.token_counts[b]``), with ``n_text`` non-image
    prompt tokens. ``n_visual``: its unpruned visual tokens when the counts do not say (``visual_in``);
    default every cell of its feature grids (spec-encoded images), else one view's patch grid."""
    counts = counts or TokenCounts()
    if not counts.visual_in and n_visual is None:
        n_visual = _grid_cells(counts) if counts.feature_grids is not None else view_patches(config)
    n_in = int(counts.visual_in or n_visual)
    n_layers = int(config.text_config.num_hidden_layers)
    return SampleCost(
        counts=counts,
        flops=prefill_flops(config, n_text, counts, overhead=overhead),
        reference=prefill_flops(config, n_text, reference_counts(config, counts)).total,
        visual_in=n_in,
        equiv_tokens=equiv_tokens(counts, n_layers, n_in),
    )
