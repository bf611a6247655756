"""``shapes_clutter``: the shapes questions about crowded scenes, every scene holding the most objects
the generator places (6, the embedded model's training maximum) and a digit, so most tokens are
distractors for any one question (7 of 16 cells occupied, against 4.5 on average in ``shapes``).

The families of ``shapes``; the scene is drawn first, then a question of the sample's family about it
(`generator.question_about`; a scene that cannot support the family is redrawn). docs/tasks.md.
"""

from __future__ import annotations

import numpy as np

from benchmarks.tasks import Sample, register_task
from benchmarks.tasks.shapes import ShapesTask
from benchmarks.tasks.shapes import generator as G


@register_task("shapes_clutter")
class ShapesClutterTask(ShapesTask):
    stream = 103
    ability = "clutter"
    trainable = False

    def _sample(self, rng: np.random.Generator, i: int, sample_id: str) -> Sample:
        family = self.families[i % len(self.families)]
        for _ in range(1000):
            scene = G.random_scene(rng, n_objects=G.MAX_OBJECTS, digit=True)
            out = G.question_about(rng, scene, family)
            if out is not None:
                break
        else:  # pragma: no cover
            raise RuntimeError(f"could not build a cluttered {family!r} question in 1000 tries")
        question, answer, info = out
        return Sample(id=sample_id, image=G.render(scene), question=question, answer=answer, family=family,
                      meta={"task": self.name, "scene": scene, **info})
