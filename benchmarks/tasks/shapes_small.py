"""``shapes_small``: the shapes questions with every object small (half-extent 11 px instead of 18), so
the answer lives in few patches (about 2 of the 12 x 12 grid per object, against 4-6 for a large one).

The families of ``shapes`` except ``digit`` (the digit has one size); the scene, the question and the
answer are drawn as for ``shapes`` (a different stream), then every object is made small: no family
asks about size, so the answer is unchanged. docs/tasks.md.
"""

from __future__ import annotations

import numpy as np

from benchmarks.tasks import Sample, register_task
from benchmarks.tasks.shapes import ShapesTask
from benchmarks.tasks.shapes import generator as G


@register_task("shapes_small")
class ShapesSmallTask(ShapesTask):
    families = [f for f in G.EVAL_FAMILIES if f != "digit"]
    stream = 102
    ability = "fine_detail"
    trainable = False

    def _sample(self, rng: np.random.Generator, i: int, sample_id: str) -> Sample:
        family = self.families[i % len(self.families)]
        scene, question, answer, info = G.make_question(rng, family)
        for obj in scene["objects"]:
            obj["size"] = "small"
        return Sample(id=sample_id, image=G.render(scene), question=question, answer=answer, family=family,
                      meta={"task": self.name, "scene": scene, **info})
