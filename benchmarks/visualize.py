"""Token overlays of a finished sweep: ``python -m benchmarks.visualize results_dir=results [samples=4]``.

For a few samples per (model, task) of ``results_dir``, one PNG each: rows = method variants (the
unpruned reference ``none`` first; each row framed in its method's fixed colour, `benchmarks.palette`),
columns = budgets (``all`` = unpruned, then from the largest budget to the smallest). Every tile is the
sample's image with the visual tokens the cell kept shown clear and the dropped ones dimmed, the task's
answer-relevant patches outlined (cyan), and under it the cell's prediction with a tick or a cross and
its token counts. The question and the answer head the figure. Progressive (in-LLM) methods show their
final kept set (``kept`` of the prediction row) and get one more column: this sample's visual tokens
entering each decoder layer, one step line per budget. ``overlays.json`` in the output folder lists
every file written, with per tile the kept / dimmed / merged counts.

Arguments (OmegaConf dot-list, like `benchmarks.leaderboard`): ``results_dir=DIR`` (default
``results``), ``samples=N`` (default 4) or ``ids=[id,...]``, ``methods=[name,...]`` (only these
methods' or variants' rows, beside the unpruned reference; default all), ``out=DIR`` (default
``<results_dir>/overlays``), ``dpi=N`` (default 72).

Default samples: the ids every cell of the (model, task) scored, the ones where the cells disagree most
first (min(number right, number wrong) over the cells), ties in the reference cell's order.

How kept positions become image regions, from the model's config only (`benchmarks.models.peek_config`,
no weights), per family (`FamilySpec.name`):

- ``llava`` (LLaVA-1.5, the embedded model): position i is patch i of the side x side grid, laid over
  the whole image (as `benchmarks.metrics.relevant_recall` counts it).
- ``llava_next``: positions in the image's packed run (`mllm_adapters.families.llava_next.image_layout`):
  a tile shows two panels, the base tile (the whole image resized to one tile) and the anyres crops
  (the image as the processor resized and padded it onto the best pinpoint, crop borders drawn, the
  padding LLaVA-NeXT unpads dropped); newline slots have no region.
- ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl`` / ``qwen3_vl_moe`` (every spec derived from Qwen2-VL's):
  position i is merged unit i of the image's (rows, cols) unit grid, which the processor's
  ``smart_resize`` gives from the image size and the ``min_pixels``/``max_pixels`` the cell recorded (``metrics.json`` ``image_processor``); checked against the row's ``visual_in``.
- any other family: from its spec's `FamilySpec.recall_cover` (what `relevant_recall` uses): each run
  position's region is the box around the recall-grid cells it covers; positions covering none get
  no region.

Merged tokens (pooling, prumerge, VisionZip's contextual tokens, SparseVLM's recycled ones) have no grid
position: a prediction row lists kept positions only, and the merged ones are counted as the visual
tokens reaching the last decoder layer (``llm_visual_last``, recorded with diagnostics; else
``equiv_tokens`` for methods that prune before the LLM only) minus the kept positions. A tile's caption
shows them as ``+N merged``; for ``pooling`` on a one-view model (``pruner_info.pooled_grid``) the pooled
blocks are drawn too. The patches merged away are still dimmed: "dimmed" means "not kept as itself".
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks import store
from benchmarks.palette import method_colour

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 4
DEFAULT_DPI = 72
#: brightness factor of a dropped patch
DIM = 0.25
#: outline colour of the answer-relevant patches
RELEVANT_COLOUR = "#00e5ff"
#: tile size in inches (one image panel) and the caption height under it
TILE_IN = 1.45
CAPTION_IN = 0.42
#: largest figure, in pixels per side: a sweep with many rows gets a lower dpi rather than a huge file
MAX_SIDE_PX = 6000
INDEX = "overlays.json"
#: colours of the saved PNG (adaptive palette)
PNG_COLOURS = 128
#: gap between the panels of one tile (LLaVA-NeXT: base tile | crops), in image pixels
PANEL_GAP = 6


# ---- where each kept position lies in the image ---------------------------------------------------
@dataclass
class Geometry:
    """How one image's visual run maps onto the image (``image_hw`` = (height, width) px).

    regions:     [N, 4] per run position (y0, y1, x0, x1) in image pixels, NaN for slots with no region
                 (LLaVA-NeXT's newlines).
    panel:       [N] the panel each position is drawn on (-1: none).
    panel_names: the panels of a tile, drawn side by side (each the whole image).
    lines:       per panel, extra segments ((x0, y0), (x1, y1)) in image pixels (crop borders).
    recall_grid: the grid the task's relevant patches are asked on (rows, cols), over the whole image.
    view_grid:   the (rows, cols) patch grid of a one-view model, else None (pooled blocks are drawn
                 only there).
    """

    image_hw: tuple[int, int]
    regions: np.ndarray
    panel: np.ndarray
    panel_names: list[str]
    lines: list[list[tuple[tuple[float, float], tuple[float, float]]]]
    recall_grid: tuple[int, int]
    view_grid: tuple[int, int] | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.regions.shape[0])

    @property
    def has_region(self) -> np.ndarray:
        return self.panel >= 0


def _uniform_regions(rows: int, cols: int, H: int, W: int) -> np.ndarray:
    """[rows * cols, 4] raster cells of a rows x cols grid laid over an H x W image."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([r * H / rows, (r + 1) * H / rows, c * W / cols, (c + 1) * W / cols], axis=1).astype(float)


def family_name(config: Any) -> str:
    from benchmarks.models import family_spec

    return str(family_spec(config).name)


def geometry(config: Any, image_hw: tuple[int, int], image_processor: dict[str, Any] | None = None,
             visual_in: int | None = None) -> Geometry:
    """The `Geometry` of an image of ``image_hw`` = (height, width) px for the model ``config``
    (a transformers config, `benchmarks.models.peek_config`); ``image_processor`` is the cell's
    recorded processor settings (Qwen's pixel bounds), ``visual_in`` the row's unpruned run length
    (checked). ValueError for a family it cannot map."""
    H, W = int(image_hw[0]), int(image_hw[1])
    fam = family_name(config)
    if fam == "llava":
        from mllm_adapters.families.llava import _side

        side = _side(config)
        geo = Geometry((H, W), _uniform_regions(side, side, H, W), np.zeros(side * side, dtype=int), ["image"],
                       [[]], (side, side), view_grid=(side, side))
    elif fam == "llava_next":
        geo = _llava_next_geometry(config, H, W)
    elif _resized_by_qwen_processor(config):
        geo = _qwen_geometry(config, H, W, image_processor or {})
    else:
        geo = _cover_geometry(config, H, W, visual_in)
    if visual_in is not None and int(visual_in) != geo.n_tokens:
        raise ValueError(f"overlays: the {fam} mapping of a {H}x{W} image has {geo.n_tokens} visual positions but "
                         f"the cell recorded visual_in={visual_in}; the processor settings differ from the config's")
    return geo


def _llava_next_geometry(config: Any, H: int, W: int) -> Geometry:
    """Base tile (uniform side x side over the image) and crops (the processor's resize-and-pad onto the
    best pinpoint, as `mllm_adapters.families.llava_next.anyres_cover` computes it)."""
    from transformers.image_processing_utils import select_best_resolution

    from mllm_adapters.families.llava_next import LlavaNextSpec, _pinpoints

    v = config.vision_config
    tile_px, patch_px = int(v.image_size), int(v.patch_size)
    side = tile_px // patch_px
    n2 = side * side
    layout = LlavaNextSpec.layout_for(config, (H, W))
    src = layout.src.numpy()
    best_h, best_w = select_best_resolution([H, W], _pinpoints(config))
    n_rows_t, n_cols_t = best_h // tile_px, best_w // tile_px
    if best_w / W < best_h / H:
        new_w, new_h = best_w, min(math.ceil(H * best_w / W), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(W * best_h / H), best_w)
    pad_y, pad_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    regions = np.full((len(src), 4), np.nan)
    panel = np.full(len(src), -1, dtype=int)
    base = _uniform_regions(side, side, H, W)
    for p, s in enumerate(src):
        if s < 0:
            continue  # a newline slot: no image region
        view, patch = divmod(int(s), n2)
        r, c = divmod(patch, side)
        if view == 0:
            regions[p], panel[p] = base[patch], 0
            continue
        ti, tj = divmod(view - 1, n_cols_t)
        R, C = ti * side + r, tj * side + c  # canvas patch
        y0, y1 = ((R * patch_px - pad_y) * H / new_h, ((R + 1) * patch_px - pad_y) * H / new_h)
        x0, x1 = ((C * patch_px - pad_x) * W / new_w, ((C + 1) * patch_px - pad_x) * W / new_w)
        regions[p] = (max(0.0, y0), min(float(H), y1), max(0.0, x0), min(float(W), x1))
        panel[p] = 1
    names, lines = ["base tile"], [[]]
    if (panel == 1).any():
        names.append(f"crops {n_rows_t}x{n_cols_t}")
        seg = []
        for i in range(1, n_rows_t):
            y = (i * tile_px - pad_y) * H / new_h
            if 0 < y < H:
                seg.append(((0.0, y), (float(W), y)))
        for j in range(1, n_cols_t):
            x = (j * tile_px - pad_x) * W / new_w
            if 0 < x < W:
                seg.append(((x, 0.0), (x, float(H))))
        lines.append(seg)
    grid, _ = LlavaNextSpec.recall_cover(config, (H, W))
    return Geometry((H, W), regions, panel, names, lines, tuple(int(g) for g in grid))


def _resized_by_qwen_processor(config: Any) -> bool:
    """Whether the family is Qwen2-VL's or derived from it (2.5, 3, 3 MoE): its processor resizes each image
    to a merged-unit grid (`_qwen_geometry`)."""
    from benchmarks.models import family_spec
    from mllm_adapters.families.qwen2_vl import Qwen2VLSpec

    return issubclass(family_spec(config), Qwen2VLSpec)


def _cover_geometry(config: Any, H: int, W: int, visual_in: int | None) -> Geometry:
    """Any other family, from what its spec tells recall (`FamilySpec.recall_cover`): the grid laid over
    the whole image and the run positions covering each of its cells; a position's region is the box
    around the cells it covers (positions covering none, such as separator slots, get no region)."""
    from benchmarks.models import family_spec

    grid, cover = family_spec(config).recall_cover(config, (H, W))
    rows, cols = (int(g) for g in grid)
    cells = _uniform_regions(rows, cols, H, W)  # [G, 4]
    if cover is None:  # cell i is run position i
        n = rows * cols if visual_in is None else int(visual_in)
        regions = np.full((n, 4), np.nan)
        regions[: min(n, rows * cols)] = cells[:n]
    else:
        cover = np.asarray(cover).reshape(rows * cols, -1)  # [G, c] run positions, -1 = none
        n = int(cover.max()) + 1 if visual_in is None else int(visual_in)
        regions = np.full((n, 4), np.nan)
        for g, positions in enumerate(cover):
            for p in positions[(positions >= 0) & (positions < n)]:
                old = regions[p]
                regions[p] = cells[g] if np.isnan(old[0]) else (min(old[0], cells[g, 0]), max(old[1], cells[g, 1]),
                                                               min(old[2], cells[g, 2]), max(old[3], cells[g, 3]))
    panel = np.where(np.isnan(regions[:, 0]), -1, 0)
    return Geometry((H, W), regions, panel, ["image"], [[]], (rows, cols))


def _qwen_geometry(config: Any, H: int, W: int, image_processor: dict[str, Any]) -> Geometry:
    """The merged-unit grid of Qwen's processor (``smart_resize`` with the recorded pixel bounds)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    size = image_processor.get("size") or {}
    lo = image_processor.get("min_pixels", size.get("shortest_edge") if isinstance(size, dict) else None)
    hi = image_processor.get("max_pixels", size.get("longest_edge") if isinstance(size, dict) else None)
    if lo is None or hi is None:
        raise ValueError("overlays: a Qwen cell must record its processor's min_pixels/max_pixels (metrics.json "
                         f"image_processor); got {image_processor!r}")
    v = config.vision_config
    patch = int(image_processor.get("patch_size") or v.patch_size)
    merge = int(image_processor.get("merge_size") or v.spatial_merge_size)
    rh, rw = smart_resize(H, W, factor=patch * merge, min_pixels=int(lo), max_pixels=int(hi))
    rows, cols = rh // (patch * merge), rw // (patch * merge)
    return Geometry((H, W), _uniform_regions(rows, cols, H, W), np.zeros(rows * cols, dtype=int), ["image"], [[]],
                    (rows, cols))


# ---- one tile ------------------------------------------------------------------------------------
@dataclass
class Tile:
    """A rendered tile: ``pixels`` [h, w, 3] uint8 (the panels side by side), per run position whether
    it is dimmed (``dimmed`` [N] bool; positions with no region are never dimmed), and each panel's
    x offset in ``pixels``."""

    pixels: np.ndarray
    dimmed: np.ndarray
    offsets: list[int]
    geometry: Geometry

    @property
    def n_dimmed(self) -> int:
        return int(self.dimmed.sum())


def _px(v: float) -> int:
    return int(math.floor(v + 0.5))


def render_tile(image: Any, geo: Geometry, kept: list[int] | None) -> Tile:
    """The image (PIL or [H, W, 3] array) with the run positions not in ``kept`` dimmed (``kept`` None:
    every position kept), one panel per `Geometry.panel_names` side by side."""
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    H, W = geo.image_hw
    if img.shape[:2] != (H, W):
        raise ValueError(f"overlays: image of {img.shape[:2]} px for a geometry of {(H, W)}")
    keep = np.zeros(geo.n_tokens, dtype=bool)
    if kept is None:
        keep[:] = True
    else:
        idx = np.asarray(list(kept), dtype=int)
        if idx.size and (idx.min() < 0 or idx.max() >= geo.n_tokens):
            raise ValueError(f"overlays: kept position out of range 0..{geo.n_tokens - 1}")
        keep[idx] = True
    dimmed = geo.has_region & ~keep
    n_panels = len(geo.panel_names)
    offsets = [i * (W + PANEL_GAP) for i in range(n_panels)]
    canvas = np.full((H, n_panels * W + (n_panels - 1) * PANEL_GAP, 3), 255.0, dtype=np.float32)
    for k, off in enumerate(offsets):
        lit = np.zeros((H, W), dtype=bool)
        for p in np.nonzero((geo.panel == k) & keep)[0]:
            y0, y1, x0, x1 = geo.regions[p]
            lit[_px(y0):_px(y1), _px(x0):_px(x1)] = True
        canvas[:, off:off + W] = np.where(lit[..., None], img, img * DIM)
    return Tile(canvas.clip(0, 255).astype(np.uint8), dimmed, offsets, geo)


def relevant_segments(relevant: list[int], grid: tuple[int, int], H: int, W: int
                      ) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Outline of the union of the ``relevant`` cells of a ``grid`` = (rows, cols) over an H x W image:
    the cell edges between a relevant cell and a non-relevant one (or the border), in image pixels."""
    gh, gw = grid
    m = np.zeros((gh + 2, gw + 2), dtype=bool)
    for p in relevant:
        r, c = divmod(int(p), gw)
        m[r + 1, c + 1] = True
    ys, xs = H / gh, W / gw
    seg = []
    for r in range(gh):
        for c in range(gw):
            if not m[r + 1, c + 1]:
                continue
            y0, y1, x0, x1 = r * ys, (r + 1) * ys, c * xs, (c + 1) * xs
            if not m[r, c + 1]:
                seg.append(((x0, y0), (x1, y0)))
            if not m[r + 2, c + 1]:
                seg.append(((x0, y1), (x1, y1)))
            if not m[r + 1, c]:
                seg.append(((x0, y0), (x0, y1)))
            if not m[r + 1, c + 2]:
                seg.append(((x1, y0), (x1, y1)))
    return seg


def pooled_segments(view_grid: tuple[int, int], pooled: tuple[int, int], H: int, W: int
                    ) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Borders of `pruners.pooling`'s blocks (patch (r, c) -> block (r * h // rows, c * w // cols))."""
    rows, cols = view_grid
    h, w = pooled
    seg = []
    for r in range(1, rows):
        if r * h // rows != (r - 1) * h // rows:
            seg.append(((0.0, r * H / rows), (float(W), r * H / rows)))
    for c in range(1, cols):
        if c * w // cols != (c - 1) * w // cols:
            seg.append(((c * W / cols, 0.0), (c * W / cols, float(H))))
    return seg


def merged_count(row: dict[str, Any]) -> int:
    """Merged tokens (no grid position) of a prediction row reaching the LLM (see the module docstring)."""
    if row.get("kept") is None:
        return 0
    n_kept = int(row.get("n_kept") or 0)
    last = row.get("llm_visual_last")
    if last is None:
        if row.get("kept_by_layer"):
            return 0  # in-LLM pruning: the tokens reaching the LLM are not recorded per sample
        last = round(float(row.get("equiv_tokens") or n_kept))
    return max(0, int(last) - n_kept)


def layer_counts(row: dict[str, Any], n_layers: int) -> list[int] | None:
    """This sample's visual tokens entering each decoder layer of an in-LLM method (kept positions of
    ``kept_by_layer``; before the first pruning layer, every token reaching the LLM), or None."""
    kbl = row.get("kept_by_layer")
    if not kbl:
        return None
    first = int(row.get("visual_in") or 0)
    marks = sorted((int(k), sum(len(x) for x in v)) for k, v in kbl.items())
    out, cur, j = [], first, 0
    for layer in range(n_layers):
        while j < len(marks) and marks[j][0] <= layer:
            cur = marks[j][1]
            j += 1
        out.append(cur)
    return out


# ---- the results -----------------------------------------------------------------------------------
@dataclass
class Cell:
    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    rows: dict[str, dict[str, Any]]
    order: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.metrics["method"])

    @property
    def variant(self) -> str:
        return str(self.metrics.get("variant") or self.metrics["method"])

    @property
    def budget(self) -> Any:
        return self.metrics["budget"]


