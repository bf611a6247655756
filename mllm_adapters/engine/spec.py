"""What a model family tells the engine: `FamilySpec`, the only code that knows Hugging Face internals.

The engine (`mllm_adapters.engine`) owns every hook, the vision-block loop, prompt surgery and the
LLM stage; it reaches the model only through a spec instance bound to that model. A family is one
module in `mllm_adapters/families/` with one ``@register_family`` subclass of `FamilySpec` answering
the questions below (module paths of vision blocks and their q/k/v, projector, decoder layers, final
norm; how an image's views map to the prompt; how queries and keys get their positions).

Config-level questions (``max_visual_tokens``, ``layout_for``, ...) are classmethods taking the
model config, so `benchmarks/` can ask them before any weights load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mllm_adapters.engine.layout import ImageLayout
from mllm_adapters.engine.probes import ImageEncoding
from pruners.base import ModelInfo, Pruner


@dataclass(frozen=True)
class AttentionParts:
    """The pieces of one attention block the engine recomputes scores from (q/k/v projections).

    norm:     the norm applied to the block input before the projections.
    q, k, v:  the projection modules (v may be None where only scores are needed); each maps
              [B, T, D] to [B, T, heads * head_dim].
    head_dim: per-head width; scale: the softmax scale the block uses.
    module:   the attention module itself (its forward hooks capture inputs during prefill).
    key_output: the model's own module whose output is the layer's pre-RoPE keys ([B, T, Hkv * hd] or
              [B, T, Hkv, hd]), captured in prefill so scoring does not recompute them; None: ``k``
              (set it where ``k`` wraps more than one of the model's modules, as Qwen3's k_proj + k_norm).
    """

    norm: Callable[[torch.Tensor], torch.Tensor]
    q: nn.Module
    k: nn.Module
    v: nn.Module | None
    head_dim: int
    scale: float
    module: nn.Module
    key_output: nn.Module | None = None


def _builder(name: str) -> Callable[..., Any]:
    """The function a ``tiny_builders`` entry names: ``"pkg.module:function"``, or a bare name in
    `mllm_adapters.tiny`."""
    import importlib

    module, _, attr = name.rpartition(":")
    return getattr(importlib.import_module(module or "mllm_adapters.tiny"), attr)


class FamilySpec:
    """One model family, bound to one model instance (subclass per family, ``@register_family``)."""

    name: ClassVar[str] = ""
    #: transformers model classes this family serves
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: functions building this family's tiny model and its config (no download): a name in
    #: `mllm_adapters.tiny`, or ``"package.module:function"`` (a family may keep its tiny model beside it)
    tiny_builders: ClassVar[tuple[str, str]] = ("", "")
    #: positional order of the model class's ``forward`` (a pre-hook receiving args maps them by it)
    forward_args: ClassVar[tuple[str, ...]] = ("input_ids", "pixel_values", "attention_mask", "position_ids",
                                               "past_key_values")
    #: True when an image may have several views (tiles): per-view pruning, ragged runs
    multi_view: ClassVar[bool] = False
    #: True when an image's token count depends on its size (budgets are checked against the maximum)
    size_dependent: ClassVar[bool] = False
    #: True when the model itself keeps per-call state between a prefill and its decode steps (Qwen2-VL
    #: stores ``rope_deltas`` on the model during generate): the engine then refuses a second thread
    #: with a clear RuntimeError instead of letting two calls mix their state
    keeps_call_state: ClassVar[bool] = False
    #: False when the engine cannot run the vision tower block by block for this family: the spec's
    #: `encode_images` gives each image's features and pre-LLM pruners see those (CLS or a vision stage
    #: are refused; ViT blocks only through ``vision_probes``)
    vision_loop: ClassVar[bool] = True
    #: with ``vision_loop = False``: True when `encode_images` can capture the blocks a pre-LLM pruner
    #: reads (`mllm_adapters.engine.probes`: q/k/v, outputs and attention segments of each block)
    vision_probes: ClassVar[bool] = False
    #: with ``vision_loop = False`` and a [CLS] token (its probes' ``n_cls`` rows): how the [CLS] attention
    #: to the g rows of one feature token becomes that token's ``cls_attention`` ("sum", "mean" or "max",
    #: `mllm_adapters.engine.probes.cls_feature_attention`); None: no CLS attention is offered
    cls_unit_reduce: ClassVar[str | None] = None
    #: positions of the tokens kept before the LLM: "compact" (renumbered, as if the image had fewer
    #: tokens: LLaVA) or "original" (each keeps the position it has unpruned: M-RoPE families)
    pre_llm_positions: ClassVar[str] = "compact"
    #: False when renumbering kept tokens contiguously inside the LLM (``positions="compact"``) is not
    #: defined for the family's positions (M-RoPE)
    compact_llm_positions: ClassVar[bool] = True
    #: extra forward inputs aligned with the prompt that must shrink with it ([B, L] each)
    prompt_aligned_inputs: ClassVar[tuple[str, ...]] = ()
    #: how a prompt writes one image (before the processor expands it into the image's placeholders)
    prompt_image: ClassVar[str] = "<image>"
    #: ``config.model_type`` values of this family's configs (how `benchmarks/` finds the spec of a config)
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # ---- tiny models (what the conformance suite runs every pruner on) --------------------------
    @classmethod
    def build_tiny(cls, **kwargs: Any) -> tuple[Any, Any]:
        """A tiny random model of this family built from config, and its processor (``tiny_builders[0]``)."""
        return _builder(cls.tiny_builders[0])(**kwargs)

    @classmethod
    def tiny_config(cls, **kwargs: Any) -> Any:
        """The config `build_tiny` builds (same keyword arguments but seed/attention), without weights."""
        from mllm_adapters.tiny import TINY_VOCAB

        return _builder(cls.tiny_builders[1])(TINY_VOCAB, **kwargs)

    # ---- config-level facts (no weights needed) ---------------------------------------------------
    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:
        """Largest number of visual tokens one image reaches the LLM with, unpruned."""
        raise NotImplementedError

    @classmethod
    def layout_for(cls, config: Any, image_size: tuple[int, int] | None) -> ImageLayout:
        """The `ImageLayout` of an image of ``image_size`` = (height, width) px as the processor reports it."""
        raise NotImplementedError

    @classmethod
    def view_grid(cls, config: Any) -> tuple[int, int]:
        """The patch grid (rows, cols) of one view, one ViT input."""
        raise NotImplementedError

    @classmethod
    def image_grids(cls, config: Any, inputs: dict[str, Any]) -> list[tuple[int, int]] | None:
        """Per image of processed ``inputs``, its own token grid (rows, cols) when the family's images have
        one that depends on the image (Qwen: merged units), else None (the layout's grid applies)."""
        return None

    @classmethod
    def recall_cover(cls, config: Any, image_size: tuple[int, int] | None) -> tuple[tuple[int, int], torch.Tensor | None]:
        """(grid over the whole image to ask a task's relevant patches on, and per grid cell the run
        positions covering it [G, c] (-1 = none), or None when cell i is token i); see
        `benchmarks.metrics.relevant_recall`. Default: one view's grid, cell i = token i."""
        return cls.view_grid(config), None

    @classmethod
    def vision_flops(cls, config: Any, counts: Any) -> int | None:
        """Prefill FLOPs of the vision tower for one sample's `TokenCounts` (two per multiply-add), or None
        to let `benchmarks.flops` count a CLIP-style tower (patch embedding, per view and layer the four
        projections, scores, values, two MLP matrices, on ``counts.vision`` or ``views`` full views)."""
        return None

    @classmethod
    def projector_flops(cls, config: Any, n_tokens: int) -> int | None:
        """Prefill FLOPs of the projector on ``n_tokens`` tokens reaching the LLM, or None to let
        `benchmarks.flops` count LLaVA's two-layer MLP projector."""
        return None

    @classmethod
    def llm_mlp_flops(cls, config: Any, layer: int, n_tokens: int) -> int | None:
        """Prefill FLOPs of decoder layer ``layer``'s MLP on ``n_tokens`` tokens, or None to let
        `benchmarks.flops` count a dense SwiGLU MLP (gate, up, down: 6 n D M). A mixture of experts (the
        Qwen3-VL MoE) counts its router and the experts each token is routed to."""
        return None

    # ---- model facts --------------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        """What pruners may know about the model (validates that the model is one the spec handles)."""
        raise NotImplementedError

    def _model_info(self, **fields: Any) -> ModelInfo:
        """`ModelInfo` with what every family fills the same way (its name, `max_visual_tokens`, the text
        config's depth and width, `checkpoint`'s folder and pixel statistics); ``fields``: the rest."""
        tcfg = self.config.text_config
        checkpoint_dir, pixel_mean, pixel_std = self.checkpoint()
        return ModelInfo(family=self.name, num_visual_tokens=self.max_visual_tokens(self.config),
                         llm_num_layers=int(tcfg.num_hidden_layers), llm_hidden_size=int(tcfg.hidden_size),
                         checkpoint_dir=checkpoint_dir, pixel_mean=pixel_mean, pixel_std=pixel_std, **fields)

    def checkpoint(self) -> tuple[str | None, tuple[float, ...], tuple[float, ...]]:
        """(the folder or hub id the model was loaded from, or None; the per-channel pixel mean and std
        its image processor normalises with: the checkpoint's ``preprocessor_config.json``, else the
        processor's defaults, OpenAI CLIP's for every family here) for `ModelInfo`."""
        from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        from mllm_adapters.engine.processor_stats import pixel_stats

        folder = getattr(self.model, "name_or_path", None) or getattr(self.config, "_name_or_path", None) or None
        return (folder, *pixel_stats(folder, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))

    def check_pruner(self, pruner: Pruner) -> None:
        """Refuse, with a ValueError naming what is supported, a method this family cannot run."""

    # ---- vision side -----------------------------------------------------------------------------------
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[V, n_cls + side**2, Dv] ViT input sequences of views [V, 3, S, S] (embeddings, pre-norm)."""
        raise NotImplementedError

    def run_vision_block(self, i: int, hs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """ViT block ``i`` on ``hs`` [V, T, Dv] with an additive key mask [V, 1, 1, T] (or None)."""
        raise NotImplementedError

    def vision_attention(self, i: int) -> AttentionParts:
        raise NotImplementedError

    def vision_post_norm(self) -> nn.Module | None:
        """The norm the tower applies after its last block (CLIP's post_layernorm), or None."""
        return None

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """[.., n, Dt] LLM-space tokens of vision features [.., n, Dv] (the projector)."""
        raise NotImplementedError

    # ---- prompt ------------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def pad_token_id(self) -> int:
        """A token id for inert slots and added padding (masked out; never the image placeholder)."""
        pad_id = getattr(self.config.text_config, "pad_token_id", None)
        if pad_id is None or pad_id == self.image_token_id:
            pad_id = 0 if self.image_token_id != 0 else 1
        return int(pad_id)

    def has_images(self, kwargs: dict[str, Any]) -> bool:
        """True when the forward's ``kwargs`` carry images for the engine to run (pixels, not features
        the caller computed already)."""
        return kwargs.get("pixel_values") is not None and kwargs.get("mm_encoder_outputs") is None

    def image_layouts(self, kwargs: dict[str, Any]) -> list[ImageLayout]:
        """The layout of every image of the forward's ``kwargs`` (``pixel_values`` and the processor's
        extras), in batch order."""
        raise NotImplementedError

    def views(self, pixel_values: torch.Tensor, layouts: Sequence[ImageLayout]) -> torch.Tensor:
        """[V, 3, S, S] every view of the batch, image by image, in layout order."""
        return pixel_values

    def extra_slot_embedding(self) -> torch.Tensor | None:
        """[Dt] the LLM-space vector of a layout's extra slots (LLaVA-NeXT's image_newline), or None."""
        return None

    def encode_images(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout],
                      probe_layers: Sequence[int] = ()) -> ImageEncoding:
        """Per image its [n_i, Dv] features before the projector, in run order, and (``vision_probes``)
        its `VisionBlockProbe` of every block in ``probe_layers`` (``vision_loop = False``)."""
        raise NotImplementedError

    def image_pixels(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout]) -> list[torch.Tensor]:
        """Per image, its pixels as the model receives them (what seeds a random method's draws;
        ``vision_loop = False``)."""
        raise NotImplementedError

    def image_rgb(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout]) -> list[torch.Tensor]:
        """Per image its [3, H, W] normalised pixels, the feature grid covering H x W (what a pre-LLM
        pruner sees as ``ctx.pixel_values``; ``vision_loop = False``). Default: `image_pixels`."""
        return self.image_pixels(kwargs, layouts)

    def view_rgb(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout]) -> list[list[torch.Tensor]]:
        """Per image, per view of its layout, the [3, H, W] normalised pixels covering that view's grid (what
        a pre-LLM pruner of one view sees as ``ctx.pixel_values``, ``vision_loop = False`` with several views
        or extra slots: LLaVA-OneVision). Default: one view, `image_rgb`."""
        return [[x] for x in self.image_rgb(kwargs, layouts)]

    def encoded_image_counts(self, layout: ImageLayout) -> dict[str, Any] | None:
        """`TokenCounts` fields that `encode_images` fixes for one image whatever is pruned (e.g. OneVision:
        ``views`` = its ViT tiles, ``projector`` = every tile's patches, which it projects before packing), or
        None (default) to keep the engine's own counts (``vision_loop = False`` only)."""
        return None

    def prompt_positions(self, kwargs: dict[str, Any], input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The unpruned prompt's position ids as the model would use them ([B, L], or [R, B, L] rows for
        M-RoPE), or None to number columns 0..L-1."""
        return kwargs.get("position_ids")

    def feed_features(self, kwargs: dict[str, Any], features: list[torch.Tensor]) -> None:
        """Hand the (pruned) visual tokens, one [n_b, Dt] tensor per image, to the model's forward."""
        raise NotImplementedError

    def feed_kept_features(self, kwargs: dict[str, Any], features: list[torch.Tensor],
                           kept: list[torch.Tensor]) -> None:
        """`feed_features` of a ragged run, told per image which token each of its ``features`` rows is
        (``kept[b]`` [n_b]: the token's index in the image's unpruned run, i.e. its `encode_images` feature
        row on a spec-encoded image; -1 for a merged token). For a family whose model takes more per-token
        inputs than the projected tokens, which must follow the kept ones (Qwen3-VL's DeepStack features).
        Default: `feed_features`."""
        self.feed_features(kwargs, features)

    def follow_llm_sequence(self, columns: Callable[[], torch.Tensor | None]) -> None:
        """Called once when attached, before `prepare`, with a function giving the calling thread's current
        prefill sequence inside the LLM: [B, Lc] columns of the LLM prompt (the one `feed_features` fed;
        columns >= its length are merged tokens), or None while nothing was dropped in the LLM. For a
        family whose model adds prompt-aligned inputs between decoder layers (Qwen3-VL's DeepStack), so
        they follow in-LLM pruning. Default: nothing."""

    def prepare(self) -> None:
        """Called once when attached (e.g. make generate() let the pixels reach the forward pass)."""

    def restore(self) -> None:
        """Undo `prepare` exactly."""

    # ---- LLM side -------------------------------------------------------------------------------------------
    def decoder_layers(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def text_attention(self, i: int) -> AttentionParts:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        """The LLM's norm after its last decoder layer (whose output the LM head reads)."""
        raise NotImplementedError

    def text_mlp(self, i: int) -> nn.Module:
        raise NotImplementedError

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) RoPE tables for ``position_ids`` (as the decoder layers receive them)."""
        raise NotImplementedError

    def apply_rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE applied to one tensor [B, H, n, hd] with tables [B, n, hd], bitwise as ``apply_rope``
        rotates it (the scoring path rotates query rows and keys separately, each once). Default: the
        first output of ``apply_rope(t, t)``; specs override it to compute it once."""
        return self.apply_rope(t, t, cos, sin)[0]
