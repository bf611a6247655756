"""Where an image's visual tokens come from: its views (tiles) and the run of slots the LLM sees.

A family spec describes every image of a batch as an `ImageLayout`; the engine prunes views and
rebuilds runs from it without knowing how the family packs them (LLaVA-1.5: one view, the run is the
view's patch grid; LLaVA-NeXT: a base tile plus anyres crops, unpadded, a newline after each row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageLayout:
    """Where each token of one image's packed run comes from.

    side:  patches per view side (every view is one side x side ViT input).
    rects: per view (tile 0 first, then the others in the processor's order), the rectangle of its
           side x side patch grid that reaches the run, as (r0, r1, c0, c1) half-open.
    src:   [N] for each packed slot, the flat source ``view * side**2 + patch`` (patch = raster index
           in the view), or -1 for an extra slot carrying no vision feature (LLaVA-NeXT's newline).
    """

    side: int
    rects: tuple[tuple[int, int, int, int], ...]
    src: torch.Tensor

    @classmethod
    def single_view(cls, side: int) -> ImageLayout:
        """One view whose whole side x side patch grid is the run, in raster order (LLaVA-1.5)."""
        return cls(side, ((0, side, 0, side),), torch.arange(side * side))

    @property
    def n_tiles(self) -> int:
        return len(self.rects)

    @property
    def n_packed(self) -> int:
        return int(self.src.numel())

    @property
    def is_single_view(self) -> bool:
        """True for one full view with no extra slots: the run is the view's patch grid."""
        return self.n_tiles == 1 and self.rects[0] == (0, self.side, 0, self.side) and self.n_packed == self.side**2

    def view_patches(self, tile: int) -> torch.Tensor:
        """[m] raster indices (in the view's side x side grid) of the view's patches that are packed."""
        r0, r1, c0, c1 = self.rects[tile]
        rows = torch.arange(r0, r1)[:, None]
        cols = torch.arange(c0, c1)[None, :]
        return (rows * self.side + cols).reshape(-1)

    def packed_index(self) -> torch.Tensor:
        """[n_tiles * side**2] packed slot of every (view, patch), -1 where it does not reach the run."""
        out = torch.full((self.n_tiles * self.side**2,), -1, dtype=torch.long)
        real = self.src >= 0
        out[self.src[real]] = torch.arange(self.n_packed)[real]
        return out


@dataclass(frozen=True)
class ImageRun:
    """One image of a batch: the sample it belongs to, where its placeholder run starts, its layout."""

    sample: int
    start: int
    layout: ImageLayout

    @property
    def n_packed(self) -> int:
        return self.layout.n_packed


def split_budget(budget: int, sizes: list[int]) -> list[int]:
    """Split ``budget`` over parts of ``sizes`` tokens in proportion to size (largest remainder; ties go
    to the earlier part). Each share is at most its part's size; the shares sum to min(budget, sum)."""
    total = sum(sizes)
    if budget >= total:
        return list(sizes)
    shares = [budget * m // total for m in sizes]
    rema = [(-(budget * m % total), i) for i, m in enumerate(sizes)]
    for _, i in sorted(rema)[: budget - sum(shares)]:
        shares[i] += 1
    return shares
