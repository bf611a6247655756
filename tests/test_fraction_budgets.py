"""Fraction budgets: ``budget=f`` with 0 < f < 1 keeps that share of each image's own visual tokens,
rounded half up, at least 1 (`pruners.base.resolve_budget`), on every family, end to end.

- LLaVA-1.5 (every image 36 tokens): a fraction is exactly the int it resolves to (bitwise logits).
- LLaVA-NeXT and Qwen (the count depends on the image): each image of a ragged batch keeps its own
  share, and a batch equals its images alone.
- In-LLM methods keep one count per batch: a ragged batch whose images resolve to different counts is
  refused with a ValueError naming the budget; images resolving to one count run.
- The runner takes fractions in ``budgets``, names their cells ``b<f>`` and the leaderboard keeps them.
"""

from __future__ import annotations

import json

import pytest
import torch

from mllm_adapters import apply_pruner
from mllm_adapters.tiny import TINY_QWEN_IMAGE, build_tiny_llava, build_tiny_llava_next, build_tiny_qwen2_vl
from pruners.base import resolve_budget
from tests.conftest import random_images

PROMPTS = ["USER: <image> what is the colour of the circle ? ASSISTANT:", "USER: <image> how many ? ASSISTANT:"]


def images(sizes, seed=0):
    return random_images(sizes, seed)


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits[:, -1]


def test_resolve_budget_rounds_half_up_and_keeps_one():
    assert resolve_budget(0.25, 70) == 18 and resolve_budget(0.25, 52) == 13  # 17.5 -> 18, 13.0
    assert resolve_budget(0.3, 8) == 2 and resolve_budget(0.3, 12) == 4  # 2.4 -> 2, 3.6 -> 4
    assert resolve_budget(0.01, 8) == 1  # at least one token


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.25, float("nan")])
def test_bad_fractions_are_refused(bad):
    model, _ = build_tiny_llava()
    with pytest.raises(ValueError, match="budget"):
        apply_pruner(model, "random", budget=bad)
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("method", ["random", "divprune", "vtc_cls", "fastv", "pdrop", "transprune", "flowcut"])
def test_llava_fraction_is_the_int_it_resolves_to(method):
    model, processor = build_tiny_llava()
    x = processor(images=images([(48, 48), (48, 48)]), text=PROMPTS, return_tensors="pt", padding=True)
    with apply_pruner(model, method, budget=0.25) as h:  # 36 tokens -> 9
        a, ka = logits(model, x), [k.tolist() for k in h.kept_indices]
    with apply_pruner(model, method, budget=9) as h:
        b, kb = logits(model, x), [k.tolist() for k in h.kept_indices]
    assert torch.equal(a, b) and ka == kb


@pytest.mark.parametrize("method", ["random", "divprune", "visionzip", "flowcut"])
def test_next_each_image_keeps_its_share(method):
    model, processor = build_tiny_llava_next()
    imgs = images([(40, 60), (30, 80)])  # 70 and 52 packed tokens
    x = processor(images=imgs, text=PROMPTS, return_tensors="pt", padding=True)
    with apply_pruner(model, method, budget=0.25) as h:
        both = logits(model, x)
        kept = [k.clone() for k in h.kept_indices]
        for i in range(2):
            one = processor(images=imgs[i : i + 1], text=PROMPTS[i : i + 1], return_tensors="pt")
            assert (logits(model, one)[0] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept[i])
    if method not in ("visionzip",):  # visionzip's merged tokens have no index
        assert [len(k) for k in kept] == [18, 13]


def test_qwen_each_image_keeps_its_share():
    model, processor = build_tiny_qwen2_vl()
    prompts = [p.replace("<image>", TINY_QWEN_IMAGE) for p in PROMPTS]
    x = processor(images=images([(40, 60), (64, 48)]), text=prompts, return_tensors="pt", padding=True)  # 8, 12
    with apply_pruner(model, "random", budget=0.3) as h:
        logits(model, x)
        assert [len(k) for k in h.kept_indices] == [2, 4]


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_in_llm_fraction_counts_each_image_in_a_batch(method):
    """An in-LLM method with a fraction budget keeps each image's own share in a batch of images of
    different sizes (inert fillers pad the smaller count), exactly as each image alone."""
    model, processor = build_tiny_llava_next()
    imgs = images([(40, 60), (30, 80)])
    x = processor(images=imgs, text=PROMPTS, return_tensors="pt", padding=True)
    with apply_pruner(model, method, budget=0.25) as h:
        both = logits(model, x)[:, -1]
        kept = [k.clone() for k in h.kept_indices]
        assert [len(k) for k in kept] == [18, 13]  # 0.25 of 70 and of 52 tokens, rounded half up
        assert h.batch_counts.llm_visual_width[-1] == 18
        for i in range(2):
            one = processor(images=imgs[i : i + 1], text=PROMPTS[i : i + 1], return_tensors="pt")
            alone = logits(model, one)[:, -1]
            assert (alone[0] - both[i]).abs().max() <= 1e-4
            assert torch.equal(h.kept_indices[0], kept[i])


def test_runner_takes_fractions(tmp_path):
    from hydra import compose, initialize_config_dir

    from benchmarks import leaderboard as lb
    from benchmarks import run as runner
    from benchmarks import store
    from tests.test_run import ROOT, TINY

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny-next", *TINY[1:], f"results_dir={tmp_path}", "method=random",
                                           "budgets=[null,0.25,20]", "n_samples=2"])
    paths = runner.run(cfg)
    names = sorted(p.name.split("-")[0] for p in paths)
    assert names == ["b0.25", "b20", "ball"]
    (frac,) = [p for p in paths if p.name.startswith("b0.25")]
    assert store.read_metrics(frac)["budget"] == 0.25
    rows = [json.loads(line) for line in (frac / "predictions.jsonl").read_text().splitlines()]
    assert all(r["n_kept"] == resolve_budget(0.25, r["visual_in"]) for r in rows)  # the realised count per image
    lb.write_all(tmp_path)
    board = lb.leaderboard(tmp_path)
    assert sorted(board["budget"].dropna().tolist()) == [0.25, 20.0]
