"""Qwen3-VL (transformers' Qwen3VLForConditionalGeneration): Qwen2-VL's layout, positions and supported
methods (`mllm_adapters.families.qwen2_vl`), plus DeepStack.

What differs from Qwen2-VL, and how the spec answers it:

- ViT: patch size 16 (32 px merged units), a learned position-embedding table bilinearly interpolated
  to each image's patch grid, no window attention (one attention segment per image, as Qwen2-VL), GELU
  MLP ``linear_fc1``/``linear_fc2``; width ``hidden_size``, merger output ``out_hidden_size``.
- DeepStack: the tower also hands the outputs of blocks ``deepstack_visual_indexes`` (8, 16, 24 on the
  8B) through one PatchMerger each (``deepstack_merger_list``, LayerNorm after the 2x2 shuffle); the text
  model adds level i to the output of decoder layer i at the image positions (``visual_pos_masks``,
  ``Qwen3VLTextModel._deepstack_process``). Before the LLM, `encode_images` runs the tower without any of
  its mergers and keeps each level's unit features beside the main ones; `feed_kept_features` projects
  the main features AND each level's features of exactly the kept units (a merged token, which has no
  unit, gets no DeepStack feature: zeros). Inside the LLM, `follow_llm_sequence` gives the spec the
  engine's current columns, and while a pruner is attached `_deepstack_process` reads the image mask and
  the level's features at those columns, so an in-LLM pruning layer K at or before the last injection
  layer adds every surviving visual token its own feature and the dropped ones nothing.
- Decoder: Qwen3 attention normalises q and k per head (``q_norm``, ``k_norm``) before RoPE; the engine's
  attention rows are computed through `text_attention`'s projections, which include those norms.
  Interleaved M-RoPE is mixed into cos/sin by the model's rotary (layers see plain tables).

The MoE variant (Qwen3VLMoeForConditionalGeneration) is this spec with its experts' FLOPs counted:
`mllm_adapters.families.qwen3_vl_moe`. Refused like Qwen2-VL: CLS
methods, the vision stage, compact positions, video. docs/qwen3-vl.md has the details; tests:
`tests/test_qwen3_vl_family.py` and the conformance suite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    BaseModelOutputWithDeepstackFeatures,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_vision,
)

from mllm_adapters.engine.layout import ImageLayout
from mllm_adapters.engine.probes import ImageEncoding
from mllm_adapters.engine.spec import AttentionParts
from mllm_adapters.families.qwen2_vl import Qwen2VLSpec
from mllm_adapters.registry import register_family

#: Qwen3-VL checkpoints' image processor bound (preprocessor_config.json ``size.longest_edge`` =
#: 16,777,216 px, 32 x 32 px per merged unit): the most units one image can have.
DEFAULT_MAX_UNITS = 16777216 // (32 * 32)
#: Qwen3-VL checkpoints normalise pixels with mean = std = 0.5 per channel (not CLIP's statistics).
PIXEL_MEAN = PIXEL_STD = (0.5, 0.5, 0.5)
#: forward kwargs key carrying each DeepStack level's unit features from `encode_images` to
#: `feed_kept_features` within one forward (popped there; never reaches the model)
_LEVELS_KEY = "_prunebench_deepstack_units"


class HeadNormedProjection(nn.Module):
    """A q or k projection followed by the per-head RMSNorm Qwen3 attention applies before RoPE:
    [.., D] -> [.., H * head_dim], the same ops in the same order as the attention (so bitwise its q/k).

    Not a submodule of the model (the spec keeps it), so it adds nothing to the model's module tree."""

    def __init__(self, proj: nn.Module, norm: nn.Module, head_dim: int) -> None:
        super().__init__()
        self.proj, self.norm, self.head_dim = proj, norm, int(head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)  # [.., H * hd]
        return self.norm(y.view(*y.shape[:-1], -1, self.head_dim)).flatten(-2)  # per head, back to [.., H * hd]


