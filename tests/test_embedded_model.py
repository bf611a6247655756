"""The shipped embedded model: loads offline with standard transformers classes, its processor batches
with left padding and 144 image tokens, it uses the image, it meets the issue's targets, and pre-LLM
pruning changes its accuracy; all on a fixed subset of the eval split (120 samples, 20 per family;
seconds on CPU).

The issue's targets are stated on the full 1,000-sample eval split, where the model card measures them
(98.8% unpruned, worst family 95.8%, random 1/8 -45.6 points, oracle 1/8 -0.8 points, CLS top-k at 1/4
96.6% against random 68.1%). Here the same targets are asserted unchanged on the subset, where the
margins were of the same size when this model was shipped (0.992 unpruned, worst family 0.95; random 1/8
0.492; oracle 1/8 0.983; CLS top-k at 1/4 0.983 against random 0.683).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.embedded import model as M  # noqa: E402
from benchmarks.tasks import get_task  # noqa: E402

ASSET = Path(os.environ.get("PRUNEBENCH_EMBEDDED_DIR", M.ASSET_DIR))
N_SUBSET = 120


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(ASSET, local_files_only=True, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(ASSET, local_files_only=True)
    meta = json.loads((ASSET / "prunebench.json").read_text())
    return model, proc, meta


@pytest.fixture(scope="module")
def subset():
    return get_task("shapes").samples("eval", n=N_SUBSET)


def test_folder_is_complete_and_small():
    files = [p for p in ASSET.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30e6
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]  # safetensors only
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "prunebench.json",
                 "README.md", "text_tower/config.json", "text_tower/model.safetensors",
                 "text_tower/tokenizer.json", "text_tower/visual_projection.safetensors"):
        assert (ASSET / name).is_file(), name


def test_loads_offline_with_standard_classes(loaded):
    from transformers import CLIPImageProcessor, LlavaProcessor

    model, proc, meta = loaded
    assert isinstance(proc, LlavaProcessor) and isinstance(proc.image_processor, CLIPImageProcessor)
    assert proc.tokenizer.padding_side == "left"
    cfg = model.config
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 >= 144
    assert cfg.text_config.num_hidden_layers >= 8
    assert "{question}" in meta["prompt_template"] and "<image>" in meta["prompt_template"]


def test_processor_batches_with_left_padding(loaded, subset):
    model, proc, meta = loaded
    chunk = [subset[0], subset[3], subset[5]]  # questions of different lengths
    prompts = [meta["prompt_template"].format(question=s.question) for s in chunk]
    b = proc(images=[s.image for s in chunk], text=prompts, return_tensors="pt", padding=True)
    assert (b.input_ids == model.config.image_token_id).sum(1).tolist() == [M.NUM_PATCHES] * 3
    lengths = b.attention_mask.sum(1)
    assert lengths.min() < lengths.max()
    short = int(lengths.argmin())
    assert b.attention_mask[short, 0] == 0 and b.attention_mask[short, -1] == 1  # left padding
    assert torch.allclose(b.pixel_values, M.pixel_values([s.image for s in chunk]), atol=1e-5)


def _family_prior(n: int = 3000) -> dict[str, str]:
    """Most frequent answer per family in the training stream: the accuracy a model reaches from the
    question family alone, without looking at the image."""
    from collections import Counter

    from benchmarks.tasks.shapes import training_stream

    counts: dict[str, Counter] = {}
    for s in training_stream(seed=123, n=n, families=get_task("shapes").families):
        counts.setdefault(s.family, Counter())[s.answer] += 1
    return {f: c.most_common(1)[0][0] for f, c in counts.items()}


@pytest.fixture(scope="module")
def measured(loaded, subset):
    """Unpruned accuracy of the standard path (processor + generate) on the fixed subset, per family."""
    model, proc, meta = loaded
    task = get_task("shapes")
    scores: dict[str, list[float]] = {}
    with torch.no_grad():
        for i in range(0, len(subset), 40):
            chunk = subset[i: i + 40]
            prompts = [meta["prompt_template"].format(question=s.question) for s in chunk]
            b = proc(images=[s.image for s in chunk], text=prompts, return_tensors="pt", padding=True)
            out = model.generate(**b, max_new_tokens=meta["max_new_tokens"], do_sample=False)
            texts = proc.batch_decode(out[:, b.input_ids.shape[1]:], skip_special_tokens=True)
            for s, t in zip(chunk, texts):
                scores.setdefault(s.family, []).append(task.score(t, s))
    overall = sum(sum(v) for v in scores.values()) / len(subset)
    return overall, {f: sum(v) / len(v) for f, v in scores.items()}


@pytest.fixture(scope="module")
def pruned(subset):
    """Direct pre-LLM selection results on the fixed subset (see benchmarks.embedded.evaluate)."""
    from transformers import LlavaForConditionalGeneration

    from benchmarks.embedded.evaluate import evaluate

    model = LlavaForConditionalGeneration.from_pretrained(
        ASSET, local_files_only=True, dtype=torch.float32,
        attn_implementation={"vision_config": "eager", "text_config": "sdpa", "": "sdpa"},
    ).eval()
    return evaluate(model, subset, [("none", None), ("random", 18), ("oracle", 18), ("random", 36), ("cls", 36)])


@pytest.mark.slow
def test_uses_the_image(measured, subset):
    """The model beats the image-blind family prior by >= 10 points on the subset (2 standard errors of
    a difference of two accuracies on 120 samples)."""
    overall, per_family = measured
    prior = _family_prior()
    prior_acc = sum(prior[s.family] == s.answer for s in subset) / len(subset)
    assert overall >= prior_acc + 0.10, (overall, prior_acc, per_family)


@pytest.mark.slow
def test_locates_the_named_object(measured):
    """Families answered by finding one named object are solved (eval split: colour 0.99, shape 0.96,
    digit 1.00): at least 18 of 20 right on the subset, far above what pooled image statistics give
    (about 0.6)."""
    _, per_family = measured
    for fam in ("colour", "shape", "digit"):
        assert per_family[fam] >= 0.9, (fam, per_family)


@pytest.mark.slow
def test_counts_above_the_answer_prior(measured, subset):
    """Counting is learned (eval split: 0.99 against a family prior of about 0.28): on the subset's 20
    count questions at least 10 points above the image-blind prior answer's accuracy plus two standard
    errors of 20 samples (~0.2)."""
    _, per_family = measured
    prior = _family_prior()
    counts = [s for s in subset if s.family == "count"]
    prior_acc = sum(prior["count"] == s.answer for s in counts) / len(counts)
    assert per_family["count"] >= prior_acc + 0.2, (per_family, prior_acc)


@pytest.mark.slow
def test_pruning_changes_accuracy(pruned):
    """Honest, always-required properties of the pre-LLM selection evaluation on this model."""
    acc = {k: v["overall"] for k, v in pruned.items()}
    assert acc["random@18"] < acc["none"], acc  # dropping 7/8 of the tokens costs accuracy
    assert pruned["oracle@18"]["relevant_recall"] > pruned["random@18"]["relevant_recall"]
    assert pruned["cls@36"]["relevant_recall"] > pruned["random@36"]["relevant_recall"]  # CLS attention finds objects


@pytest.mark.slow
def test_meets_issue_accuracy_targets_on_fixed_subset(measured):
    """The issue's accuracy targets on the subset, through the standard path: >= 85% overall and
    >= 70% in every family."""
    overall, per_family = measured
    assert overall >= 0.85, (overall, per_family)
    assert min(per_family.values()) >= 0.70, per_family


@pytest.mark.slow
def test_meets_issue_discrimination_targets_on_fixed_subset(pruned):
    """The issue's pruning targets on the subset: random 1/8 loses >= 15 points, the oracle at 1/8
    stays within 5 points, CLS top-k at 1/4 beats random at 1/4."""
    acc = {k: v["overall"] for k, v in pruned.items()}
    assert acc["random@18"] <= acc["none"] - 0.15, acc
    assert acc["oracle@18"] >= acc["none"] - 0.05, acc
    assert acc["cls@36"] > acc["random@36"], acc


def test_text_tower_matches_images(loaded, subset):
    """The contrastively trained text tower retrieves the right caption for an image well above chance."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    from benchmarks.tasks.shapes import generator as G

    model, _, _ = loaded
    tt = ASSET / "text_tower"
    text = CLIPTextModelWithProjection.from_pretrained(tt, local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tt, local_files_only=True)
    w = load_file(str(tt / "visual_projection.safetensors"))["weight"].float()  # [proj, Dv]
    chunk = subset[:16]
    with torch.no_grad():
        pooled = model.model.vision_tower(pixel_values=M.pixel_values([s.image for s in chunk])).pooler_output
        v = F.normalize(pooled @ w.T, dim=-1)  # [16, proj]
        caps = [G.caption(s.meta["scene"]) + " </s>" for s in chunk]
        tb = tok(caps, return_tensors="pt", padding=True)
        t = F.normalize(text(input_ids=tb.input_ids, attention_mask=tb.attention_mask).text_embeds, dim=-1)
    top1 = (v @ t.T).argmax(1) == torch.arange(len(chunk))
    assert top1.float().mean() >= 0.5  # chance is 1/16
