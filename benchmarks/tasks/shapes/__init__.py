"""The ``shapes`` task: procedural VQA on coloured shapes and a digit (see `generator`).

Splits (all deterministic):
- ``"eval"``: the fixed 1,000-sample evaluation split (seed ignored), families in rotation.
- ``"val"``: 1,000 samples of another seed domain, for early stopping while training.
- ``"train"``: ``n`` samples of the training stream for ``seed``; the stream never yields a sample whose
  (family, question, scene structure) occurs in the eval split.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from benchmarks.tasks import Sample, Task, register_task
from benchmarks.tasks.shapes import generator as G

EVAL_SIZE = 1000
SPLITS = ("eval", "val", "train")


def sample_from_rng(rng: np.random.Generator, family: str, sample_id: str) -> Sample:
    """Build one `Sample` of ``family`` from ``rng`` (used by every split and by training)."""
    scene, question, answer, info = G.make_question(rng, family)
    meta = {"task": "shapes", "scene": scene, **info}
    return Sample(id=sample_id, image=G.render(scene), question=question, answer=answer, family=family, meta=meta)


def sample_key(sample: Sample) -> tuple:
    """Identity used to keep the training stream disjoint from the eval split."""
    return sample.family, sample.question, G.scene_key(sample.meta["scene"])


@lru_cache(maxsize=1)
def eval_keys() -> frozenset:
    """Keys of the 1,000 eval samples (generated once per process, ~2 s)."""
    return frozenset(sample_key(s) for s in ShapesTask()._split(G.DOMAIN_EVAL, 0, EVAL_SIZE))


@register_task("shapes")
class ShapesTask(Task):
    """Colour / shape / count / exists / digit / relation questions about a rendered scene."""

    families = list(G.EVAL_FAMILIES)
    max_new_tokens = 2  # one answer word and the end token

    #: second entropy word of the eval / val rngs: the shapes task's 0, a variant's own code, so
    #: variants never share a scene stream with it
    stream: int = 0
    #: split "train" (the embedded model's training stream): the shapes task only
    trainable: bool = True

    def _sample(self, rng: np.random.Generator, i: int, sample_id: str) -> Sample:
        """Sample ``i`` of a split from its own ``rng`` (families in rotation)."""
        return sample_from_rng(rng, self.families[i % len(self.families)], sample_id)

    def _split(self, domain: int, seed: int, n: int) -> list[Sample]:
        seed = seed + self.stream
        prefix = self.name or "shapes"
        return [self._sample(np.random.default_rng([domain, seed, i]), i, f"{prefix}-{domain}-{seed}-{i}")
                for i in range(n)]

    def samples(self, split: str = "eval", n: int | None = None, seed: int = 0) -> list[Sample]:
        """See the module docstring for the splits; ``n`` keeps the first ``n`` samples."""
        if split not in SPLITS:
            raise ValueError(f"parameter 'split' must be one of {list(SPLITS)}, got {split!r}")
        if n is not None and (not isinstance(n, int) or n < 0):
            raise ValueError(f"parameter 'n' must be None or a non-negative int, got {n!r}")
        if split in ("eval", "val"):
            if n is not None and n > EVAL_SIZE:
                raise ValueError(f"parameter 'n' must be <= {EVAL_SIZE} for split {split!r}, got {n}")
            domain = G.DOMAIN_EVAL if split == "eval" else G.DOMAIN_VAL
            return self._split(domain, 0, EVAL_SIZE if n is None else n)
        if not self.trainable:
            raise ValueError(f"task {self.name!r} has the splits 'eval' and 'val' only (split 'train' is the shapes "
                             "task's training stream)")
        if n is None:
            raise ValueError("parameter 'n' is required for split 'train' (the training stream is unbounded)")
        return list(training_stream(seed, n, families=self.families))

    def relevant_patches(self, sample: Sample, grid_hw: tuple[int, int]) -> list[int]:
        """See `Sample.relevant_patches` and `generator.relevant_patches`."""
        return G.relevant_patches(sample.meta["scene"], sample.meta, grid_hw)


def training_stream(seed: int, n: int | None = None, families: list[str] | None = None, start: int = 0):
    """Yield training samples (index ``start`` on), families drawn uniformly from ``families``
    (default: all families including the training-only bridge ones), skipping eval-split look-alikes."""
    fams = list(G.ALL_FAMILIES if families is None else families)
    bad = [f for f in fams if f not in G.ALL_FAMILIES]
    if bad:
        raise ValueError(f"parameter 'families' must hold names from {G.ALL_FAMILIES}, got {bad}")
    keys = eval_keys()
    i, made = start, 0
    while n is None or made < n:
        rng = np.random.default_rng([G.DOMAIN_TRAIN, seed, i])
        family = fams[int(rng.integers(len(fams)))]
        s = sample_from_rng(rng, family, f"shapes-train-{seed}-{i}")
        i += 1
        if sample_key(s) in keys:
            continue
        made += 1
        yield s


__all__ = ["ShapesTask", "sample_from_rng", "training_stream", "eval_keys"]
