"""Shared fixtures: a tiny LLaVA built from config (random weights, CPU, fp32) and batched inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_adapters.tiny import build_tiny_llava, build_tiny_qwen2_5_vl, build_tiny_qwen2_vl

torch.set_num_threads(1)

PROMPTS = [
    "USER: <image> what is the colour of the circle ? ASSISTANT:",
    "USER: <image> how many ? ASSISTANT:",
]


def random_images(sizes, seed: int = 0) -> list[Image.Image]:
    """Random RGB images of ``sizes`` [(height, width), ...] px, drawn in order from one seeded RNG."""
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def make_images(n: int, size: int = 48, seed: int = 0) -> list[Image.Image]:
    """``n`` random square images of ``size`` px (`random_images`)."""
    return random_images([(size, size)] * n, seed)


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) with eager attention everywhere."""
    return build_tiny_llava(seed=0, attn_implementation="eager")


@pytest.fixture(scope="session")
def tiny_sdpa():
    return build_tiny_llava(seed=0, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def batch(tiny):
    """Two samples with different prompt lengths, left-padded by the processor."""
    _, processor = tiny
    return processor(images=make_images(2), text=PROMPTS, return_tensors="pt", padding=True)


def single(processor, i: int):
    return processor(images=make_images(2)[i : i + 1], text=PROMPTS[i : i + 1], return_tensors="pt", padding=True)


#: the tiny Qwen families and the image sizes of the `qwen` fixture (8 and 12 merged units)
QWEN_BUILDERS = {"qwen2_vl": build_tiny_qwen2_vl, "qwen2_5_vl": build_tiny_qwen2_5_vl}
QWEN_SIZES = [(40, 60), (64, 48)]


@pytest.fixture(scope="module", params=list(QWEN_BUILDERS))
def qwen(request):
    """(model, processor, images) of one tiny Qwen family (each in turn), images of `QWEN_SIZES`."""
    torch.set_num_threads(1)
    model, processor = QWEN_BUILDERS[request.param](seed=0)
    return model, processor, random_images(QWEN_SIZES)
