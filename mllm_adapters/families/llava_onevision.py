"""LLaVA-OneVision (transformers' LlavaOnevisionForConditionalGeneration): SigLIP tiles, anyres-max, Qwen2.

How the model feeds an image to the LLM (`LlavaOnevisionModel.get_image_features` + `pack_image_features`):
the processor cuts the image into a base tile (the whole image resized to one tile) plus gh x gw crops of
the best-fitting pinpoint; every tile runs through SigLIP on its own (no CLS, ``vision_feature_layer``,
strategy "full") and the projector. The crops' *projected* tokens are stitched into one (gh side) x
(gw side) canvas, the rows or columns covering the processor's letterbox padding are cut (unpad), and,
when the unpadded h x w canvas holds more than 1.1**2 x ``max_num_patches`` tiles' worth of tokens
(``vision_aspect_ratio = "anyres_max_<max_num_patches>"``), the canvas is resized bilinearly
(``F.interpolate``) to int(h // r) x int(w // r), r = sqrt(h w / (max_num_patches side^2)). A learned
``image_newline`` follows every canvas row. An image of a sample holding several images is not tiled:
its base tile plus one newline (``batch_num_images``).

The spec's layout (`OnevisionLayout`) describes the run the LLM receives, *after* the resize: view 0 is
the base tile (side x side), view 1 the resized canvas (h2 x w2, no ViT tile of its own), and the newlines
are extra slots. Because the resize mixes projected tokens, no vision-space token exists for a resized
slot, so the spec encodes the images itself (``vision_loop = False``) and hands the engine the LLM-space
tokens the model would feed (``project`` is the identity): pre-LLM methods prune those, per view, with the
budget split over base and canvas (`mllm_adapters.engine.encoded`). ViT signals (``vision_probes``) come
from each tile's own pass, packed like the features (unpad, then the same bilinear resize of q, k, v and
block outputs). Kept indices are positions in the unpruned run; `token_boxes` maps each to the image
region it covers. Everything in detail: docs/onevision.md; checked by tests/test_onevision_family.py and
the conformance suite.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.image_processing_utils import select_best_resolution

from mllm_adapters.engine.layout import ImageLayout
from mllm_adapters.engine.probes import ImageEncoding, VisionBlockProbe
from mllm_adapters.families.llava import _side
from mllm_adapters.families.llava_next import LlavaNextSpec, _pinpoints, _unpadded_span
from mllm_adapters.registry import register_family
from pruners.base import ModelInfo, Pruner

MODEL_CLASS = "LlavaOnevisionForConditionalGeneration"


def max_num_patches(vision_aspect_ratio: str) -> int:
    """The N of ``"anyres_max_N"`` (how transformers reads it)."""
    text = str(vision_aspect_ratio)
    if not text.startswith("anyres_max_") or not text[len("anyres_max_"):].isdigit():
        raise ValueError(f"vision_aspect_ratio={vision_aspect_ratio!r} is not supported for {MODEL_CLASS}; "
                         "accepted: 'anyres_max_<N>' (the checkpoint's 'anyres_max_9')")
    return int(text[len("anyres_max_"):])


def resized_shape(h: int, w: int, side: int, max_patches: int) -> tuple[int, int, bool]:
    """(rows, cols, resized) of an unpadded h x w canvas after the anyres-max resize (transformers'
    ``pack_image_features``: resized when r = sqrt(h w / (max_patches side^2)) > 1.1, to int(h // r) x
    int(w // r))."""
    if h * w == 0:
        return h, w, False
    ratio = math.sqrt(h * w / (max_patches * side**2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio), True
    return h, w, False


@dataclass(frozen=True)
class OnevisionLayout(ImageLayout):
    """An `ImageLayout` (views: base tile, then the canvas as the LLM receives it) plus the tiling facts.

    vit_tiles: SigLIP passes the image takes (1 + gh gw crops; 1 for an image of a multi-image sample).
    tiles_hw:  (gh, gw) crop tiles of the pinpoint ((0, 0) when not tiled).
    span:      (r0, r1, c0, c1) of the (gh side) x (gw side) crop canvas kept by unpadding, in patches.
    canvas_hw: (h2, w2) the canvas after the resize (= (r1 - r0, c1 - c0) when not resized).
    resized:   True when the anyres-max resize ran.
    """

    vit_tiles: int = 1
    tiles_hw: tuple[int, int] = (0, 0)
    span: tuple[int, int, int, int] = (0, 0, 0, 0)
    canvas_hw: tuple[int, int] = (0, 0)
    resized: bool = False


def onevision_layout(image_size: tuple[int, int], pinpoints: list[list[int]], tile_px: int, side: int,
                     max_patches: int, patched: bool = True) -> OnevisionLayout:
    """The run of an image of ``image_size`` = (height, width) px: base tile (raster), then (``patched``)
    the resized canvas row by row, each row followed by its newline slot; unpatched: base + one newline."""
    n2 = side * side
    if not patched:
        src = torch.cat([torch.arange(n2), torch.tensor([-1])])
        return OnevisionLayout(side, ((0, side, 0, side),), src, vit_tiles=1)
    best_h, best_w = select_best_resolution([int(image_size[0]), int(image_size[1])], pinpoints)
    gh, gw = best_h // tile_px, best_w // tile_px
    span = _unpadded_span((int(image_size[0]), int(image_size[1])), (gh * side, gw * side))
    r0, r1, c0, c1 = span
    h2, w2, resized = resized_shape(r1 - r0, c1 - c0, side, max_patches)
    S = max(side, h2, w2)  # one square index space for both views (ImageLayout.side)
    base = (torch.arange(side)[:, None] * S + torch.arange(side)[None, :]).reshape(-1)
    canvas = S * S + torch.arange(h2)[:, None] * S + torch.arange(w2)[None, :]  # [h2, w2]
    nl = torch.full((h2, 1), -1, dtype=torch.long)
    src = torch.cat([base, torch.cat([canvas, nl], dim=1).reshape(-1)])
    return OnevisionLayout(S, ((0, side, 0, side), (0, h2, 0, w2)), src, vit_tiles=1 + gh * gw, tiles_hw=(gh, gw),
                           span=span, canvas_hw=(h2, w2), resized=resized)


def max_run_tokens(pinpoints: list[list[int]], tile_px: int, side: int, max_patches: int) -> int:
    """The longest run any image can have: over every pinpoint and every canvas unpadding can leave (one
    dimension whole, the other any length), base tile + resized canvas + one newline per row."""
    best = 0
    for h, w in pinpoints:
        H, W = (h // tile_px) * side, (w // tile_px) * side
        for rows, cols in [(H, c) for c in range(1, W + 1)] + [(r, W) for r in range(1, H + 1)]:
            h2, w2, _ = resized_shape(rows, cols, side, max_patches)
            best = max(best, h2 * (w2 + 1))
    return side * side + best


def pack_rows(rows: torch.Tensor, lay: OnevisionLayout, mode: str = "bilinear") -> torch.Tensor:
    """Pack per-tile rows [vit_tiles, side**2, X] into the image's run order without newlines: the base tile
    (raster), then the crops stitched, unpadded and resized exactly as transformers' ``pack_image_features``
    does with the projected features ([side**2 + h2 w2, X]). ``mode="nearest-exact"`` takes, for a resized
    cell, the row under its centre (used for integer labels)."""
    side = lay.rects[0][1]
    base = rows[0]
    if lay.vit_tiles == 1:
        return base
    gh, gw = lay.tiles_hw
    X = rows.shape[-1]
    x = rows[1:].view(gh, gw, side, side, X).permute(4, 0, 2, 1, 3).reshape(X, gh * side, gw * side)  # [X, H, W]
    r0, r1, c0, c1 = lay.span
    x = x[:, r0:r1, c0:c1]
    if lay.resized:
        h2, w2 = lay.canvas_hw
        x = F.interpolate(x[None], [h2, w2], mode=mode)[0]  # bilinear: align_corners False, as transformers
    return torch.cat([base, x.flatten(1).T], dim=0)


def token_boxes(config: Any, image_size: tuple[int, int], patched: bool = True) -> torch.Tensor:
    """[N, 4] the image region each slot of an image's run covers, (y0, x0, y1, x1) as fractions of the
    image's height and width; NaN rows for newline slots. ``handle.kept_indices`` index these rows.

    Base-tile token (r, c): the cell [r/side, (r+1)/side) x [c/side, (c+1)/side) (the base tile is the whole
    image resized, aspect not kept). Canvas token (i, j) of the resized h2 x w2 canvas covers canvas patch
    rows r0 + [i h/h2, (i+1) h/h2) (h = r1 - r0; columns alike), i.e. pixels of the padded pinpoint
    canvas, which map to the image through the processor's aspect-keeping resize and centring (unresized:
    exactly one patch). Boxes are clipped to the image.
    """
    v = config.vision_config
    tile_px, patch_px = int(v.image_size), int(v.patch_size)
    side = tile_px // patch_px
    H, W = int(image_size[0]), int(image_size[1])
    lay = onevision_layout((H, W), _pinpoints(config), tile_px, side,
                           max_num_patches(config.vision_aspect_ratio), patched)
    out = torch.full((lay.n_packed, 4), float("nan"), dtype=torch.float64)
    g = torch.arange(side, dtype=torch.float64)
    y0 = (g / side)[:, None].expand(side, side)
    x0 = (g / side)[None, :].expand(side, side)
    out[: side * side] = torch.stack([y0, x0, y0 + 1 / side, x0 + 1 / side], -1).reshape(-1, 4)
    if lay.vit_tiles == 1:
        return out
    best_h, best_w = select_best_resolution([H, W], _pinpoints(config))
    if best_w / W < best_h / H:  # the processor's resize for patching (aspect kept, ceil-rounded), centred
        new_w, new_h = best_w, min(math.ceil(H * best_w / W), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(W * best_h / H), best_w)
    pad_y, pad_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    r0, r1, c0, c1 = lay.span
    h2, w2 = lay.canvas_hw
    i = torch.arange(h2, dtype=torch.float64)
    j = torch.arange(w2, dtype=torch.float64)
    ys = ((r0 + i * (r1 - r0) / h2) * patch_px - pad_y) / new_h, ((r0 + (i + 1) * (r1 - r0) / h2) * patch_px - pad_y) / new_h
    xs = ((c0 + j * (c1 - c0) / w2) * patch_px - pad_x) / new_w, ((c0 + (j + 1) * (c1 - c0) / w2) * patch_px - pad_x) / new_w
    boxes = torch.stack([ys[0][:, None].expand(h2, w2), xs[0][None, :].expand(h2, w2),
                         ys[1][:, None].expand(h2, w2), xs[1][None, :].expand(h2, w2)], -1).clamp(0, 1)
    canvas_slots = lay.src >= lay.side**2  # canvas slots, in run order
    out[canvas_slots] = boxes.reshape(-1, 4)
    return out


@register_family("llava_onevision")
class LlavaOnevisionSpec(LlavaNextSpec):
    """SigLIP tiles (no CLS) + projector + Qwen2; the LLM's run after unpad and the anyres-max resize."""

    model_classes = (MODEL_CLASS,)
    model_types = ("llava_onevision",)
    tiny_builders = ("mllm_adapters.tiny_onevision:build_tiny_onevision",
                     "mllm_adapters.tiny_onevision:tiny_onevision_config")
    forward_args = ("input_ids", "pixel_values", "image_sizes", "pixel_values_videos", "image_sizes_videos",
                    "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "vision_feature_layer",
                    "vision_feature_select_strategy", "vision_aspect_ratio", "batch_num_images", "labels",
                    "use_cache")
    vision_loop = False  # the resize acts on projected tokens: the spec encodes, pruners see LLM-space tokens
    vision_probes = True

    @classmethod
    def tiny_config(cls, **kwargs: Any) -> Any:
        """The config `build_tiny` builds: its tokenizer has ``<video>`` too (`TINY_OV_VOCAB` words)."""
        from mllm_adapters.engine.spec import _builder
        from mllm_adapters.tiny_onevision import TINY_OV_VOCAB

        return _builder(cls.tiny_builders[1])(TINY_OV_VOCAB, **kwargs)

    # ---- config-level facts ---------------------------------------------------------------------
    @classmethod
    def _facts(cls, config: Any) -> tuple[list[list[int]], int, int, int]:
        return (_pinpoints(config), int(config.vision_config.image_size), _side(config),
                max_num_patches(config.vision_aspect_ratio))

    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:
        return max_run_tokens(*cls._facts(config))

    @classmethod
    def layout_for(cls, config: Any, image_size: tuple[int, int] | None, patched: bool = True) -> OnevisionLayout:
        """The layout of an image of ``image_size`` (height, width) px; ``patched=False``: an image of a
        sample with several images (base tile + newline)."""
        if image_size is None:
            raise ValueError(f"{MODEL_CLASS}: an image's layout depends on its size; image_size is required")
        pins, tile_px, side, m = cls._facts(config)
        return onevision_layout(tuple(int(v) for v in image_size), pins, tile_px, side, m, patched)

    @classmethod
    def recall_cover(cls, config: Any, image_size: tuple[int, int] | None) -> tuple[tuple[int, int], torch.Tensor]:
        """Recall grid of one image and, per cell, the run positions covering it [G, 2] (column 0 the base
        token, column 1 the canvas token, -1 when unpadding cut the cell): a token covers the cells whose
        centres lie in its `token_boxes` region. The grid is, per dimension, the finer of the resized canvas
        and the base tile."""
        if image_size is None:
            raise ValueError(f"{MODEL_CLASS} is anyres: recall needs each image's size")
        side = _side(config)
        lay = cls.layout_for(config, image_size)
        h2, w2 = lay.canvas_hw
        gh, gw = (max(h2, side), max(w2, side)) if h2 * w2 else (side, side)
        fy = (torch.arange(gh, dtype=torch.float64) + 0.5) / gh
        fx = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw
        boxes = token_boxes(config, image_size)
        cy, cx = fy[:, None].expand(gh, gw).reshape(-1), fx[None, :].expand(gh, gw).reshape(-1)  # [G]
        cover = torch.full((gh * gw, 2), -1, dtype=torch.long)
        n2 = side * side
        for col, rows in ((0, torch.arange(n2)), (1, torch.arange(n2, lay.n_packed)[lay.src[n2:] >= 0])):
            if rows.numel() == 0:
                continue
            b = boxes[rows]  # [n, 4]
            inside = ((cy[:, None] >= b[None, :, 0]) & (cy[:, None] < b[None, :, 2])
                      & (cx[:, None] >= b[None, :, 1]) & (cx[:, None] < b[None, :, 3]))  # [G, n]
            hit = inside.any(1)
            cover[hit, col] = rows[inside.float().argmax(1)[hit]]
        return (gh, gw), cover

    @classmethod
    def vision_flops(cls, config: Any, counts: Any) -> int:
        """SigLIP (no CLS) on every tile the image takes (``counts.views`` full tiles of N = side**2
        patches, width D, MLP M): patch embedding 2 N C P^2 D, per layer q/k/v/out 8 N D^2, scores and values
        4 N^2 D, MLP 4 N D M. The tower always runs whole (pre-LLM pruning acts on its packed output)."""
        if counts.vision:
            raise ValueError(f"{MODEL_CLASS}: the vision tower never runs pruned (counts.vision must be None)")
        v = config.vision_config
        d, m, p = int(v.hidden_size), int(v.intermediate_size), int(v.patch_size)
        n = _side(config) ** 2
        per_tile = 2 * n * int(getattr(v, "num_channels", 3)) * p * p * d
        per_tile += int(v.num_hidden_layers) * (8 * n * d * d + 4 * n * n * d + 4 * n * d * m)
        return int(counts.views) * per_tile

    # ---- model facts ------------------------------------------------------------------------------
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._ov_layouts: dict[tuple[int, int, bool], OnevisionLayout] = {}

    def model_info(self) -> ModelInfo:
        vt = self.vision_tower
        if not hasattr(vt, "encoder") or not hasattr(vt, "embeddings"):
            raise TypeError(f"the {self.name} family supports SigLIP-style vision towers (embeddings + "
                            f"encoder.layers); got {type(vt).__name__}")
        if self.config.vision_feature_select_strategy != "full":
            raise ValueError(f"vision_feature_select_strategy {self.config.vision_feature_select_strategy!r} is not "
                             f"supported for {MODEL_CLASS} (SigLIP has no CLS); accepted: 'full'")
        max_num_patches(self.config.vision_aspect_ratio)
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer must be a single int for pruning, got {layer!r}")
        vcfg = self.config.vision_config
        n_layers = int(vcfg.num_hidden_layers)
        hs_index = layer % (n_layers + 1)
        if hs_index == 0:
            raise ValueError("vision_feature_layer selects the embeddings; no ViT layer to read")
        side = _side(self.config)
        return self._model_info(
            grid_hw=(side, side),
            has_cls=False,
            vision_num_layers=n_layers,
            vision_feature_layer=hs_index - 1,
            vision_num_heads=int(vcfg.num_attention_heads),
        )

    def checkpoint(self) -> tuple[str | None, tuple[float, ...], tuple[float, ...]]:
        """As `FamilySpec.checkpoint`, with SigLIP's normalisation (mean = std = 0.5) as the default."""
        from mllm_adapters.engine.processor_stats import pixel_stats

        folder = getattr(self.model, "name_or_path", None) or getattr(self.config, "_name_or_path", None) or None
        return (folder, *pixel_stats(folder, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))

    def check_pruner(self, pruner: Pruner) -> None:
        if "vision" in pruner.stages:
            raise ValueError(f"method {pruner.name!r} prunes inside the vision encoder, which is not supported for "
                             f"{MODEL_CLASS} (its anyres-max resize acts on the projected tokens); supported stages: "
                             "'pre_llm' (on the tokens the LLM receives, per view) and 'llm'")

    # ---- images ------------------------------------------------------------------------------------
    def _check_inputs(self, kwargs: dict[str, Any]) -> None:
        if kwargs.get("pixel_values_videos") is not None:
            raise ValueError(f"{MODEL_CLASS}: video inputs are not supported for pruning")
        for name in ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio"):
            given = kwargs.get(name)
            if given is not None and given != getattr(self.config, name):
                raise ValueError(f"{MODEL_CLASS}: {name}={given!r} differs from the config's "
                                 f"{getattr(self.config, name)!r}; pruning follows the config")

    def onevision_layout(self, image_size: tuple[int, int], patched: bool) -> OnevisionLayout:
        """The (cached) layout of an image of ``image_size`` (height, width) px."""
        key = (int(image_size[0]), int(image_size[1]), bool(patched))
        if key not in self._ov_layouts:
            self._ov_layouts[key] = self.layout_for(self.config, key[:2], patched)
        return self._ov_layouts[key]

    def image_layouts(self, kwargs: dict[str, Any]) -> list[ImageLayout]:
        self._check_inputs(kwargs)
        image_sizes = kwargs.get("image_sizes")
        if image_sizes is None:
            raise ValueError(f"{MODEL_CLASS} needs image_sizes (from its processor) next to pixel_values")
        sizes = torch.as_tensor(image_sizes).tolist()
        per_sample = kwargs.get("batch_num_images")
        if per_sample is None:  # the model's own default: every image tiled
            patched = [True] * len(sizes)
        else:
            patched = [int(n) == 1 for n in torch.as_tensor(per_sample).tolist() for _ in range(int(n))]
        if len(patched) != len(sizes):
            raise ValueError(f"batch_num_images {per_sample!r} does not match the {len(sizes)} image_sizes")
        return [self.onevision_layout(s, p) for s, p in zip(sizes, patched)]

    def _tiles(self, kwargs: dict[str, Any], layouts: Sequence[OnevisionLayout]) -> list[torch.Tensor]:
        """Per image its [vit_tiles, 3, S, S] tiles (the processor pads every image to the batch's most)."""
        pv = kwargs["pixel_values"]
        counts = [lay.vit_tiles for lay in layouts]
        if pv.dim() == 5:  # [images, max tiles, 3, S, S]
            if pv.shape[0] != len(layouts):
                raise ValueError(f"pixel_values hold {pv.shape[0]} images, image_sizes {len(layouts)}")
            return [x[:n] for x, n in zip(pv, counts)]
        if pv.dim() == 4:  # [tiles, 3, S, S]
            if pv.shape[0] != sum(counts):
                raise ValueError(f"pixel_values hold {pv.shape[0]} tiles, image_sizes imply {sum(counts)}")
            return list(torch.split(pv, counts))
        raise ValueError(f"pixel_values of shape {tuple(pv.shape)}: expected 4 or 5 dimensions")

    def image_pixels(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout]) -> list[torch.Tensor]:
        return self._tiles(kwargs, layouts)

    def image_rgb(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout]) -> list[torch.Tensor]:
        return [v[0] for v in self.view_rgb(kwargs, layouts)]

    def view_rgb(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout]) -> list[list[torch.Tensor]]:
        """Per image, per view its [3, H, W] normalised pixels covering the view's grid: the base tile; the
        crops stitched, unpadded (in pixels) and, when the canvas was resized, resized bilinearly to
        (h2 P) x (w2 P), so that each canvas token covers a P x P cell as in the base tile."""
        p = int(self.config.vision_config.patch_size)
        out = []
        for tiles, lay in zip(self._tiles(kwargs, layouts), layouts):
            views = [tiles[0]]
            if lay.vit_tiles > 1:
                gh, gw = lay.tiles_hw
                S = tiles.shape[-1]
                x = tiles[1:].view(gh, gw, 3, S, S).permute(2, 0, 3, 1, 4).reshape(3, gh * S, gw * S)
                r0, r1, c0, c1 = lay.span
                x = x[:, r0 * p : r1 * p, c0 * p : c1 * p]
                h2, w2 = lay.canvas_hw
                if lay.resized and h2 * w2:
                    x = F.interpolate(x[None].float(), [h2 * p, w2 * p], mode="bilinear")[0].to(tiles.dtype)
                views.append(x)
            out.append(views)
        return out

    def encode_images(self, kwargs: dict[str, Any], layouts: Sequence[ImageLayout],
                      probe_layers: Sequence[int] = ()) -> ImageEncoding:
        """Per image the LLM-space run the model feeds ([n_packed, Dt]: the model's own tower, projector and
        ``pack_image_features``, newline rows included), and the probes of ``probe_layers`` (rows: the run's
        non-newline slots in order, packed from each tile's own pass by `pack_rows`)."""
        self._check_inputs(kwargs)
        tiles = self._tiles(kwargs, layouts)
        core = self.model.model
        vt = self.vision_tower
        seen: dict[int, dict[str, torch.Tensor]] = {i: {} for i in probe_layers}
        me = threading.get_ident()  # the modules are shared between threads: keep only this call's outputs

        def grab(cap: dict[str, torch.Tensor], name: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                if threading.get_ident() == me:
                    cap[name] = output
            return hook

        hooks = []
        for i in probe_layers:
            layer, cap = vt.encoder.layers[i], seen[i]
            for name in ("q_proj", "k_proj", "v_proj"):
                hooks.append(getattr(layer.self_attn, name).register_forward_hook(grab(cap, name)))
            hooks.append(layer.register_forward_hook(grab(cap, "hidden")))
        try:
            flat = torch.cat(tiles).to(vt.embeddings.patch_embedding.weight.dtype)
            out = vt(flat, output_hidden_states=True, return_dict=True)
        finally:
            for h in hooks:
                h.remove()
        feats = core.multi_modal_projector(out.hidden_states[self.config.vision_feature_layer])  # [T, n2, Dt]
        counts = [lay.vit_tiles for lay in layouts]
        per_image = list(torch.split(feats, counts))
        sizes = torch.tensor([[*lay_size] for lay_size in self._sizes(kwargs)])
        packed, _ = core.pack_image_features(per_image, sizes, image_newline=core.image_newline,
                                             vision_aspect_ratio=self.config.vision_aspect_ratio)
        for f, lay in zip(packed, layouts):
            if f.shape[0] != lay.n_packed:
                raise RuntimeError(f"{MODEL_CLASS}: the model packed {f.shape[0]} tokens, the layout {lay.n_packed}")
        probes: list[dict[int, VisionBlockProbe]] = [{} for _ in layouts]
        heads = int(self.config.vision_config.num_attention_heads)
        for i, cap in seen.items():
            attn = vt.encoder.layers[i].self_attn
            for j, rows in enumerate(zip(*(torch.split(cap[n], counts) for n in ("q_proj", "k_proj", "v_proj", "hidden")))):
                lay = layouts[j]
                q, k, v, hid = (pack_rows(x, lay) for x in rows)  # [n, H*Dh] / [n, Dv]
                n = q.shape[0]
                qkv = [x.view(n, heads, -1).transpose(0, 1) for x in (q, k, v)]  # each [H, n, Dh]
                tile_id = torch.arange(lay.vit_tiles, dtype=torch.float32)[:, None, None].expand(-1, rows[0].shape[1], 1)
                segment = pack_rows(tile_id, lay, mode="nearest-exact")[:, 0].round().long()  # the tile under each row
                probes[j][i] = VisionBlockProbe(qkv[0], qkv[1], qkv[2], hid, segment, float(attn.scale))
        return ImageEncoding(list(packed), probes)

    def _sizes(self, kwargs: dict[str, Any]) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in s) for s in torch.as_tensor(kwargs["image_sizes"]).tolist()]

    def encoded_image_counts(self, layout: ImageLayout) -> dict[str, Any]:
        """What `encode_images` ran for one image, for its `TokenCounts`: every tile through SigLIP and the
        projector (the untouched model's cost whatever is pruned), no Qwen-style feature grids."""
        n2 = _side(self.config) ** 2
        return {"views": layout.vit_tiles, "projector": layout.vit_tiles * n2, "feature_grids": None}

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Identity: `encode_images` gives LLM-space tokens already (the resize acts after the projector)."""
        return tokens

    def feed_features(self, kwargs: dict[str, Any], features: list[torch.Tensor]) -> None:
        super().feed_features(kwargs, features)
        kwargs["batch_num_images"] = None