def deepstack_in_sequence(visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor,
                          cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The DeepStack injection of one level restricted to the current sequence.

    ``visual_pos_masks`` [B, P] marks the LLM prompt's image columns, ``visual_embeds`` [n_vis, D] holds
    their features in row-major order of that mask (as the model scatters them), ``cols`` [B, Lc] the
    prompt column of each current position (>= P: a merged token, which gets no feature). Returns
    ([B, Lc] mask of current positions to add to, [n', D] their features in row-major order)."""
    B, P = visual_pos_masks.shape
    mask = visual_pos_masks.to(cols.device).bool()
    real = cols < P
    at = cols.clamp(max=P - 1)
    rank = (mask.reshape(-1).long().cumsum(0) - 1).view(B, P)  # row of visual_embeds of each image column
    new_mask = mask.gather(1, at) & real  # [B, Lc]
    rows = rank.gather(1, at)[new_mask]  # [n'] in row-major order of new_mask
    return new_mask, visual_embeds[rows.to(visual_embeds.device)]


@register_family("qwen3_vl")
class Qwen3VLSpec(Qwen2VLSpec):
    """Qwen3-VL: Qwen2-VL's layout and positions, DeepStack injections kept aligned with the kept tokens."""

    model_classes = ("Qwen3VLForConditionalGeneration",)
    model_types = ("qwen3_vl",)
    tiny_builders = ("mllm_adapters.tiny_qwen3_vl:build_tiny_qwen3_vl",
                     "mllm_adapters.tiny_qwen3_vl:tiny_qwen3_vl_config")
    forward_args = (*Qwen2VLSpec.forward_args, "logits_to_keep", "mm_encoder_outputs")
    rope_fn = staticmethod(apply_rotary_pos_emb)  # Qwen3-VL's (interleaved M-RoPE mixed into cos/sin already)
    vision_rope_fn = staticmethod(apply_rotary_pos_emb_vision)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._columns: Callable[[], torch.Tensor | None] | None = None
        self._qk: dict[int, tuple[HeadNormedProjection, HeadNormedProjection]] = {}

    # ---- config-level facts ------------------------------------------------------------------------
    @classmethod
    def tiny_config(cls, **kwargs: Any) -> Any:
        """The config `build_tiny` builds, for the tiny Qwen tokenizer's vocabulary (its 8 special tokens,
        not the LLaVA tokenizer's 5 that `FamilySpec.tiny_config` assumes)."""
        from mllm_adapters.engine.spec import _builder
        from mllm_adapters.tiny_qwen3_vl import TINY_QWEN3_VOCAB

        return _builder(cls.tiny_builders[1])(TINY_QWEN3_VOCAB, **kwargs)

    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:
        return DEFAULT_MAX_UNITS

    @classmethod
    def deepstack_levels(cls, config: Any) -> int:
        """DeepStack levels: ViT blocks whose features are added after decoder layers 0 .. levels - 1."""
        return len(config.vision_config.deepstack_visual_indexes)

    # ---- prefill FLOPs (the rest as Qwen2-VL's) ------------------------------------------------------
    @classmethod
    def vision_flops(cls, config: Any, counts: Any) -> int:
        """The tower in full on every image (`Qwen2VLSpec.vision_flops`: patch embedding, blocks), plus the
        DeepStack mergers, each on the units that reach the LLM as themselves (``counts.projector`` minus
        ``counts.merged``: a merged token gets no DeepStack feature; the untouched model runs them on every
        unit). The main PatchMerger is the projector."""
        tower = super().vision_flops(config, counts)
        units = sum(int(r) * int(c) for r, c in counts.feature_grids)
        n_kept = units if counts.projector is None else int(counts.projector) - int(counts.merged)
        return tower + cls.deepstack_levels(config) * super().projector_flops(config, n_kept)

    @classmethod
    def _vision_width(cls, config: Any) -> int:
        return int(config.vision_config.hidden_size)  # Qwen3-VL: out_hidden_size is the merger's output

    @classmethod
    def _vision_mlp_flops(cls, config: Any, n: int) -> int:
        """linear_fc1 / linear_fc2 (D -> intermediate_size -> D) on n patches."""
        return 2 * 2 * n * cls._vision_width(config) * int(config.vision_config.intermediate_size)

    # ---- model facts -----------------------------------------------------------------------------------
    def checkpoint(self) -> tuple[str | None, tuple[float, ...], tuple[float, ...]]:
        """As `FamilySpec.checkpoint`, with Qwen3-VL's processor defaults (mean = std = 0.5)."""
        from mllm_adapters.engine.processor_stats import pixel_stats

        folder = getattr(self.model, "name_or_path", None) or getattr(self.config, "_name_or_path", None) or None
        return (folder, *pixel_stats(folder, PIXEL_MEAN, PIXEL_STD))

    # ---- images: the tower without its mergers, DeepStack levels kept -------------------------------------
    def encode_images(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout],
                      probe_layers: Sequence[int] = ()) -> ImageEncoding:
        """Qwen2-VL's encoding (per image [n_units, 4 * Dv], the main merger's input, raster order), the
        DeepStack mergers bypassed as well: each level's input, per image [n_units, 4 * Dv] in the same
        order, goes into ``kwargs`` for `feed_kept_features`."""
        taps: list[tuple[int, torch.Tensor]] = []  # (merger index, its input [N_patches, Dv]) in call order
        mergers = self.visual.deepstack_merger_list
        for j, merger in enumerate(mergers):
            merger.forward = lambda x, j=j: (taps.append((j, x)), x)[1]  # the tower's output of it is unused
        try:
            encoding = super().encode_images(kwargs, layouts, probe_layers)
        finally:
            for merger in mergers:
                del merger.forward
        grid = kwargs["image_grid_thw"]
        order = self._raster_rows(grid)
        sizes = grid.prod(-1).tolist()
        g = self.merge**2
        # the model adds the levels in the order the tower produced them (block order): level i after layer i
        kwargs[_LEVELS_KEY] = [(j, [h.reshape(-1, g * h.shape[-1]) for h in torch.split(x[order], sizes)])
                               for j, x in taps]
        return encoding

    def feed_kept_features(self, kwargs: dict[str, Any], features: list[torch.Tensor],
                           kept: list[torch.Tensor]) -> None:
        """The kept tokens, and per DeepStack level the features of the same units (the level's merger on
        the kept units only; zeros for a merged token, ``kept[b] == -1``), in the model's own format."""
        levels = kwargs.pop(_LEVELS_KEY, None)
        if levels is None:
            raise RuntimeError(f"{self.model_classes[0]}: the DeepStack features of this forward's images are missing "
                               "(encode_images must run before feed_kept_features)")
        if len(kept) != len(features) or any(k.shape[0] != f.shape[0] for k, f in zip(kept, features)):
            raise ValueError("feed_kept_features: one index per fed token is needed, per image")
        deepstack = []
        for j, units in levels:
            real = [k >= 0 for k in kept]
            picked = torch.cat([u[k[r]] for u, k, r in zip(units, kept, real)])  # [sum n_kept, 4 * Dv]
            out = self.visual.deepstack_merger_list[j](picked) if picked.shape[0] else None  # [sum n_kept, Dt]
            per_image, at = [], 0
            for f, r in zip(features, real):
                z = f.new_zeros(f.shape)
                n = int(r.sum())
                if n:
                    z[r] = out[at : at + n].to(z.dtype)
                at += n
                per_image.append(z)
            deepstack.append(tuple(per_image))
        self.feed_features(kwargs, features)
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(features), deepstack_features=deepstack)}

    # ---- LLM side ---------------------------------------------------------------------------------------
    def follow_llm_sequence(self, columns: Callable[[], torch.Tensor | None]) -> None:
        self._columns = columns

    def prepare(self) -> None:
        """Qwen2-VL's (pixels through generate), and DeepStack injections read at the current columns."""
        super().prepare()
        original = self.lm._deepstack_process  # the bound method of the class

        def aligned(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
            cols = self._columns() if self._columns is not None else None
            if cols is not None:  # in-LLM pruning dropped positions before this injection
                if cols.shape != hidden_states.shape[:2]:
                    raise RuntimeError(f"DeepStack injection on {tuple(hidden_states.shape[:2])} positions, but the "
                                       f"engine tracks a sequence of {tuple(cols.shape)}")
                visual_pos_masks, visual_embeds = deepstack_in_sequence(visual_pos_masks, visual_embeds, cols)
            return original(hidden_states, visual_pos_masks, visual_embeds)

        self.lm._deepstack_process = aligned

    def restore(self) -> None:
        self.lm.__dict__.pop("_deepstack_process", None)
        super().restore()

    def text_attention(self, i: int) -> AttentionParts:
        """Layer i's attention parts; q and k include the per-head q_norm / k_norm (`HeadNormedProjection`)."""
        layer = self.lm.layers[i]
        a = layer.self_attn
        if i not in self._qk:
            self._qk[i] = (HeadNormedProjection(a.q_proj, a.q_norm, a.head_dim),
                           HeadNormedProjection(a.k_proj, a.k_norm, a.head_dim))
        q, k = self._qk[i]
        # the model's own normed keys (k_norm's output, pre-RoPE) are captured: scoring without a cache then
        # rotates them once instead of projecting and norming the keys again
        return AttentionParts(layer.input_layernorm, q, k, a.v_proj, a.head_dim, a.scaling, a, key_output=a.k_norm)
