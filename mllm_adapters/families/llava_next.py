"""LLaVA-NeXT / LLaVA-1.6 (transformers' LlavaNextForConditionalGeneration): LLaVA-1.5's towers with anyres tiling.

The spec adds to LLaVA's only the anyres layout: an image is a base tile plus crops, and the LLM sees
its *packed run* (base tile in raster order, then the unpadded crop canvas with a newline slot after
every row), whose length depends on the image's size. `image_layout` rebuilds that packing as an
`ImageLayout` (views = tiles, extra slots = newlines); `tests/test_llava_next_adapter.py` checks it
against transformers' own. The packing in detail: docs/engine.md "LLaVA-NeXT's packed run"; how each
stage's pruners see it: README.md "LLaVA-NeXT"; the per-view rules: `mllm_adapters/engine/views.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers.image_processing_utils import select_best_resolution

from mllm_adapters.engine.layout import ImageLayout
from mllm_adapters.families.llava import LlavaSpec, _side
from mllm_adapters.registry import register_family
from pruners.base import Pruner

MODEL_CLASS = "LlavaNextForConditionalGeneration"


def _unpadded_span(orig_hw: tuple[int, int], canvas_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) of a canvas of ``canvas_hw`` patches kept by LLaVA-NeXT's unpadding of an image
    of ``orig_hw`` pixels (same arithmetic as transformers' ``unpad_image``)."""
    oh, ow = orig_hw
    ch, cw = canvas_hw
    if ow / oh > cw / ch:
        scale = cw / ow
        new_h = int(round(oh * scale, 7))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    scale = ch / oh
    new_w = int(round(ow * scale, 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


def image_layout(image_size: tuple[int, int], pinpoints: list[list[int]], tile_px: int, side: int) -> ImageLayout:
    """The packed run of an image of ``image_size`` = (height, width) pixels (see `ImageLayout`)."""
    best_h, best_w = select_best_resolution(list(image_size), pinpoints)
    gh, gw = best_h // tile_px, best_w // tile_px
    n2 = side * side
    rects: list[tuple[int, int, int, int]] = [(0, side, 0, side)]
    src = [torch.arange(n2)]
    if gh * gw == 0:  # no crops: base tile + one newline (transformers' single-tile branch)
        src.append(torch.tensor([-1]))
        return ImageLayout(side, tuple(rects), torch.cat(src))
    R0, R1, C0, C1 = _unpadded_span(tuple(int(v) for v in image_size), (gh * side, gw * side))
    for i in range(gh):
        for j in range(gw):
            r0, r1 = max(R0 - i * side, 0), min(R1 - i * side, side)
            c0, c1 = max(C0 - j * side, 0), min(C1 - j * side, side)
            rects.append((r0, max(r0, r1), c0, max(c0, c1)))
    R = torch.arange(R0, R1)[:, None]  # canvas rows kept
    C = torch.arange(C0, C1)[None, :]  # canvas cols kept
    tile = 1 + (R // side) * gw + (C // side)  # [h', w']
    flat = tile * n2 + (R % side) * side + (C % side)  # [h', w'] source of each canvas cell
    nl = torch.full((flat.shape[0], 1), -1, dtype=torch.long)
    src.append(torch.cat([flat, nl], dim=1).reshape(-1))  # rows, each followed by its newline
    return ImageLayout(side, tuple(rects), torch.cat(src))


def max_packed_tokens(pinpoints: list[list[int]], tile_px: int, side: int) -> int:
    """Longest packed run any image can have: base tile + the largest canvas with one newline per row."""
    best = 0
    for h, w in pinpoints:
        gh, gw = h // tile_px, w // tile_px
        best = max(best, gh * side * (gw * side + 1))
    return side * side + max(best, 1)


def anyres_cover(
    image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile_px: int, patch_px: int
) -> tuple[tuple[int, int], torch.Tensor]:
    """Recall grid of one LLaVA-NeXT image and, per grid cell, the packed-run positions covering it.

    image_size: (height, width) in pixels, as the processor reports it (``image_sizes``).
    Returns ``(grid_hw, cover)`` with ``cover`` [gh * gw, 2]: column 0 the base-tile token, column 1
    the crop-canvas token (-1 when unpadding cut the canvas cell), positions in the image's unpruned
    packed run (``handle.kept_indices`` numbering; newline slots cover no region).

    The rule: ``grid_hw`` is, per dimension, the finer of the image's unpadded crop canvas (h' rows x
    w' columns of crop tokens) and one tile's side x side grid, so that every token of either grid
    holds at least one cell centre; it is the base grid alone when the image gets no crops or
    unpadding leaves an empty canvas (extreme aspect ratios). A cell is covered by the base-tile token
    and by the canvas token whose image regions contain the cell's centre. Regions follow LlavaNextImageProcessor: the base tile is the
    whole image resized to the tile (aspect not kept), the crops tile the image resized to fit the
    best pinpoint (aspect kept, ceil-rounded) and centred in it with padding.
    """
    H, W = int(image_size[0]), int(image_size[1])
    side = tile_px // patch_px
    pins = [list(p) for p in pinpoints]
    layout = image_layout((H, W), pins, tile_px, side)
    best_h, best_w = select_best_resolution([H, W], pins)
    n_cols_t = best_w // tile_px  # crop tiles per canvas row
    h_rows = int((layout.src < 0).sum())  # one newline per unpadded canvas row
    w_cols = (layout.n_packed - side * side) // h_rows - 1 if h_rows else 0
    # No crops, or an aspect ratio so extreme that unpadding leaves no canvas cell: the base tile only.
    has_crops = (best_h // tile_px) * n_cols_t > 0 and h_rows > 0 and w_cols > 0
    grid = (max(h_rows, side), max(w_cols, side)) if has_crops else (side, side)
    gh, gw = grid
    fy = (torch.arange(gh, dtype=torch.float64) + 0.5) / gh  # [gh] cell centres, fraction of the image height
    fx = (torch.arange(gw, dtype=torch.float64) + 0.5) / gw  # [gw]
    r = (fy * side).floor().long().clamp(max=side - 1)[:, None]
    c = (fx * side).floor().long().clamp(max=side - 1)[None, :]
    base = (r * side + c).reshape(-1)  # [G] base tile: raster, packed positions 0 .. side**2 - 1
    if not has_crops:
        return grid, torch.stack([base, torch.full_like(base, -1)], dim=1)
    # The processor's crop canvas: image resized to (new_h, new_w) inside (best_h, best_w), centred.
    if best_w / W < best_h / H:
        new_w, new_h = best_w, min(math.ceil(H * best_w / W), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(W * best_h / H), best_w)
    pad_y, pad_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    R = ((pad_y + fy * new_h) / patch_px).floor().long().clamp(0, best_h // patch_px - 1)[:, None]  # canvas row
    C = ((pad_x + fx * new_w) / patch_px).floor().long().clamp(0, best_w // patch_px - 1)[None, :]  # canvas col
    tile = 1 + (R // side) * n_cols_t + C // side
    src = (tile * side * side + (R % side) * side + C % side).reshape(-1)  # [G] (tile, patch) flat source
    canvas = layout.packed_index()[src]  # -1 where unpadding dropped the cell
    return grid, torch.stack([base, canvas], dim=1)


def _pinpoints(config: Any) -> list[list[int]]:
    return [list(p) for p in config.image_grid_pinpoints]


@register_family("llava_next")
class LlavaNextSpec(LlavaSpec):
    """LLaVA-1.5's towers; an image is a base tile plus anyres crops, packed with newlines."""

    model_classes = (MODEL_CLASS,)
    model_types = ("llava_next",)
    tiny_builders = ("build_tiny_llava_next", "tiny_llava_next_config")
    forward_args = ("input_ids", "pixel_values", "image_sizes", "attention_mask", "position_ids", "past_key_values")
    multi_view = True
    size_dependent = True

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self._layouts: dict[tuple[int, int], ImageLayout] = {}

    @classmethod
    def max_visual_tokens(cls, config: Any) -> int:
        return max_packed_tokens(_pinpoints(config), int(config.vision_config.image_size), _side(config))

    @classmethod
    def layout_for(cls, config: Any, image_size: tuple[int, int] | None) -> ImageLayout:
        if image_size is None:
            raise ValueError(f"{MODEL_CLASS}: an image's layout depends on its size; image_size is required")
        return image_layout(tuple(int(v) for v in image_size), _pinpoints(config),
                            int(config.vision_config.image_size), _side(config))

    @classmethod
    def recall_cover(cls, config: Any, image_size: tuple[int, int] | None) -> tuple[tuple[int, int], torch.Tensor]:
        """`anyres_cover` of an image of ``image_size``: cells covered by base-tile and canvas tokens."""
        if image_size is None:
            raise ValueError(f"{MODEL_CLASS} is anyres: recall needs each image's size")
        v = config.vision_config
        return anyres_cover(tuple(image_size), _pinpoints(config), int(v.image_size), int(v.patch_size))

    def check_pruner(self, pruner: Pruner) -> None:
        if "vision" in pruner.stages and len(pruner.stages) > 1:
            raise ValueError(
                f"method {pruner.name!r} combines vision-stage pruning (inside the ViT) with the stages "
                f"{[s for s in pruner.stages if s != 'vision']}, which is not supported for {MODEL_CLASS}: a "
                f"vision-stage method runs there on its own, per anyres tile. Supported: 'vision' alone (per "
                f"tile), 'pre_llm' (per tile), 'llm', and 'pre_llm' + 'llm'"
            )

    def layout(self, image_size: tuple[int, int]) -> ImageLayout:
        """The (cached) packed-run layout of an image of ``image_size`` = (height, width) pixels."""
        key = (int(image_size[0]), int(image_size[1]))
        if key not in self._layouts:
            self._layouts[key] = self.layout_for(self.config, key)
        return self._layouts[key]

    def image_layouts(self, kwargs: dict[str, Any]) -> list[ImageLayout]:
        image_sizes = kwargs.get("image_sizes")
        if image_sizes is None:
            raise ValueError(f"{MODEL_CLASS} needs image_sizes (from its processor) next to pixel_values")
        return [self.layout(tuple(s)) for s in torch.as_tensor(image_sizes).tolist()]

    def views(self, pixel_values: torch.Tensor, layouts: Sequence[ImageLayout]) -> torch.Tensor:
        """All tiles of the batch [T, 3, S, S] (the padding tiles of the processor's 5-D layout dropped)."""
        counts = [lay.n_tiles for lay in layouts]
        if pixel_values.dim() == 5:  # [B, max_tiles, 3, S, S]
            tiles = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)], dim=0)
        elif pixel_values.dim() == 4:  # already [T, 3, S, S]
            tiles = pixel_values
        else:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")
        if tiles.shape[0] != sum(counts):
            raise ValueError(f"pixel_values hold {tiles.shape[0]} tiles, image_sizes imply {sum(counts)}")
        return tiles

    def extra_slot_embedding(self) -> torch.Tensor:
        return self.model.model.image_newline

    def feed_features(self, kwargs: dict[str, Any], features: list[torch.Tensor]) -> None:
        super().feed_features(kwargs, features)
        kwargs["image_sizes"] = None
