"""InternVL3 (transformers' InternVLForConditionalGeneration): InternViT with [CLS] + pixel shuffle + MLP + Qwen2.

How the model feeds an image to the LLM (transformers 5.23, `models/internvl/modeling_internvl.py`):
the processor (`GotOcr2ImageProcessor`, ``crop_to_patches``) cuts the image into cols x rows tiles of one
ViT input each (the grid of 1..``max_patches`` tiles whose aspect ratio is closest to the image's, the
image stretched to it) and, when there is more than one tile, appends a *thumbnail* (the whole image
resized to one tile). Every tile runs through the ViT on its own ([CLS] + side x side patches); the
feature layer's patch states (CLS dropped) are pixel-shuffled with ``downsample_ratio`` 0.5: each 2 x 2
*unit* of patches becomes one token of 4 x Dv channels (patches (2r, 2c), (2r, 2c+1), (2r+1, 2c),
(2r+1, 2c+1) side by side), u x u = (side/2)^2 tokens per tile in raster order (256 for 448 px tiles of 14 px
patches); the projector (LayerNorm + 2-layer MLP) maps each to the LLM. The prompt writes an image as
``<img>`` + (u^2 x tiles) ``<IMG_CONTEXT>`` + ``</img>``: the image's run is its tiles one after the other
(grid tiles row-major, thumbnail last), each in unit raster order. Positions are 1-D RoPE.

The spec: every image is an `ImageLayout` with one view per tile (side = u units, the whole grid in the
run), so pre-LLM methods run per tile as on LLaVA-NeXT (`engine/encoded.py`: the image budget split over
its tiles, each pruned as a single-view image of u x u tokens). ``vision_loop = False``: the spec encodes
the tiles itself (`encode_images`: the ViT blocks up to the feature layer, then pixel shuffle) because a
token is a whole 2x2 unit: pruning keeps or drops whole units, as on Qwen, never single patches. Pruners
see per tile: ``features`` [1, u^2, 4 Dv]; ``vision_qkv`` / ``vision_hidden`` with the [CLS] row first and
then one row per patch, unit-major (unit j at rows 1+4j .. 4+4j); ``vision_attention`` [1, 1+u^2, 1+u^2]
pooled to units (query rows averaged, key columns summed); ``cls_attention`` [1, u^2], the [CLS] row of the
tile's attention with each unit's 4 patch columns **summed** (`cls_unit_reduce`; why: docs/internvl.md).

Refused (a ValueError naming the method, at attach): the vision stage (FlowCut: it cuts single patches
inside the ViT, which would break the 2x2 units the pixel shuffle needs) and the methods whose signals
assume one ViT token per LLM token (VisionZip, PruMerge, PruMerge+, Recoverable: they take the last N
rows of the ViT's q/k as the N tokens' keys, and VisionZip feeds the Dv-wide [CLS] state to the 4 Dv
projector). Layout, units and refusals: docs/internvl.md; checked by `tests/test_internvl_family.py` and
the conformance suite.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mllm_adapters.engine.layout import ImageLayout
from mllm_adapters.engine.probes import ImageEncoding, VisionBlockProbe
from mllm_adapters.engine.spec import FamilySpec
from mllm_adapters.families._hf_parts import LlamaStyleDecoder, PixelsThroughGenerate
from mllm_adapters.registry import register_family
from pruners.base import ModelInfo, Pruner

MODEL_CLASS = "InternVLForConditionalGeneration"
#: InternVL3's ``max_dynamic_patch`` (and GotOcr2ImageProcessor's default ``max_patches``): the most tiles
#: one image is cut into, the thumbnail coming on top; a config may set its own ``max_dynamic_patch``.
DEFAULT_MAX_TILES = 12
DEFAULT_MIN_TILES = 1

#: Methods whose signals assume one ViT token per LLM token (refused; docs/internvl.md, "Refused methods")
ONE_TOKEN_PER_PATCH = {
    "visionzip": "it scores and merges with the last N rows of the ViT's keys as the N tokens' keys and feeds "
                 "the Dv-wide [CLS] state to the projector, but an InternVL token is a pixel-shuffled 2x2 unit "
                 "of 4 patch rows (4 Dv wide)",
    "prumerge": "its single-head [CLS] attention and merge keys are the last N rows of the ViT's q/k, one per "
                "token, but an InternVL token is a pixel-shuffled 2x2 unit of 4 patch rows",
    "prumerge_plus": "its single-head [CLS] attention and merge keys are the last N rows of the ViT's q/k, one "
                     "per token, but an InternVL token is a pixel-shuffled 2x2 unit of 4 patch rows",
    "recoverable": "its [CLS] attention and merge keys are the last N rows of the ViT's q/k, one per token, but "
                   "an InternVL token is a pixel-shuffled 2x2 unit of 4 patch rows",
}


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def shuffle_factor(config: Any) -> int:
    """m with ``downsample_ratio`` = 1/m: one LLM token is an m x m unit of patches (InternVL3: 2)."""
    r = float(config.downsample_ratio)
    m = round(1 / r)
    if m < 1 or abs(m * r - 1) > 1e-9:
        raise ValueError(f"{MODEL_CLASS}: downsample_ratio={r} is not 1/m for an integer m; pixel-shuffle units "
                         "need it")
    return m


def tile_patches(config: Any) -> int:
    """Patches per tile side (tile px / patch px): 32 for InternVL3's 448 px tiles of 14 px patches."""
    (h, w), (ph, pw) = _pair(config.vision_config.image_size), _pair(config.vision_config.patch_size)
    if h != w or ph != pw or h % ph:
        raise ValueError(f"{MODEL_CLASS}: square tiles of whole square patches are expected, got image_size "
                         f"{(h, w)}, patch_size {(ph, pw)}")
    return h // ph