def _budget_label(b: Any) -> str:
    return "all" if b is None else str(b) if isinstance(b, str) else f"{b:g}" if isinstance(b, float) else str(int(b))


def _budget_order(b: Any) -> tuple:
    if b is None:
        return (0, 0.0)
    if b == "auto":
        return (1, 0.0)
    return (2, -float(b)) if isinstance(b, float) else (3, -float(b))


def read_cells(results_dir: str | Path) -> list[Cell]:
    """Every finished cell under ``results_dir`` (unreadable ones are logged and left out)."""
    import yaml

    cells = []
    for folder in store.cell_folders(results_dir):
        why = store.cell_problem(folder)
        if why is not None:
            log.warning("overlays: unreadable cell %s (%s): left out", folder, why)
            continue
        rows = store.read_predictions(folder)
        cells.append(Cell(folder, store.read_metrics(folder),
                          yaml.safe_load((folder / store.CONFIG).read_text(encoding="utf-8")),
                          {str(r["id"]): r for r in rows}, [str(r["id"]) for r in rows]))
    return cells


def _seed_rank(c: Cell) -> tuple:
    """Among cells of one (variant, budget): the run's own seed first, then more samples, then the path."""
    ms, s = c.metrics.get("method_seed", c.metrics.get("seed")), c.metrics.get("seed")
    return (ms != s, -int(c.metrics.get("n_samples") or 0), str(c.path))


