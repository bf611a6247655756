"""``shapes_pope``: POPE's protocol (Li et al., EMNLP 2023) on shapes scenes: yes/no existence questions.

Each sample asks "is there a <colour> <shape> ?" about a scene; half the answers are yes (an object of the
scene), half no. The negatives follow POPE's three settings, which are the sample's ``family`` and are
reported separately (`aggregate`): ``random`` (any colour x shape absent from the scene), ``popular``
(the shape is in the scene in another colour) and ``adversarial`` (the colour and the shape are both in
the scene, on different objects). Metrics per setting, as POPE reports them: accuracy, precision,
recall and F1 of the answer "yes", and the yes-ratio. Scenes and questions come from
`benchmarks.tasks.shapes.generator` (the embedded model's training distribution); docs/tasks.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.tasks import Sample, register_task
from benchmarks.tasks.shapes import ShapesTask
from benchmarks.tasks.shapes import generator as G

SETTINGS = ("random", "popular", "adversarial")


def pope_question(rng: np.random.Generator, setting: str, yes: bool) -> tuple[dict, str, str, dict] | None:
    """(scene, question, answer, info) of one POPE item, or None when the scene has no negative of
    ``setting`` (the caller draws another scene)."""
    scene = G.random_scene(rng, n_objects=int(rng.integers(2, G.MAX_OBJECTS + 1)))
    objs = scene["objects"]
    info: dict[str, Any] = {"relevant_digit": False, "neg_type": None if yes else setting}
    if yes:
        i = int(rng.integers(len(objs)))
        info["relevant_objects"] = [i]
        return scene, f"is there a {objs[i]['colour']} {objs[i]['shape']} ?", "yes", info
    absent = G.pope_negatives(objs, setting)
    if not absent:
        return None
    c, s = absent[int(rng.integers(len(absent)))]
    info["relevant_objects"] = G.negative_evidence(objs, c, s)
    return scene, f"is there a {c} {s} ?", "no", info


def yes_no_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """POPE's figures over prediction rows (``prediction``, ``answer``): "yes" is the positive class."""
    pred = [ShapesTask.normalise(r["prediction"]) == "yes" for r in rows]
    gold = [ShapesTask.normalise(r["answer"]) == "yes" for r in rows]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    n = len(rows)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": sum(p == g for p, g in zip(pred, gold)) / n if n else 0.0,
        "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(pred) / n if n else 0.0, "n": n,
    }


@register_task("shapes_pope")
class ShapesPopeTask(ShapesTask):
    """POPE on shapes: sample i is setting ``SETTINGS[i % 3]``, answer yes when ``(i // 3)`` is even."""

    families = list(SETTINGS)
    ability = "hallucination"
    stream = 101
    trainable = False

    def _sample(self, rng: np.random.Generator, i: int, sample_id: str) -> Sample:
        setting, yes = SETTINGS[i % len(SETTINGS)], (i // len(SETTINGS)) % 2 == 0
        for _ in range(1000):
            out = pope_question(rng, setting, yes)
            if out is not None:
                break
        else:  # pragma: no cover
            raise RuntimeError(f"could not build a {setting!r} POPE item in 1000 tries")
        scene, question, answer, info = out
        return Sample(id=sample_id, image=G.render(scene), question=question, answer=answer, family=setting,
                      meta={"task": self.name, "scene": scene, **info})

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """POPE's figures per setting and over all (the cell's ``task_metrics``)."""
        out = {s: yes_no_metrics([r for r in rows if r["family"] == s]) for s in SETTINGS}
        out["all"] = yes_no_metrics(rows)
        return out
