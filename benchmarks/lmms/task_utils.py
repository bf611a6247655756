"""lmms-eval task functions for prunebench tasks exported by `benchmarks.lmms.export_shapes`."""

from __future__ import annotations

from typing import Any

from PIL import Image

from benchmarks.tasks import Task


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The document's image, then its ``extra_images`` (a multi-image export) if any."""
    paths = [doc["image"], *(doc.get("extra_images") or [])]
    return [Image.open(p).convert("RGB") for p in paths]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match after prunebench's normalisation (first word, lower case), as the runner scores."""
    return {"exact_match": float(Task.normalise(results[0]) == Task.normalise(doc["answer"]))}