def choose_ids(cells: list[Cell], n: int) -> list[str]:
    """The ``n`` ids every cell scored, most disagreed-on first (min(right, wrong) over the cells), ties in
    the first cell's (the reference's) order; fewer when fewer are common, then the first cell's own."""
    ref = next((c for c in cells if c.budget is None), cells[0])
    common = [i for i in ref.order if all(i in c.rows for c in cells)]
    pool = common or ref.order

    def disagreement(i: str) -> int:
        scores = [float(c.rows[i].get("score") or 0.0) for c in cells if i in c.rows]
        right = sum(1 for s in scores if s > 0.5)
        return min(right, len(scores) - right)

    ranked = sorted(range(len(pool)), key=lambda k: (-disagreement(pool[k]), k))
    return [pool[k] for k in ranked[:n]]


def _samples_by_id(cells: list[Cell], wanted: set[str]) -> dict[str, Any]:
    """The task samples behind ``wanted`` ids, regenerated from the cells' configs (task, split, n, seed)."""
    from benchmarks.tasks import get_task, tasks_for

    found: dict[str, Any] = {}
    seen: set[tuple] = set()
    for c in sorted(cells, key=lambda c: -int(c.metrics.get("n_samples") or 0)):
        if wanted <= set(found):
            break
        tcfg = dict(c.config.get("task") or {"name": c.metrics["task"]})
        key = (json.dumps(tcfg, sort_keys=True, default=str), c.config.get("n_samples"), c.config.get("seed"))
        if key in seen:
            continue
        seen.add(key)
        try:
            task = next((t for t, rec in tasks_for(tcfg) if str(rec.get("name", t.name)) == c.metrics["task"]
                         or t.name == c.metrics["task"]), None) or get_task(str(c.metrics["task"]))
        except Exception:  # noqa: BLE001 - fall back to the recorded name
            task = get_task(str(c.metrics["task"]))
        n = c.config.get("n_samples")
        for s in task.samples(split=str(tcfg.get("split", "eval")), n=None if n is None else int(n),
                              seed=int(c.config.get("seed", 0))):
            if str(s.id) in wanted:
                found.setdefault(str(s.id), s)
    return found


