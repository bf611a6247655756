"""lmms-eval task functions for prunebench tasks exported by `benchmarks.lmms.export_shapes`."""

from __future__ import annotations

from typing import Any

from PIL import Image

from benchmarks.tasks import Task


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match after prunebench's normalisation (first word, lower case), as the runner scores."""
    return {"exact_match": float(Task.normalise(results[0]) == Task.normalise(doc["answer"]))}