def tile_units(config: Any) -> int:
    """Units (LLM tokens) per tile side: tile_patches / m (16 for InternVL3)."""
    side, m = tile_patches(config), shuffle_factor(config)
    if side % m:
        raise ValueError(f"{MODEL_CLASS}: {side} patches per tile side do not split into {m} x {m} units")
    return side // m


def max_tiles(config: Any) -> tuple[int, int]:
    """(min, max) tiles the processor cuts an image into (``min_dynamic_patch`` / ``max_dynamic_patch`` of
    the config when set, else InternVL3's 1 / 12)."""
    return (int(getattr(config, "min_dynamic_patch", None) or DEFAULT_MIN_TILES),
            int(getattr(config, "max_dynamic_patch", None) or DEFAULT_MAX_TILES))


def tile_grid(config: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of crop tiles the processor cuts an image of ``image_size`` = (height, width) px into
    (GotOcr2's ``get_optimal_tiled_canvas``; a thumbnail is added when rows * cols > 1)."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    lo, hi = max_tiles(config)
    px = _pair(config.vision_config.image_size)
    if hi <= 1:
        return 1, 1
    cols, rows = get_optimal_tiled_canvas((int(image_size[0]), int(image_size[1])), px, lo, hi)
    return int(rows), int(cols)


def unit_layout(n_tiles: int, units: int) -> ImageLayout:
    """The run of an image of ``n_tiles`` tiles: each tile's units x units grid whole, tile after tile."""
    if n_tiles < 1:
        raise ValueError(f"an image has at least one tile, got {n_tiles}")
    return ImageLayout(units, ((0, units, 0, units),) * n_tiles, torch.arange(n_tiles * units * units))


def unit_major_patches(side: int, m: int) -> torch.Tensor:
    """[side**2] raster patch index of each row in unit-major order: unit j (raster over the
    (side/m)^2 units) at rows m*m*j .. m*m*j + m*m - 1, its patches row by row (the order the pixel
    shuffle concatenates them in: (m r + a, m c + b), a outer, b inner)."""
    u = side // m
    r = torch.arange(u)[:, None, None, None] * m + torch.arange(m)[None, None, :, None]  # [u, 1, m, 1]
    c = torch.arange(u)[None, :, None, None] * m + torch.arange(m)[None, None, None, :]  # [1, u, 1, m]
    return (r * side + c).reshape(-1)  # [u, u, m, m] -> unit-major


@register_family("internvl")
class InternVLSpec(PixelsThroughGenerate, LlamaStyleDecoder, FamilySpec):
    """InternVL3: InternViT (CLS) per tile + pixel shuffle + LayerNorm/MLP projector + Qwen2 decoder."""

    model_classes = (MODEL_CLASS,)
    model_types = ("internvl",)
    tiny_builders = ("mllm_adapters.tiny_internvl:build_tiny_internvl",
                     "mllm_adapters.tiny_internvl:tiny_internvl_config")
    forward_args = ("input_ids", "pixel_values", "attention_mask", "position_ids", "past_key_values",
                    "inputs_embeds", "vision_feature_layer", "vision_feature_select_strategy", "labels",
                    "logits_to_keep", "image_sizes")
    multi_view = True
    size_dependent = True
    vision_loop = False
    vision_probes = True
    prompt_image = "<IMG_CONTEXT>"
    #: how the [CLS] attention to a unit's m x m patches becomes the unit's score (`cls_attention`): "sum"
    #: (its total share of the [CLS] row; docs/internvl.md says why, not mean or max)
    cls_unit_reduce = "sum"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        core = model.model
        self.vision_tower = core.vision_tower
        self.projector = core.multi_modal_projector
        self.lm = core.language_model
        self.m = shuffle_factor(self.config)
        self.side = tile_patches(self.config)
        self.units = tile_units(self.config)
        self._order = unit_major_patches(self.side, self.m)
        self._layouts: dict[int, ImageLayout] = {}

    # ---- config-level facts ---------------------------------------------------------------------
    @classmethod
    def tokens_per_tile(cls, config: Any) -> int:
        return tile_units(config) ** 2

    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:
        """The longest run: the most crop tiles plus the thumbnail, u^2 tokens each (13 x 256 on InternVL3)."""
        _, hi = max_tiles(config)
        return cls.tokens_per_tile(config) * (hi + 1 if hi > 1 else 1)

    @classmethod
    def view_grid(cls, config: Any) -> tuple[int, int]:
        """One tile's token grid: u x u units (the LLM tokens of one ViT input)."""
        u = tile_units(config)
        return u, u

    @classmethod
    def layout_for(cls, config: Any, image_size: tuple[int, int] | None) -> ImageLayout:
        """The run of an image of ``image_size`` = (height, width) px under the config's tiling (see
        `max_tiles`): rows x cols crop tiles, plus the thumbnail when there is more than one."""
        if image_size is None:
            raise ValueError(f"{MODEL_CLASS}: an image's tiles depend on its size; image_size is required")
        rows, cols = tile_grid(config, image_size)
        n = rows * cols
        return unit_layout(n + 1 if n > 1 else 1, tile_units(config))

    @classmethod
    def recall_cover(cls, config: Any, image_size: tuple[int, int] | None) -> tuple[tuple[int, int], torch.Tensor | None]:
        """Recall grid over the whole image and, per cell, the run positions covering it [G, 2]: column 0
        the crop tile's unit, column 1 the thumbnail's (the grid is the crops' unit canvas, rows*u x cols*u;
        the processor stretches the image over it, and over the thumbnail). One tile: its own u x u grid,
        cell i = token i."""
        if image_size is None:
            raise ValueError(f"{MODEL_CLASS}: recall needs each image's size (its tiles depend on it)")
        rows, cols = tile_grid(config, image_size)
        u = tile_units(config)
        if rows * cols == 1:
            return (u, u), None
        gh, gw = rows * u, cols * u
        R = torch.arange(gh)[:, None].expand(gh, gw)  # canvas unit row of each cell
        C = torch.arange(gw)[None, :].expand(gh, gw)
        crop = ((R // u) * cols + C // u) * u * u + (R % u) * u + (C % u)
        fy = (torch.arange(gh, dtype=torch.float64) + 0.5) / gh  # cell centres as image fractions
        fx = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw
        tr = (fy * u).floor().long().clamp(max=u - 1)[:, None]
        tc = (fx * u).floor().long().clamp(max=u - 1)[None, :]
        thumb = rows * cols * u * u + tr * u + tc  # [gh, gw]
        return (gh, gw), torch.stack([crop.reshape(-1), thumb.reshape(-1)], dim=1)

    @classmethod
    def image_grids(cls, config: Any, inputs: dict[str, Any]) -> list[tuple[int, int]] | None:
        return None  # tiles: the recall cover of each image's size applies

    # ---- prefill FLOPs (two per multiply-add, matmuls only) -------------------------------------
    @classmethod
    def tile_vision_flops(cls, config: Any, n_blocks: int | None = None) -> int:
        """The ViT on one tile of n = side^2 patches + CLS (T = n + 1 tokens, width D, MLP width M):
        patch embedding 2 n C P^2 D; per block q, k, v, projection 8 T D^2, scores and values 4 T^2 D,
        fc1/fc2 4 T D M. ``n_blocks``: blocks run (None: all, as the untouched model runs its tower)."""
        v = config.vision_config
        d, mlp, c = int(v.hidden_size), int(v.intermediate_size), int(v.num_channels)
        p = _pair(v.patch_size)[0]
        n = tile_patches(config) ** 2
        t = n + 1
        blocks = int(v.num_hidden_layers) if n_blocks is None else int(n_blocks)
        return 2 * n * c * p * p * d + blocks * (8 * t * d * d + 4 * t * t * d + 4 * t * d * mlp)

    @classmethod
    def vision_flops(cls, config: Any, counts: Any) -> int:
        """The ViT on every tile of one sample (``counts.feature_grids``: one u x u grid per tile), always
        whole (pre-LLM pruning acts on its output): all blocks for the untouched model, the blocks up to
        the feature layer when the engine encoded the tiles (``counts.spec_encoded``)."""
        if counts.vision:
            raise ValueError(f"{MODEL_CLASS}: the vision tower never runs pruned (counts.vision must be None)")
        if counts.feature_grids is None:
            raise ValueError(f"{MODEL_CLASS}: FLOPs need each image's tiles (TokenCounts.feature_grids, which the "
                             "engine records); an image's tile count is not fixed by the config")
        u = tile_units(config)
        for g in counts.feature_grids:
            if tuple(int(x) for x in g) != (u, u):
                raise ValueError(f"{MODEL_CLASS}: feature grid {tuple(g)} is not one tile's {u} x {u} units")
        n_layers = int(config.vision_config.num_hidden_layers)
        blocks = cls._feature_layer(config) + 1 if counts.spec_encoded else n_layers
        return len(counts.feature_grids) * cls.tile_vision_flops(config, blocks)

    @classmethod
    def projector_flops(cls, config: Any, n_tokens: int) -> int:
        """LayerNorm + Linear(m^2 Dv, Dt) + GELU + Linear(Dt, Dt) on ``n_tokens`` units: 2 n (m^2 Dv Dt + Dt^2)."""
        dm = int(config.vision_config.hidden_size) * shuffle_factor(config) ** 2
        dt = int(config.text_config.hidden_size)
        return 2 * int(n_tokens) * (dm * dt + dt * dt)

    @classmethod
    def _feature_layer(cls, config: Any) -> int:
        """Non-negative index of the ViT block whose output feeds the LLM (``vision_feature_layer``)."""
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer must be a single int for pruning, got {layer!r}")
        n = int(config.vision_config.num_hidden_layers)
        hs_index = layer % (n + 1)  # index into hidden_states (0 = embeddings)
        if hs_index == 0:
            raise ValueError("vision_feature_layer selects the embeddings; no ViT layer to prune")
        return hs_index - 1

    # ---- model facts ------------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        vcfg = self.config.vision_config
        strategy = self.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported; accepted: 'default' "
                             "(CLS dropped before the pixel shuffle)")
        if int(getattr(self.config, "image_seq_length", self.tokens_per_tile(self.config))) != \
                self.tokens_per_tile(self.config):
            raise ValueError(f"{MODEL_CLASS}: image_seq_length={self.config.image_seq_length} but a tile has "
                             f"{self.tokens_per_tile(self.config)} units")
        return self._model_info(
            grid_hw=(self.units, self.units),  # one tile's units (each tile is pruned as its own view)
            has_cls=True,
            vision_num_layers=int(vcfg.num_hidden_layers),
            vision_feature_layer=self._feature_layer(self.config),
            vision_num_heads=int(vcfg.num_attention_heads),
        )

    def check_pruner(self, pruner: Pruner) -> None:
        if "vision" in pruner.stages:
            raise ValueError(
                f"method {pruner.name!r} prunes single patches inside the vision encoder, which is not supported "
                f"for {MODEL_CLASS}: its pixel shuffle needs every 2x2 unit whole. Supported stages: 'pre_llm' "
                f"(per tile, on whole units) and 'llm'")
        from pruners import get_pruner_class

        for name, why in ONE_TOKEN_PER_PATCH.items():
            if isinstance(pruner, get_pruner_class(name)):
                raise ValueError(f"method {pruner.name!r} is not supported for {MODEL_CLASS}: {why}. Methods "
                                 f"scoring units by [CLS] attention run on it (e.g. fastervlm, vtc_cls, vispruner)")

    # ---- images ------------------------------------------------------------------------------------
    def layout(self, n_tiles: int) -> ImageLayout:
        """The (cached) layout of an image of ``n_tiles`` tiles."""
        if n_tiles not in self._layouts:
            self._layouts[n_tiles] = unit_layout(n_tiles, self.units)
        return self._layouts[n_tiles]

    def image_layouts(self, kwargs: dict[str, Any]) -> list[ImageLayout]:
        """One layout per image, its tile count read from the prompt: each image is one contiguous run of
        ``<IMG_CONTEXT>`` tokens (between ``<img>`` and ``</img>``) of u^2 tokens per tile."""
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("pruning needs input_ids (with image placeholder tokens), not inputs_embeds")
        per_tile = self.units**2
        tiles: list[int] = []
        is_img = (ids == self.image_token_id).long()
        for row in is_img:
            edges = torch.diff(torch.cat([row.new_zeros(1), row, row.new_zeros(1)]))
            starts, ends = (edges == 1).nonzero()[:, 0], (edges == -1).nonzero()[:, 0]
            for n in (ends - starts).tolist():
                if n % per_tile:
                    raise ValueError(f"{MODEL_CLASS}: an image run of {n} placeholder tokens is not a whole number "
                                     f"of tiles ({per_tile} tokens each)")
                tiles.append(n // per_tile)
        pv = kwargs["pixel_values"]
        if pv.dim() != 4 or pv.shape[0] != sum(tiles):
            raise ValueError(f"pixel_values of shape {tuple(pv.shape)}: expected [tiles, 3, S, S] with "
                             f"{sum(tiles)} tiles, the prompt's image runs {tiles}")
        return [self.layout(t) for t in tiles]

    def views(self, pixel_values: torch.Tensor, layouts: Sequence[ImageLayout]) -> torch.Tensor:
        """[T, 3, S, S] every tile of the batch, image by image (the processor's own order)."""
        if pixel_values.shape[0] != sum(lay.n_tiles for lay in layouts):
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} tiles, the layouts "
                             f"{sum(lay.n_tiles for lay in layouts)}")
        return pixel_values

    def _image_tiles(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout]) -> list[torch.Tensor]:
        """Per image its tiles [V, 3, S, S]."""
        return list(torch.split(self.views(kwargs["pixel_values"], layouts), [lay.n_tiles for lay in layouts]))

    def image_pixels(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout]) -> list[torch.Tensor]:
        """Per image its [3, S, S] pixels as one view: its only tile, or for an image of several tiles its
        thumbnail (the whole image; the engine prunes such an image tile by tile, from `view_rgb`)."""
        return [t[-1] for t in self._image_tiles(kwargs, layouts)]

    def view_rgb(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout]) -> list[list[torch.Tensor]]:
        """Per image, per tile, its [3, S, S] normalised pixels (covering the tile's u x u units)."""
        return [list(t) for t in self._image_tiles(kwargs, layouts)]

    def encode_images(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout],
                      probe_layers: Sequence[int] = ()) -> ImageEncoding:
        """Per image [n_units, m^2 Dv]: its tiles' pixel-shuffled units (the projector's input) in run
        order; per image and tile the probes of ``probe_layers`` ([CLS] row first, then the patches
        unit-major: `VisionBlockProbe` with ``n_cls = 1``)."""
        tiles = self.views(kwargs["pixel_values"], layouts)
        hs, captured = self._tower(tiles, probe_layers)  # [T, 1 + side^2, Dv] at the feature layer
        feats = self._shuffle(hs[:, 1:])  # [T, u^2, m^2 Dv]
        counts = [lay.n_tiles for lay in layouts]
        features = [f.reshape(-1, f.shape[-1]) for f in torch.split(feats, counts)]
        rows = torch.cat([torch.zeros(1, dtype=torch.long), 1 + self._order]).to(hs.device)  # CLS, unit-major
        view_probes: list[list[dict[int, VisionBlockProbe]]] = []
        t0 = 0
        for n in counts:
            per_view = []
            for t in range(t0, t0 + n):
                per_view.append({i: VisionBlockProbe(q[t][:, rows], k[t][:, rows], v[t][:, rows], out[t][rows],
                                                     torch.zeros(rows.numel(), dtype=torch.long, device=hs.device),
                                                     scale, n_cls=1)
                                 for i, (q, k, v, out, scale) in captured.items()})
            view_probes.append(per_view)
            t0 += n
        probes = [pv[0] if len(pv) == 1 else {} for pv in view_probes]
        return ImageEncoding(features, probes, view_probes=view_probes)

    def _shuffle(self, patches: torch.Tensor) -> torch.Tensor:
        """[T, side^2, Dv] patch states -> [T, u^2, m^2 Dv] units, by the model's own pixel shuffle."""
        T, n, dv = patches.shape
        x = self.model.model.pixel_shuffle(patches.reshape(T, self.side, self.side, dv), scale_factor=1 / self.m)
        return x.reshape(T, -1, x.shape[-1])

    def _tower(self, tiles: torch.Tensor, probe_layers: Sequence[int] = ()
               ) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, ...]]]:
        """The ViT's blocks up to the feature layer on every tile (as `InternVLVisionModel.forward` runs
        them; its final ``layernorm`` after the last block when the feature layer is the last, as
        ``get_image_features`` takes ``last_hidden_state`` then). Returns the feature-layer states
        [T, 1 + side^2, Dv] and, per block of ``probe_layers``, (q, k, v [T, H, 1 + side^2, Dh] as its
        attention computes them, after q/k norm, block output [T, 1 + side^2, Dv], softmax scale),
        captured by forward hooks that keep only this thread's calls (the modules are shared)."""
        vt = self.vision_tower
        last = self._feature_layer(self.config)
        me = threading.get_ident()
        seen: dict[int, dict[str, torch.Tensor]] = {i: {} for i in probe_layers}
        hooks = []
        for i in probe_layers:
            attn, cap = vt.encoder.layer[i].attention, seen[i]

            def grab(name: str, cap=cap):
                def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                    if threading.get_ident() == me:
                        cap[name] = output
                return hook

            hooks += [attn.q_norm.register_forward_hook(grab("q")), attn.k_norm.register_forward_hook(grab("k")),
                      attn.v_proj.register_forward_hook(grab("v"))]
        try:
            hs = vt.embeddings(tiles.to(vt.embeddings.patch_embeddings.projection.weight.dtype))
            for i in range(last + 1):
                hs = vt.encoder.layer[i](hs)
                if i in seen:
                    seen[i]["out"] = hs
        finally:
            for h in hooks:
                h.remove()
        if self.config.vision_feature_layer == -1:
            hs = vt.layernorm(hs)
        out = {}
        for i, cap in seen.items():
            attn = vt.encoder.layer[i].attention
            T, L, _ = cap["q"].shape
            q, k, v = (cap[n].view(T, L, attn.num_heads, attn.head_dim).transpose(1, 2) for n in ("q", "k", "v"))
            out[i] = (q, k, v, cap["out"], float(attn.scale))
        return hs, out

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The projector on [.., n, m^2 Dv] units -> [.., n, Dt]."""
        return self.projector(tokens)

    def feed_features(self, kwargs: dict[str, Any], features: list[torch.Tensor]) -> None:
        """The model scatters one tensor over its placeholders in batch order: every image's tokens,
        concatenated, [1, sum n_b, Dt]."""
        kwargs["pixel_values"] = None
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None])}