# ---- the figure ------------------------------------------------------------------------------------
def _safe(name: Any) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name)) or "_"


def _draw_segments(ax: Any, segs: list, offset: float, colour: str, lw: float, ls: str = "-") -> None:
    from matplotlib.collections import LineCollection

    if segs:
        ax.add_collection(LineCollection([[(x0 + offset, y0), (x1 + offset, y1)] for (x0, y0), (x1, y1) in segs],
                                         colors=colour, linewidths=lw, linestyles=ls))


def _ink(colour: str) -> str:
    """``colour`` darkened for text and thin lines (tab20's light half is hard to read on white)."""
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    light = (0.299 * r + 0.587 * g + 0.114 * b) / 255
    f = 0.55 if light > 0.6 else 0.8 if light > 0.45 else 1.0
    return "#" + "".join(f"{int(v * f):02x}" for v in (r, g, b))


def overlay_sample(sample: Any, cells: list[Cell], config: Any, path: Path, dpi: int = DEFAULT_DPI
                   ) -> dict[str, Any]:
    """Write the overlay PNG of ``sample`` over ``cells`` (one model and task) to ``path``; returns its
    index entry (file, bytes, and per tile variant, budget, kept / dimmed / merged counts, score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    sid = str(sample.id)
    if getattr(sample, "extra_images", None):
        raise ValueError(f"overlays: sample {sid!r} holds {1 + len(sample.extra_images)} images; overlays draw "
                         "one-image samples (pick them with ids=[...])")
    H, W = sample.image.height, sample.image.width
    by_key: dict[tuple[str, str], Cell] = {}
    for c in sorted(cells, key=_seed_rank):
        if sid in c.rows:
            by_key.setdefault((c.variant, _budget_label(c.budget)), c)
    variants = sorted({c.variant for c in cells}, key=lambda v: (v != "none", v))
    budgets = sorted({c.budget for c in cells}, key=_budget_order)
    labels = [_budget_label(b) for b in budgets]
    progressive = {c.variant for c in cells if sid in c.rows and c.rows[sid].get("kept_by_layer")}
    method_of = {c.variant: c.method for c in cells}
    ref = next((c for c in cells if sid in c.rows), None)
    geo = geometry(config, (H, W), (ref.metrics.get("image_processor") if ref else None),
                   ref.rows[sid].get("visual_in") if ref else None)
    relevant = list(sample.relevant_patches(geo.recall_grid))
    rel_seg = relevant_segments(relevant, geo.recall_grid, H, W)
    n_panels = len(geo.panel_names)
    tile_w = TILE_IN * min(2.0, (n_panels * W + (n_panels - 1) * PANEL_GAP) / H)
    ncols = len(labels) + (1 if progressive else 0)
    header_in = 0.75
    fig_w = 0.9 + ncols * (tile_w + 0.12)
    fig_h = header_in + len(variants) * (TILE_IN + CAPTION_IN + 0.08)
    dpi = int(max(24, min(dpi, MAX_SIDE_PX / max(fig_w, fig_h))))
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    tiles_info = []
    row_h = (TILE_IN + CAPTION_IN + 0.08) / fig_h
    for ri, variant in enumerate(variants):
        colour = method_colour(method_of[variant])
        top = 1 - header_in / fig_h - ri * row_h
        fig.text(0.08 / fig_w, top - (TILE_IN / 2) / fig_h, variant, rotation=90, va="center", ha="left",
                 fontsize=8, color=_ink(colour), fontweight="bold")
        for ci, label in enumerate(labels):
            cell = by_key.get((variant, label))
            if cell is None:
                continue
            left = (0.6 + ci * (tile_w + 0.12)) / fig_w
            ax = fig.add_axes((left, top - TILE_IN / fig_h, tile_w / fig_w, TILE_IN / fig_h))
            row = cell.rows[sid]
            kept = None if row.get("kept") is None else [p for per_image in row["kept"] for p in per_image]
            tile = render_tile(sample.image, geo, kept)
            ax.imshow(tile.pixels, interpolation="nearest")
            for k, off in enumerate(tile.offsets):
                _draw_segments(ax, rel_seg, off, RELEVANT_COLOUR, 1.0)
                _draw_segments(ax, geo.lines[k], off, "white", 0.8, "--")
            pooled = (cell.metrics.get("pruner_info") or {}).get("pooled_grid")
            if pooled and geo.view_grid is not None and n_panels == 1:
                _draw_segments(ax, pooled_segments(geo.view_grid, tuple(pooled), H, W), 0, colour, 1.0, ":")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_color(colour)
                s.set_linewidth(2.0)
            kept_set = set(range(geo.n_tokens)) if kept is None else set(kept)
            n_kept = sum(1 for p in kept_set if geo.panel[p] >= 0)  # kept positions with an image region
            n_slots = len(kept_set) - n_kept  # kept slots without one (LLaVA-NeXT's newlines)
            merged = merged_count(row)
            ok = float(row.get("score") or 0.0) > 0.5
            pred = textwrap.shorten(str(row.get("prediction", "")), width=22, placeholder="…")
            counts = (f"kept {n_kept}/{int(geo.has_region.sum())}" + (f" +{n_slots} nl" if n_slots else "")
                      + (f" +{merged} merged" if merged else ""))
            ax.set_title(f"b={label}", fontsize=6.5, pad=2)
            ax.text(0.5, -0.04, f"{'✓' if ok else '✗'} {pred}\n{counts}", transform=ax.transAxes, ha="center",
                    va="top", fontsize=6.5, color="#1a7f1a" if ok else "#c00000")
            tiles_info.append({"variant": variant, "method": cell.method, "budget": cell.budget,
                               "cell": str(cell.path), "prediction": row.get("prediction"), "score": row.get("score"),
                               "n_kept": n_kept, "n_kept_slots": n_slots, "n_dimmed": tile.n_dimmed, "n_merged": merged,
                               "n_positions": int(geo.has_region.sum())})
        if variant in progressive:
            left = (0.6 + len(labels) * (tile_w + 0.12) + 0.15) / fig_w
            ax = fig.add_axes((left, top - TILE_IN / fig_h, (tile_w - 0.2) / fig_w, TILE_IN / fig_h))
            ymax, k = 1, 0
            for label in labels:
                cell = by_key.get((variant, label))
                if cell is None or not cell.rows[sid].get("kept_by_layer"):
                    continue
                n_layers = len(cell.metrics.get("llm_visual_tokens_per_layer") or []) or 1
                ys = layer_counts(cell.rows[sid], n_layers) or []
                ymax = max(ymax, *ys)
                ax.step(range(len(ys)), ys, where="post", color=_ink(colour), lw=1.2,
                        ls=("-", "--", ":", "-.")[k % 4], label=f"b={label}")
                k += 1
            ax.set_ylim(0, ymax * 1.08)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=5.5, length=2, pad=1)
            ax.set_xlabel("decoder layer", fontsize=6, labelpad=1)
            ax.set_title("visual tokens per layer", fontsize=6.5, pad=2)
            ax.legend(fontsize=5.5, frameon=False, loc="upper right", handlelength=1.2)
    q = textwrap.shorten(str(sample.question), width=110, placeholder="…")
    fig.text(0.5, 1 - 0.12 / fig_h, f"{sid} ({sample.family}): {q}  answer: {sample.answer}", ha="center", va="top",
             fontsize=8)
    fig.text(0.5, 1 - 0.38 / fig_h, "clear: kept tokens; dimmed: dropped (or merged away); cyan: answer-relevant "
             "patches" + ("; dashed: anyres crop borders" if n_panels > 1 else ""), ha="center", va="top",
             fontsize=6.5, color="#444444")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{store.TMP_PREFIX}{path.name}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    buf.seek(0)
    # 128 colours, no dithering: the noisy task images compress ~3x smaller, the overlays read the same
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=PNG_COLOURS, method=Image.Quantize.MEDIANCUT,
                                   dither=Image.Dither.NONE).save(tmp, format="PNG", optimize=True)
    tmp.replace(path)
    return {"id": sid, "file": str(path), "bytes": path.stat().st_size, "family": sample.family,
            "question": sample.question, "answer": sample.answer, "panels": geo.panel_names, "tiles": tiles_info}


def write_overlays(results_dir: str | Path, out: str | Path | None = None, samples: int = DEFAULT_SAMPLES,
                   ids: list[str] | None = None, dpi: int = DEFAULT_DPI,
                   methods: list[str] | None = None) -> dict[str, Any]:
    """One overlay PNG per chosen sample and (model, task) of ``results_dir`` under ``out`` (default
    ``<results_dir>/overlays``, one folder per model and task) and ``overlays.json`` listing them;
    returns that index. ``ids``: these sample ids (each must be in some cell), else ``samples`` of them
    chosen by `choose_ids`. ``methods``: only the cells of these methods or variants (and the unpruned
    reference)."""
    from benchmarks.models import peek_config

    results_dir = Path(results_dir)
    out = Path(out) if out is not None else results_dir / "overlays"
    cells = read_cells(results_dir)
    if not cells:
        raise FileNotFoundError(f"no finished cells under {results_dir / store.CELLS}; run benchmarks.run first")
    if ids is None and (isinstance(samples, bool) or int(samples) < 1):
        raise ValueError(f"samples={samples!r}: accepted a positive int (or ids=[...])")
    if methods is not None:
        cells = _only_methods(cells, [str(m) for m in methods])
    groups: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        groups.setdefault((str(c.metrics["model"]), str(c.metrics["task"])), []).append(c)
    index: dict[str, Any] = {"results_dir": str(results_dir), "groups": [], "total_bytes": 0}
    for (model, task), group in sorted(groups.items()):
        if ids is not None:
            chosen = [str(i) for i in ids if any(str(i) in c.rows for c in group)]
            if not chosen:
                some = ", ".join(group[0].order[:5])
                log.warning("overlays: none of ids=%s is in the cells of %s/%s (e.g. %s): skipped", list(ids),
                            model, task, some)
                continue
        else:
            chosen = choose_ids(group, int(samples))
        config = peek_config((group[0].config or {}).get("model") or {"name": model})
        found = _samples_by_id(group, set(chosen))
        missing = [i for i in chosen if i not in found]
        if missing:
            raise ValueError(f"overlays: the task {task!r} does not regenerate the sample ids {missing} of its "
                             "cells (task code changed since the sweep?)")
        files = []
        folder = out / _safe(f"{model}__{task}")
        for sid in chosen:
            entry = overlay_sample(found[sid], group, config, folder / f"{_safe(sid)}.png", dpi=dpi)
            files.append(entry)
            index["total_bytes"] += entry["bytes"]
        index["groups"].append({"model": model, "task": task, "family": family_name(config), "files": files})
    out.mkdir(parents=True, exist_ok=True)
    store.atomic_write_text(out / INDEX, json.dumps(index, indent=1, default=str) + "\n")
    index["index"] = str(out / INDEX)
    return index


def _only_methods(cells: list[Cell], methods: list[str]) -> list[Cell]:
    """The cells of ``methods`` (method or variant names) and the unpruned reference; a ValueError
    naming the finished methods when one of ``methods`` has no cell."""
    have = {str(c.metrics.get(k)) for c in cells for k in ("method", "variant") if c.metrics.get(k)}
    unknown = [m for m in methods if m not in have]
    if unknown:
        raise ValueError(f"overlays: methods={unknown} have no finished cell; accepted: {', '.join(sorted(have))}")
    wanted = {"none", *methods}
    return [c for c in cells if {str(c.metrics.get("method")), str(c.metrics.get("variant"))} & wanted]


ARGS = ("results_dir", "samples", "ids", "methods", "out", "dpi")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m benchmarks.visualize results_dir=DIR [samples=N | ids=[...]] [methods=[...]] [out=DIR]
    [dpi=N]``
    (OmegaConf dot-list arguments)."""
    from omegaconf import OmegaConf

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = OmegaConf.to_container(OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv)))
    unknown = set(args) - set(ARGS)
    if unknown:
        raise SystemExit(f"unknown argument(s) {sorted(unknown)}; accepted: results_dir=DIR, samples=N, "
                         "ids=[id,...], methods=[name,...], out=DIR, dpi=N")
    ids = args.get("ids")
    methods = args.get("methods")
    if methods is not None and not isinstance(methods, list):
        methods = [methods]
    if ids is not None and not isinstance(ids, list):
        ids = [ids]
    index = write_overlays(args.get("results_dir", "results"), args.get("out"),
                           samples=int(args.get("samples", DEFAULT_SAMPLES)), ids=ids,
                           dpi=int(args.get("dpi", DEFAULT_DPI)), methods=methods)
    for g in index["groups"]:
        for f in g["files"]:
            print(f"{f['file']} ({f['bytes'] / 1e3:.0f} kB)")
    print(f"wrote {index['index']}: {sum(len(g['files']) for g in index['groups'])} overlay(s), "
          f"{index['total_bytes'] / 1e6:.2f} MB")
    return index


if __name__ == "__main__":
    main()
