"""The shapes task: determinism, fixed eval split, answers consistent with the rendered pixels,
relevant patches covering the answer objects, registry errors. Runs in a few seconds on CPU."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.tasks import Sample, available_tasks, get_task
from benchmarks.tasks.shapes import eval_keys, sample_key, training_stream
from benchmarks.tasks.shapes import generator as G


@pytest.fixture(scope="module")
def task():
    return get_task("shapes")


@pytest.fixture(scope="module")
def eval_samples(task) -> list[Sample]:
    return task.samples("eval")


def _same(a: Sample, b: Sample) -> bool:
    return (a.id, a.question, a.answer, a.family, a.meta) == (b.id, b.question, b.answer, b.family, b.meta) and (
        np.array_equal(np.asarray(a.image), np.asarray(b.image))
    )


def test_registry(task):
    assert "shapes" in available_tasks()
    assert task.families == ["colour", "shape", "count", "exists", "digit", "relation"]
    with pytest.raises(ValueError, match="shapes"):
        get_task("no-such-task")
    with pytest.raises(ValueError, match="split"):
        task.samples("test")
    with pytest.raises(ValueError, match="'n'"):
        task.samples("eval", n=1001)
    with pytest.raises(ValueError, match="'n'"):
        task.samples("train")


def test_eval_split_fixed_and_deterministic(task, eval_samples):
    assert len(eval_samples) == 1000
    again = task.samples("eval", n=30, seed=123)  # seed is ignored for the fixed eval split
    assert all(_same(a, b) for a, b in zip(eval_samples[:30], again))
    counts = {f: sum(s.family == f for s in eval_samples) for f in task.families}
    assert min(counts.values()) >= 166  # families in rotation
    assert len({s.id for s in eval_samples}) == 1000
    val = task.samples("val", n=30)
    assert not any(_same(a, b) for a, b in zip(eval_samples[:30], val))


def test_training_stream_deterministic_and_disjoint(task):
    a = task.samples("train", n=20, seed=7)
    b = task.samples("train", n=20, seed=7)
    c = task.samples("train", n=20, seed=8)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not all(_same(x, y) for x, y in zip(a, c))
    keys = eval_keys()
    assert len(keys) >= 990  # a few eval items can share a structure (e.g. one-object scenes)
    assert not any(sample_key(s) in keys for s in training_stream(seed=0, n=300))


def _pixel(img: np.ndarray, x: float, y: float) -> np.ndarray:
    """Median colour of the 3x3 block around (x, y): robust to the per-pixel noise."""
    x, y = int(round(x)), int(round(y))
    return np.median(img[y - 1: y + 2, x - 1: x + 2].reshape(-1, 3), axis=0)


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(G.COLOURS, key=lambda c: float(np.abs(np.array(G.COLOURS[c]) - rgb).sum()))


def _filled(img: np.ndarray, obj: dict, x: float, y: float) -> bool:
    return float(np.abs(_pixel(img, x, y) - np.array(G.COLOURS[obj["colour"]])).max()) < 45


def _shape_from_pixels(img: np.ndarray, obj: dict) -> str:
    """Classify the rendered shape from three probe points (square corner, circle's left edge)."""
    h = G.SIZES[obj["size"]]
    s = round(h * 0.85)
    cx, cy = obj["cx"], obj["cy"]
    if _filled(img, obj, cx - 0.85 * s, cy - 0.85 * s):
        return "square"
    if _filled(img, obj, cx - 0.8 * h, cy):
        return "circle"
    return "triangle"


def test_answers_match_rendered_pixels(eval_samples):
    for s in eval_samples[:300]:
        img = np.asarray(s.image).astype(float)
        assert s.image.mode == "RGB" and img.shape == (192, 192, 3)
        objs = s.meta["scene"]["objects"]
        # the scene description matches the pixels: every object centre shows its colour and shape
        for o in objs:
            assert _nearest_colour(_pixel(img, o["cx"], o["cy"])) == o["colour"], s.id
            assert _shape_from_pixels(img, o) == o["shape"], s.id
        seen = [(_nearest_colour(_pixel(img, o["cx"], o["cy"])), _shape_from_pixels(img, o)) for o in objs]
        q = s.question.split()
        if s.family == "colour":
            target = [c for c, sh in seen if sh == q[-2]]
            assert target == [s.answer]  # the named shape is unique and has that colour
        elif s.family == "count":
            assert G.NUMBER_WORDS.index(s.answer) == sum(c == q[2] for c, _ in seen)
        elif s.family == "exists":
            assert s.answer == ("yes" if (q[3], q[4]) in seen else "no")
        elif s.family == "shape":
            row, col = G.NUMBER_WORDS.index(q[6]) - 1, G.NUMBER_WORDS.index(q[8]) - 1
            o = next(o for o in objs if (o["row"], o["col"]) == (row, col))
            assert _shape_from_pixels(img, o) == s.answer
        elif s.family == "relation":
            a = objs[seen.index((q[2], q[3]))]
            b = objs[seen.index((q[9], q[10]))]
            assert s.answer == ("left" if a["cx"] < b["cx"] else "right")
        elif s.family == "digit":
            d = s.meta["scene"]["digit"]
            x0, y0 = d["cx"] - G.DIGIT_W // 2, d["cy"] - G.DIGIT_H // 2
            lit = set()
            for seg, ((ax, ay), (bx, by)) in G._SEGMENTS.items():
                mx, my = x0 + (ax + bx) / 2 * G.DIGIT_W, y0 + (ay + by) / 2 * G.DIGIT_H
                if _pixel(img, mx, my).min() > 215:  # white stroke
                    lit.add(seg)
            assert lit == set(G._DIGIT_SEGMENTS[G.NUMBER_WORDS.index(s.answer)]), s.id  # the shown digit


def test_relevant_patches_cover_answer_objects(eval_samples):
    for s in eval_samples[:200]:
        scene = s.meta["scene"]
        items = [scene["objects"][i] for i in s.meta["relevant_objects"]]
        if s.meta["relevant_digit"]:
            items.append(scene["digit"])
        assert items, s.id
        for gh, gw in [(12, 12), (24, 24), (6, 8)]:
            rel = s.relevant_patches((gh, gw))
            assert len(rel) == len(set(rel)) and all(0 <= p < gh * gw for p in rel)
            for it in items:  # the patch holding each relevant item's centre is listed
                p = (it["cy"] * gh // 192) * gw + it["cx"] * gw // 192
                assert p in rel, (s.id, (gh, gw))
        rel = s.relevant_patches((12, 12))
        centres = list(dict.fromkeys((it["cy"] * 12 // 192) * 12 + it["cx"] * 12 // 192 for it in items))
        assert rel[: len(centres)] == centres  # priority order: centre patches first
        # patches far from every relevant item are not listed
        for p in rel:
            r, c = divmod(p, 12)
            assert any(abs(r * 16 + 8 - it["cy"]) <= 30 and abs(c * 16 + 8 - it["cx"]) <= 30 for it in items)
    with pytest.raises(ValueError, match="grid_hw"):
        eval_samples[0].relevant_patches((0, 12))


def test_score_normalises(task, eval_samples):
    s = eval_samples[0]
    assert task.score(f"  {s.answer.upper()}. extra words", s) == 1.0
    assert task.score("", s) == 0.0
    assert task.score("purple-ish", s) == 0.0
