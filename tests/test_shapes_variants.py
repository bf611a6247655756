"""The offline ability-specific tasks built from the shapes generator: shapes_pope (POPE's protocol),
shapes_small (small objects only) and shapes_clutter (crowded scenes)."""

from __future__ import annotations

import pytest

from benchmarks.tasks import get_task
from benchmarks.tasks.shapes_pope import SETTINGS, yes_no_metrics

VARIANTS = ("shapes_pope", "shapes_small", "shapes_clutter")


@pytest.mark.parametrize("name", VARIANTS)
def test_deterministic_and_disjoint_from_shapes(name):
    task = get_task(name)
    a, b = task.samples("eval", n=24), task.samples("eval", n=24)
    assert [(s.id, s.question, s.answer) for s in a] == [(s.id, s.question, s.answer) for s in b]
    assert all(s.meta["task"] == name and s.id.startswith(name) for s in a)
    assert list(a[0].image.getdata()) == list(b[0].image.getdata())
    shapes = {(s.question, str(s.meta["scene"]["objects"])) for s in get_task("shapes").samples("eval", n=200)}
    assert not {(s.question, str(s.meta["scene"]["objects"])) for s in a} & shapes
    assert task.samples("val", n=4)[0].id != a[0].id
    with pytest.raises(ValueError, match="'eval' and 'val' only"):
        task.samples("train", n=4)
    for s in a:  # the answer-relevant patches exist on the embedded model's 12 x 12 grid
        assert s.relevant_patches((12, 12))


def test_pope_settings_balance_and_negatives():
    samples = get_task("shapes_pope").samples("eval", n=120)
    for setting in SETTINGS:
        mine = [s for s in samples if s.family == setting]
        assert len(mine) == 40 and sum(s.answer == "yes" for s in mine) == 20
        for s in mine:
            objs = s.meta["scene"]["objects"]
            colour, shape = s.question.split()[3:5]
            present = {(o["colour"], o["shape"]) for o in objs}
            assert ((colour, shape) in present) == (s.answer == "yes")
            if s.answer == "no" and setting == "popular":
                assert shape in {o["shape"] for o in objs}
            if s.answer == "no" and setting == "adversarial":
                assert shape in {o["shape"] for o in objs} and colour in {o["colour"] for o in objs}


def test_yes_no_metrics_follow_pope():
    rows = [{"prediction": p, "answer": a} for p, a in
            [("yes", "yes"), ("yes", "no"), ("no", "yes"), ("no", "no"), ("Yes.", "yes")]]
    m = yes_no_metrics(rows)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5) and m["n"] == 5
    agg = get_task("shapes_pope").aggregate([{**r, "family": "random"} for r in rows])
    assert agg["random"] == agg["all"] and agg["popular"]["n"] == 0


def test_small_objects_are_small_and_clutter_is_crowded():
    small = get_task("shapes_small").samples("eval", n=30)
    assert all(o["size"] == "small" for s in small for o in s.meta["scene"]["objects"])
    assert "digit" not in {s.family for s in small}
    clutter = get_task("shapes_clutter").samples("eval", n=30)
    assert all(len(s.meta["scene"]["objects"]) == 6 and s.meta["scene"]["digit"] is not None for s in clutter)
    assert {s.family for s in clutter} == set(get_task("shapes").families)
