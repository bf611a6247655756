"""The fake lmms-eval documents and requests the Qwen-VL lmms-eval tests share (tests/test_lmms_qwen.py,
tests/test_lmms_qwen3_vl.py): two tasks, as lmms-eval hands every task's requests to one
``generate_until`` call, with images of two sizes so that batches are really padded."""

from __future__ import annotations

import numpy as np
from PIL import Image

TEMPLATE = "USER: <image> {question} ASSISTANT:"  # + TINY_QWEN_IMAGE for <image>: the tiny prompt format
NEW = 4
GEN = {"max_new_tokens": NEW, "temperature": 0, "do_sample": False, "until": ["\n\n"]}


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


DOCS = {
    "fake_a": [{"image": _image(0, (64, 48)), "question": "what is the colour ?"},
               {"image": _image(1, (40, 60)), "question": "how many circle are there ?"}],
    "fake_b": [{"image": _image(2, (40, 60)), "question": "what shape is at row one column two ?"},
               {"image": _image(3, (64, 48)), "question": "describe the image"}],
}


def requests() -> list:
    """One lmms-eval ``generate_until`` Instance per document of `DOCS`, in task then document order."""
    from lmms_eval.api.instance import Instance

    reqs = []
    for task, docs in DOCS.items():
        for doc_id, doc in enumerate(docs):
            args = (doc["question"], dict(GEN), lambda d: [d["image"]], doc_id, task, "test")
            reqs.append(Instance("generate_until", args, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1}))
    return reqs
