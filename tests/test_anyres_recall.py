"""Answer-relevant patch recall on LLaVA-NeXT packed runs (mllm_adapters.families.llava_next.anyres_cover / relevant_recall).

The rule under test: the task's relevant patches are asked on a grid over the whole image, per dimension
the finer of the unpadded crop canvas (h' x w') and one tile's grid; a relevant cell counts as kept when
the base-tile token or the crop-canvas token whose image region contains the cell's centre is kept. Tiny LLaVA-NeXT geometry: 32 px tiles of 8 px patches (4 x 4),
pinpoints 32x64 / 64x32 / 64x64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.metrics import relevant_recall
from mllm_adapters.families.llava_next import anyres_cover, image_layout

PINS = [[32, 64], [64, 32], [64, 64]]
PINS_7B = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def test_hand_built_cover_and_recall():
    """40 x 60 px (h x w): best pinpoint 64 x 64 (2 x 2 crops); the crops' 8 x 8 canvas is unpadded to
    rows 1..6, so the run is 16 base tokens + 6 rows x (8 + 1 newline) = 70 and the recall grid is 6 x 8.
    Cell (i, j) -> canvas token 16 + 9 i + j; base token (row of the centre (i + .5) / 6 * 4, col j // 2)."""
    grid, cover = anyres_cover((40, 60), PINS, 32, 8)
    assert grid == (6, 8) and cover.shape == (48, 2)
    # cell: (base, canvas), worked out by hand
    expected = {0: (0, 16), 10: (5, 27), 20: (6, 38), 47: (15, 68), 8: (4, 25), 39: (15, 59)}
    for cell, toks in expected.items():
        assert tuple(cover[cell].tolist()) == toks, cell
    kept = torch.tensor([5, 16, 24])  # base token (1, 1), canvas token (0, 0), the newline after canvas row 0
    # cell 0: its canvas token is kept; cell 10 = (1, 2): its base token 5 is kept; 47 and 20: neither.
    assert relevant_recall(kept, [0, 10, 47, 20], cover) == 0.5
    assert relevant_recall(torch.tensor([24, 34]), [0, 10, 47, 20], cover) == 0.0  # newlines cover nothing
    assert relevant_recall(torch.arange(70), list(range(48)), cover) == 1.0
    assert relevant_recall(None, [3], cover) == 1.0 and relevant_recall(kept, [], cover) is None
    # Without a cover (LLaVA-1.5: the grid is the token grid) the rule is plain membership.
    assert relevant_recall(torch.tensor([1, 2]), [2, 3], None) == 0.5


@pytest.mark.parametrize("size", [(40, 60), (30, 80), (64, 64), (100, 30), (20, 20), (33, 95), (150, 70)])
def test_cover_follows_the_processor_pixels(size):
    """Each pixel encodes its own (row, column) fraction; the pixels the processor puts under every token
    the cover names (base tile and crop canvas) must contain the centre of the cell it covers. A cell
    may lack a canvas token only where transformers' unpadding (which truncates) cut real image rows:
    33 x 95 px keeps canvas rows 1-2 of 0-3 although the image reaches into rows 0 and 3."""
    from mllm_adapters.tiny import build_tiny_llava_next

    _, processor = build_tiny_llava_next()
    H, W = size
    yy, xx = np.mgrid[0:H, 0:W]
    arr = np.stack([(yy + 0.5) / H, (xx + 0.5) / W, np.zeros((H, W))], axis=-1) * 255
    enc = processor(images=[Image.fromarray(arr.round().astype(np.uint8))], text=["USER: <image> ASSISTANT:"],
                    return_tensors="pt")
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean)[:, None, None]
    std = torch.tensor(ip.image_std)[:, None, None]
    pix = enc["pixel_values"][0] * std + mean  # [T, 3, 32, 32] back to [0, 1]
    grid, cover = anyres_cover(size, PINS, 32, 8)
    lay = image_layout(size, PINS, 32, 4)
    gh, gw = grid
    ty, tx = 1.5 / H + 2 / 255, 1.5 / W + 2 / 255  # resampling blur and 8-bit rounding
    for g in range(gh * gw):
        cy, cx = (g // gw + 0.5) / gh, (g % gw + 0.5) / gw
        for col, pos in enumerate(cover[g].tolist()):
            if pos < 0:
                assert col == 1 and size == (33, 95) and g // gw in (0, 3), (size, g)
                continue
            tile, patch = divmod(int(lay.src[pos]), 16)
            r, c = divmod(patch, 4)
            block = pix[tile, :2, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8]  # [2, 8, 8]
            assert block[0].min() - ty <= cy <= block[0].max() + ty, (size, g, pos)
            assert block[1].min() - tx <= cx <= block[1].max() + tx, (size, g, pos)


def test_every_token_covers_a_cell_at_both_geometries():
    """Over many sizes (tiny and LLaVA-NeXT-7B geometry) every base-tile and every canvas token of the run
    covers at least one grid cell (so keeping any of them can count), exactly one where the canvas is
    at least as fine as the tile grid; an extreme aspect ratio whose canvas unpads to nothing falls back
    to the base grid."""
    rng = np.random.RandomState(0)
    for pins, tile, patch, hi in ((PINS, 32, 8, 200), (PINS_7B, 336, 14, 1500)):
        side = tile // patch
        for _ in range(150):
            size = tuple(int(v) for v in rng.randint(5, hi, 2))
            grid, cover = anyres_cover(size, pins, tile, patch)
            lay = image_layout(size, pins, tile, side)
            canvas = cover[:, 1]
            real = [i for i in range(side * side, lay.n_packed) if int(lay.src[i]) >= 0]
            if not real:
                assert grid == (side, side) and bool((canvas < 0).all())
                continue
            assert sorted(set(canvas.tolist()) - {-1}) == real, size  # -1: a centre in a row unpadding cut
            h_rows = int((lay.src < 0).sum())
            if grid == (h_rows, (lay.n_packed - side * side) // h_rows - 1):  # the canvas is the grid: 1:1
                assert sorted(canvas.tolist()) == real, size
            assert sorted(set(cover[:, 0].tolist())) == list(range(side * side)), size  # base: every token
    grid, cover = anyres_cover((125, 6), PINS, 32, 8)  # 8 canvas rows of 0 columns: newlines only
    assert grid == (4, 4) and bool((cover[:, 1] < 0).all()) and cover[:, 0].tolist() == list(range(16))
    assert anyres_cover((192, 192), PINS_7B, 336, 14)[0] == (24, 24)  # a shapes image on the 7B
    assert anyres_cover((336, 1008), PINS_7B, 336, 14)[0] == (24, 72)  # 1 x 3 crops: the canvas is finer
    grid, cover = anyres_cover((177, 52), PINS, 32, 8)  # 8 x 2 canvas, 4 x 4 base: a 8 x 4 grid
    assert grid == (8, 4) and cover[:, 1].tolist() == [16 + 3 * (i // 4) + (i % 4) // 2 for i in range(32)]


def test_loaded_model_recall_cover():
    """LLaVA-1.5: the model's grid and no cover; LLaVA-NeXT: the image's canvas grid, cached per size."""
    from benchmarks.models import load_model

    tiny = load_model({"name": "tiny", "source": "tiny"})
    assert not tiny.size_dependent and tiny.recall_cover(None) == ((6, 6), None) and tiny.num_visual_tokens == 36
    nxt = load_model({"name": "tiny-next", "source": "tiny", "model_class": "LlavaNextForConditionalGeneration",
                      "image_size": 32, "patch_size": 8})
    assert nxt.size_dependent and nxt.num_visual_tokens == 16 + 8 * 9 and nxt.grid_hw == (4, 4)
    assert nxt.image_tokens((40, 60)) == 70 and nxt.image_tokens((30, 80)) == 52
    grid, cover = nxt.recall_cover((40, 60))
    assert grid == (6, 8) and torch.equal(cover, anyres_cover((40, 60), PINS, 32, 8)[1])
    assert nxt.recall_cover([40, 60])[1] is cover
    with pytest.raises(ValueError, match="needs each image's size"):
        nxt.recall_cover(None)
    with pytest.raises(ValueError, match="no tiny builder; accepted for source=tiny"):
        load_model({"name": "x", "source": "tiny", "model_class": "Blip2ForConditionalGeneration"})
