"""Token overlays (benchmarks.visualize) of a tiny sweep on the embedded model, and the method palette."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image

from benchmarks import palette, store
from benchmarks import run as runner
from benchmarks import visualize as viz

ROOT = Path(__file__).resolve().parent.parent
N_VIS = 144  # embedded: 12 x 12 patches of a 192 px image
FAST = ["model=embedded", "task=shapes", "n_samples=3", "batch_size=3", "latency.n_samples=1", "latency.warmup=0",
        "latency.decode_tokens=2", "progress=false"]


def _run(results: Path, *extra: str) -> list[Path]:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*FAST, f"results_dir={results}", *extra])
    return runner.run(cfg)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("sweep")
    _run(results, "method=fastv", "budgets=[null,36]")
    _run(results, "method=pooling", "budgets=[36]")
    return results


def test_overlays_files_counts_and_size(sweep, tmp_path):
    out = tmp_path / "overlays"
    index = viz.main([f"results_dir={sweep}", f"out={out}", "samples=2"])
    assert json.loads((out / viz.INDEX).read_text())["total_bytes"] == index["total_bytes"]
    (group,) = index["groups"]
    assert group["model"] == "embedded" and group["family"] == "llava" and len(group["files"]) == 2
    rows = {c.parts[-2]: {r["id"]: r for r in store.read_predictions(c)} for c in store.iter_cells(sweep)}
    for f in group["files"]:
        path = Path(f["file"])
        assert path.is_file() and path.stat().st_size == f["bytes"] < 1_000_000
        with Image.open(path) as im:
            assert max(im.size) <= viz.MAX_SIDE_PX
        tiles = {t["variant"]: t for t in f["tiles"]}
        assert set(tiles) == {"none", "fastv", "pooling"}
        for variant, t in tiles.items():
            row = rows[variant][f["id"]]
            assert t["n_positions"] == N_VIS and t["n_kept"] == row["n_kept"]
            assert t["n_dimmed"] == N_VIS - row["n_kept"]
        assert tiles["none"]["n_dimmed"] == 0 and tiles["fastv"]["n_kept"] == 36
        # pooling keeps no patch as itself: every patch dimmed, its pooled tokens counted as merged
        assert tiles["pooling"]["n_kept"] == 0 and tiles["pooling"]["n_merged"] == 36
    # the default choice is deterministic
    again = viz.write_overlays(sweep, tmp_path / "again", samples=2)
    assert [f["id"] for f in again["groups"][0]["files"]] == [f["id"] for f in group["files"]]


def test_dimmed_pixels_match_kept(sweep):
    from benchmarks.models import peek_config
    from benchmarks.tasks import get_task

    cell = next(c for c in store.iter_cells(sweep) if c.parts[-2] == "fastv")
    row = store.read_predictions(cell)[0]
    sample = next(s for s in get_task("shapes").samples(split="eval", n=3) if s.id == row["id"])
    model_cfg = yaml.safe_load((cell / store.CONFIG).read_text())["model"]
    geo = viz.geometry(peek_config(model_cfg),
                       (sample.image.height, sample.image.width), visual_in=row["visual_in"])
    tile = viz.render_tile(sample.image, geo, row["kept"][0])
    assert tile.n_dimmed == N_VIS - row["n_kept"] == N_VIS - 36
    img = np.asarray(sample.image, dtype=np.float32)
    # per patch: kept ones are the image unchanged, dropped ones the image times DIM (16 px patches)
    dimmed_px = 0
    for p in range(N_VIS):
        r, c = divmod(p, 12)
        got = tile.pixels[16 * r:16 * (r + 1), 16 * c:16 * (c + 1)].astype(np.float32)
        ref = img[16 * r:16 * (r + 1), 16 * c:16 * (c + 1)]
        if np.allclose(got, ref, atol=0.5):
            assert p in row["kept"][0]
        else:
            assert np.allclose(got, np.floor(ref * viz.DIM), atol=1.0)
            dimmed_px += 1
    assert dimmed_px == N_VIS - 36


def test_geometry_of_other_families():
    """LLaVA-NeXT's packed run and Qwen's unit grid map onto the image from the config alone."""
    from benchmarks.models import peek_config

    next_cfg = peek_config({"name": "tiny-next", "source": "tiny", "model_class": "LlavaNextForConditionalGeneration",
                            "image_size": 32, "patch_size": 8, "grid_pinpoints": [[32, 64], [64, 32], [64, 64]]})
    geo = viz.geometry(next_cfg, (192, 192), visual_in=88)
    assert geo.panel_names[0] == "base tile" and len(geo.panel_names) == 2
    assert int((geo.panel == 0).sum()) == 16 and int((geo.panel == 1).sum()) == 64 and int((geo.panel < 0).sum()) == 8
    assert np.nanmin(geo.regions) >= 0 and np.nanmax(geo.regions) <= 192
    qwen_cfg = peek_config({"name": "tiny-qwen2-vl", "source": "tiny", "model_class": "Qwen2VLForConditionalGeneration"})
    geo = viz.geometry(qwen_cfg, (192, 192), {"size": {"shortest_edge": 1024, "longest_edge": 9216},
                                              "patch_size": 8, "merge_size": 2}, visual_in=36)
    assert geo.recall_grid == (6, 6) and geo.n_tokens == 36
    with pytest.raises(ValueError, match="visual_in"):
        viz.geometry(qwen_cfg, (192, 192), {"min_pixels": 1024, "max_pixels": 9216}, visual_in=35)


def test_method_colour_is_stable():
    names = ["fastv", "pooling", "visionzip", "pdrop"]
    here = [palette.method_colour(n) for n in names]
    assert all(c in palette.PALETTE for c in here) and palette.method_colour("none") == palette.REFERENCE_COLOUR
    code = f"from benchmarks.palette import method_colour; print(','.join(method_colour(n) for n in {names!r}))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip().split(",") == here


def test_methods_chooses_the_rows(sweep, tmp_path):
    index = viz.main([f"results_dir={sweep}", f"out={tmp_path}", "samples=1", "methods=[pooling]"])
    (f,) = index["groups"][0]["files"]
    assert {t["variant"] for t in f["tiles"]} == {"none", "pooling"}
    with pytest.raises(ValueError, match=r"methods=\['nope'\] have no finished cell; accepted: .*fastv"):
        viz.write_overlays(sweep, tmp_path / "x", samples=1, methods=["nope"])


@pytest.mark.parametrize(("family", "hw"), [("llava", (192, 192)), ("llava_next", (192, 192)), ("llava_next", (96, 192))])
def test_spec_cover_geometry_agrees_with_the_explicit_mappings(family, hw):
    """A family without its own mapping is drawn from its spec's recall cover: on the families that have
    one, that gives the same positions with a region (and on LLaVA the same boxes)."""
    from mllm_adapters.registry import get_family

    cfg = get_family(family).tiny_config()
    explicit = viz.geometry(cfg, hw)
    generic = viz._cover_geometry(cfg, *hw, explicit.n_tokens)
    assert generic.n_tokens == explicit.n_tokens and (generic.has_region == explicit.has_region).all()
    if family == "llava":
        assert np.allclose(generic.regions, explicit.regions)
