"""Conformance suite: every registered pruner x every supported model family, on tiny models.

Axes (no hand-kept list; a new pruner or family is covered by registering it):

- pruners: ``pruners.available_pruners()`` at collection time, minus test-only pruners (names
  starting with ``_``, registered by other test modules);
- families: ``mllm_adapters.available_families()``, each run on the tiny model its adapter class's
  ``build_tiny`` builds (``@register_family``). A family whose tiny model is not of one of its
  ``model_classes``, or a supported model class no family builds a tiny model of, fails the suite
  (``test_every_model_class_has_a_tiny_model``).

Every case runs the method with its default parameters at a budget chosen from the model: a third of
the shorter of the two test images' visual runs (36 tokens each on tiny LLaVA -> 12; the packed runs
70 / 52 on tiny LLaVA-NeXT -> 17). The two images have different sizes (different runs on
LLaVA-NeXT), the two prompts different lengths (left padding).

Invariants (test ``test_<name>`` each; a pruner class may opt out of one in
``conformance_opt_outs = {"<name>": "<reason>"}``, or for one family only with the key
``"<name>:<family>"``, e.g. ``"pre_llm_equals_kept_tokens:llava_next"``;
such a case is skipped with that reason, nothing else is ever skipped). A method that refuses every
family with its default parameters (dyvte without router weights) declares it with the key ``"*"``;
the suite then checks, on every family, that attaching raises a ValueError naming the method. A method
whose default refuses but which has a documented setting for models without a found one (gsearch's
depth-scaled schedule) declares it in ``conformance_params``; every case attaches with those:

- keep_all_equals_unpruned: budget=None and budget=the model's visual tokens give bitwise the unpruned
  logits (a configuration that ``chooses_budget`` treats None as "the method decides", not checked);
- pre_llm_equals_kept_tokens (methods whose only stage is ``pre_llm``): per sample, the logits equal the
  unpruned model run on a prompt holding exactly the tokens the LLM received; kept (non-merged) tokens
  must be the model's own visual tokens at ``handle.kept_indices`` (LLaVA-NeXT: positions in the packed
  run), merged ones (pooling, visionzip, recoverable) are taken as the adapter fed them;
- batch_of_two_equals_two_batches_of_one: last-token logits (1e-4), kept indices and 3 greedy tokens;
- several_images_and_none: a batch of a sample with two images, one with none and one with one image
  gives each sample's last-token logits alone (1e-4) and ``handle.kept_indices`` one entry per image in
  batch order, equal to the samples' alone; per-sample token counts (the image-less one counts 0
  visual tokens). Methods pruning inside the LLM too: there the two-image sample's visual tokens (text
  between their runs) are ranked together;
- same_seed_same_result: two fresh attachments with the same seed give bitwise the same logits and kept
  sets; another seed changes the kept set iff the class declares ``uses_seed``;
- cached_generate_equals_recompute: generate() with the pruned KV cache equals greedy decoding by full
  recompute (``tests/_adapter_helpers.greedy_recompute``) with the pruner's prefill choices replayed
  (an in-LLM method's choice depends on the last token, which changes at every recomputed step);
- remove_restores: after ``handle.remove()`` logits and generate() are bitwise the untouched model's,
  and no hook or attribute is left behind;
- two_threads_equal_one_thread: two threads share one pruned model (4 forwards with different inputs
  and one generate() each) and get bitwise their single-threaded results. An adapter that cannot do
  this declares ``thread_safe = False`` (attribute of the adapter instance, so it may depend on the
  pruner) and must then raise a RuntimeError naming threads when used from a second thread;
- bad_budgets_rejected: 0, -1, True, 2.5, "2.5" and the model's visual tokens + 1 raise ValueError
  (TypeError is accepted for the non-int types True, 2.5 and "2.5": what ``Pruner.__init__`` raises
  today) naming ``budget``, and leave nothing attached;
- unknown_parameter_rejected: an unknown keyword raises ValueError naming it;
- golden_kept_set: sha256 of ``handle.kept_indices`` (and ``handle.kept_by_layer`` for in-LLM methods)
  on the fixed batch at seed 0, stored per pruner x family in ``tests/golden/kept_sets.json`` with the
  pruner's ``version`` and ``mllm_adapters.ENGINE_VERSION``. A changed fingerprint under an unchanged
  version fails: a behaviour change must bump the pruner's ``version`` (or ENGINE_VERSION for an
  adapter change). Missing or stale entries fail too. Regenerate with

      PRUNEBENCH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_conformance.py -k golden

  which refuses to overwrite a changed fingerprint whose versions did not change (bump first);
  ``PRUNEBENCH_UPDATE_GOLDEN=force`` overwrites anyway (for changes that are not the method's, e.g. an
  upgrade of the locked environment).

Time: every case must finish within ``PRUNEBENCH_CASE_BUDGET_S`` seconds (default 10: the slowest
case measured 0.26 s on a 2-core machine, so a case 40x slower than that is a regression, not CI noise;
family models are built before the clock starts), so the
suite grows linearly and slowly with pruners x families.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import mllm_adapters
from mllm_adapters import apply_pruner as _apply_pruner
from mllm_adapters.registry import get_family, supported_model_classes
from pruners import available_pruners, get_pruner_class
from tests._adapter_helpers import IMAGE_INPUTS, cached_and_recomputed

INVARIANTS = (
    "keep_all_equals_unpruned",
    "pre_llm_equals_kept_tokens",
    "batch_of_two_equals_two_batches_of_one",
    "several_images_and_none",
    "same_seed_same_result",
    "cached_generate_equals_recompute",
    "remove_restores",
    "two_threads_equal_one_thread",
    "bad_budgets_rejected",
    "unknown_parameter_rejected",
    "golden_kept_set",
)

GOLDEN = Path(__file__).parent / "golden" / "kept_sets.json"
UPDATE_GOLDEN = os.environ.get("PRUNEBENCH_UPDATE_GOLDEN", "").strip().lower()  # "", "1" or "force"
REGENERATE = "PRUNEBENCH_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_conformance.py -k golden"
#: Slowest case measured: 0.25 s (two_threads on tiny LLaVA-NeXT, 2-core machine, other jobs running);
#: the whole module ran in about 8 s of test time (13 s wall with imports) for 12 pruners x 2 families.
CASE_BUDGET_S = float(os.environ.get("PRUNEBENCH_CASE_BUDGET_S", "10"))
THREAD_TIMEOUT_S = 120.0

PROMPTS = [
    "USER: <image> what is the colour of the circle ? ASSISTANT:",
    "USER: <image> how many ? ASSISTANT:",
]
SIZES = [(40, 60), (30, 80)]  # (height, width) px: different packed runs on LLaVA-NeXT
GEN_STEPS = 3
SEED = 0


def apply_pruner(model, method: str, **kwargs):
    """`mllm_adapters.apply_pruner` with the method's declared ``conformance_params`` (a setting the suite
    must pass because the default refuses every tiny model, e.g. gsearch's schedule); given keywords win."""
    params = dict(get_pruner_class(method).conformance_params) if method in available_pruners() else {}
    return _apply_pruner(model, method, **{**params, **kwargs})


# ---- the two axes ----------------------------------------------------------------------------------
FAMILIES = mllm_adapters.available_families()
PRUNERS = [p for p in available_pruners() if not p.startswith("_")]


def cases(applies: Callable[[type], bool] = lambda cls: True) -> list:
    """pytest params (pruner, family) for every pruner the invariant applies to, x every family."""
    return [pytest.param(p, f, id=f"{p}-{f}") for p in PRUNERS if applies(get_pruner_class(p))
            for f in FAMILIES]


def check_opt_out(pruner: str, family: str, invariant: str) -> None:
    """Skip with the declared reason when the pruner's class opts out of ``invariant`` (for ``family``)."""
    outs = get_pruner_class(pruner).conformance_opt_outs
    for key in (f"{invariant}:{family}", invariant):
        if key in outs:
            pytest.skip(f"{pruner} opts out of {key}: {outs[key]}")


def refused(families, pruner: str, family: str, invariant: str) -> bool:
    """True when the pruner is declared to refuse the family, after checking that it does: attaching
    raises a ValueError naming the method and leaves nothing attached. Declared by ``requires_cls`` on
    a family without CLS (or a default ``cls_param`` value of ``"cls"`` there), or by the opt-out key ``"*:<family>"`` (``"*"``: every family) with its reason.
    The refusal is checked with the method's defaults (not its ``conformance_params``). Otherwise applies the
    invariant's own opt-outs (`check_opt_out`) and returns False."""
    cls = get_pruner_class(pruner)
    fam = families[family]
    reason = cls.conformance_opt_outs.get(f"*:{family}", cls.conformance_opt_outs.get("*"))
    if reason is None and cls.requires_cls and not fam.has_cls:
        reason = "scores with [CLS]; the family's vision encoder has none"
    if reason is None and cls.cls_param is not None and not fam.has_cls \
            and cls.parameters[cls.cls_param[0]].default == "cls":
        reason = f"its default {cls.cls_param[0]}='cls' needs [CLS]; the family's vision encoder has none"
    if reason is None:
        check_opt_out(pruner, family, invariant)
        return False
    with pytest.raises(ValueError) as e:
        _apply_pruner(fam.model, pruner, budget=fam.budget)  # the method's defaults: what a user gets
    assert pruner in str(e.value), f"{pruner} refuses {family} without naming the method: {e.value}"
    assert_nothing_attached(fam.model)
    return True


# ---- family fixtures ----------------------------------------------------------------------------------
def family_prompts(spec: Any, prompts: list[str]) -> list[str]:
    """``prompts`` with each ``<image>`` written as the family writes one image (`FamilySpec.prompt_image`)."""
    return [p.replace("<image>", spec.prompt_image) for p in prompts]


def make_image(size: tuple[int, int], seed: int) -> Image.Image:
    h, w = size
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def logits_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs, steps: int = GEN_STEPS) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False)[:, -steps:]


@dataclasses.dataclass
class Family:
    """One tiny model of a family with the suite's fixed inputs and its untouched outputs."""

    name: str
    model: Any
    processor: Any
    images: list[Image.Image]
    batch: Any  # both images, PROMPTS order (left-padded)
    batch_rev: Any  # both images, reversed order
    singles: list[Any]  # each sample alone
    runs: list[int]  # visual tokens of each image reaching the unpruned LLM
    n_max: int  # ModelInfo.num_visual_tokens: the longest run any image can have
    budget: int
    ref_logits: torch.Tensor  # untouched model on `batch`
    ref_generate: torch.Tensor
    has_cls: bool  # ModelInfo.has_cls
    hooks_before: dict[str, tuple[int, ...]]  # before any pruner was attached
    attrs_before: frozenset[str]


def hook_snapshot(model) -> dict[str, tuple[int, ...]]:
    """Counts of every kind of hook on every submodule."""
    kinds = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {name: tuple(len(getattr(m, k, {}) or {}) for k in kinds) for name, m in model.named_modules()}


def build_family(name: str) -> Family:
    adapter_cls = get_family(name)
    torch.set_num_threads(1)
    model, processor = adapter_cls.build_tiny(seed=0, attn_implementation="eager")
    assert type(model).__name__ in adapter_cls.model_classes, (
        f"family {name!r}: build_tiny() built a {type(model).__name__}, not one of its model_classes "
        f"{adapter_cls.model_classes}")
    images = [make_image(s, i) for i, s in enumerate(SIZES)]
    prompts = family_prompts(adapter_cls, PROMPTS)
    warm = processor(images=images[:1], text=prompts[:1], return_tensors="pt")
    with torch.no_grad():  # transformers installs its output-recording hooks on first use: before the snapshot
        model(**warm, output_attentions=True, output_hidden_states=True)
        image = {k: warm[k] for k in IMAGE_INPUTS if k in warm}
        if hasattr(model.model, "vision_tower"):
            model.model.vision_tower(warm["pixel_values"].flatten(0, -4), output_attentions=True,
                                     output_hidden_states=True)
        else:
            model.model.get_image_features(**image, output_attentions=True, output_hidden_states=True)
    hooks, attrs = hook_snapshot(model), frozenset(model.__dict__)

    def inputs(idx):
        return processor(images=[images[i] for i in idx], text=[prompts[i] for i in idx], return_tensors="pt",
                         padding=True)

    batch = inputs([0, 1])
    mask = batch["attention_mask"]
    assert bool(mask[:, -1].all()) and not bool(mask.all()), "the fixed batch must be left-padded"
    runs = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    ref_logits, ref_generate = logits_of(model, batch), generate(model, batch)
    with apply_pruner(model, "none") as h:
        n_max, has_cls = h.pruner.info.num_visual_tokens, h.pruner.info.has_cls
    budget = max(1, min(runs) // 3)
    assert budget < min(runs) <= max(runs) <= n_max
    return Family(name=name, model=model, processor=processor, images=images, batch=batch,
                  batch_rev=inputs([1, 0]), singles=[inputs([0]), inputs([1])], runs=runs, n_max=n_max,
                  budget=budget, ref_logits=ref_logits, ref_generate=ref_generate, has_cls=has_cls, hooks_before=hooks,
                  attrs_before=attrs)


@pytest.fixture(scope="module")
def families():
    """Lazily built Family per family name (one tiny model per family for the whole module)."""

    class Lazy(dict):
        def __missing__(self, name):
            self[name] = build_family(name)
            return self[name]

    return Lazy()


@pytest.fixture(autouse=True)
def _case_budget(request, families):
    """Build the case's family before the clock starts; fail a case slower than CASE_BUDGET_S; never
    leave a pruner attached to the shared model."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    fam = families[params["family"]] if "family" in params else None
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    if fam is not None:
        h = getattr(fam.model, "_prunebench_handle", None)
        if h is not None and not h.removed:
            h.remove()
            pytest.fail(f"{request.node.name} left a pruner attached to the shared tiny model")
    if dt > CASE_BUDGET_S:
        pytest.fail(f"{request.node.name} took {dt:.1f} s, above the per-case budget of {CASE_BUDGET_S} s "
                    f"(PRUNEBENCH_CASE_BUDGET_S): keep conformance cases on tiny inputs")


def assert_nothing_attached(model) -> None:
    h = getattr(model, "_prunebench_handle", None)
    assert h is None or h.removed, "a failed attach left a pruner attached"
    assert not model._forward_pre_hooks, "a failed attach left hooks on the model"


# ---- 1. keep-all ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pruner,family", cases())
def test_keep_all_equals_unpruned(families, pruner, family):
    if refused(families, pruner, family, "keep_all_equals_unpruned"):
        return
    fam = families[family]
    checked = []
    for budget in (None, fam.n_max):
        with apply_pruner(fam.model, pruner, budget=budget) as h:
            if h.pruner.chooses_budget:  # None = "the method picks its count", not keep-all
                continue
            assert h.pruner.keeps_all, f"budget={budget} must keep every token"
            out = logits_of(fam.model, fam.batch)
            kept = [k.tolist() for k in h.kept_indices]
        assert kept == [list(range(n)) for n in fam.runs], f"budget={budget}: kept indices are not every token"
        assert out.shape == fam.ref_logits.shape
        assert torch.equal(out, fam.ref_logits), (
            f"budget={budget}: logits differ from the unpruned model by {(out - fam.ref_logits).abs().max():.3g}")
        checked.append(budget)
    assert checked, f"{pruner} chooses its own budget at budget=None and refuses budget={fam.n_max}"


# ---- 2. pre-LLM = the model run on only the kept tokens -------------------------------------------
class LLMInputs:
    """Records what the adapter hands the model after its own top-level hook: the rewritten prompt and
    the per-image visual tokens (``mm_encoder_outputs``) of each prefill."""

    def __init__(self, model):
        self.calls: list[dict[str, Any]] = []
        self.h = model.register_forward_pre_hook(self._hook, with_kwargs=True)  # runs after the adapter's

    def _hook(self, module, args, kwargs):
        self.calls.append({"input_ids": kwargs.get("input_ids"), "mm": kwargs.get("mm_encoder_outputs")})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.h.remove()


def per_image(tokens, input_ids: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Visual tokens as the model scatters them (``tokens``: one tensor per image, or InternVL's one per
    tile, or one tensor of them all), regrouped per sample of a batch holding one image each: [N_b, Dt]
    each, N_b that sample's placeholders in ``input_ids``."""
    rows = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens])  # [sum N_b, Dt] in scatter order
    return list(rows.split((input_ids == image_token_id).sum(1).tolist()))


def model_visual_tokens(model, inputs) -> list[torch.Tensor]:
    """The unpruned model's own visual tokens per image [N_b, Dt], as its LLM receives them."""
    image = {k: inputs[k] for k in IMAGE_INPUTS if k in inputs}
    with torch.no_grad():
        out = model.model.get_image_features(**image).pooler_output
    return per_image(out, inputs["input_ids"], model.config.image_token_id)


def model_deepstack(model, inputs) -> list[list[torch.Tensor]] | None:
    """Per DeepStack level, the unpruned model's own features per image [N_b, Dt] (Qwen3-VL), or None for a
    model without DeepStack."""
    image = {k: inputs[k] for k in IMAGE_INPUTS if k in inputs}
    with torch.no_grad():
        levels = getattr(model.model.get_image_features(**image), "deepstack_features", None)
    return None if levels is None else [list(level) for level in levels]


def reference_on_tokens(fam: Family, b: int, feats: torch.Tensor, kept: torch.Tensor,
                        deepstack: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Last-token logits of the unpruned model on sample ``b``'s prompt whose image run holds exactly
    ``feats`` [n, Dt], at the positions the family's pre-LLM stage declares: ``compact`` (as if the
    image had n tokens: the prompt with n placeholders) or ``original`` (each kept token at the position
    of its own placeholder in the unpruned prompt, a merged token at that of its slot; text unchanged).
    ``deepstack``: per DeepStack level the [n, Dt] features added at those tokens (Qwen3-VL)."""
    model, spec = fam.model, get_family(fam.name)
    if deepstack is None:
        kw: dict[str, Any] = {}
        spec(model).feed_features(kw, [feats])  # one image's features, the way the family's model takes them
        feed = kw["mm_encoder_outputs"]
    else:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        feed = {"image": BaseModelOutputWithDeepstackFeatures(pooler_output=[feats],
                                                              deepstack_features=[[d] for d in deepstack])}
    if spec.pre_llm_positions == "compact":  # the sample's prompt with n placeholders: the model numbers them
        x = fam.singles[b]  # (every other token as the processor wrote it, e.g. InternVL's <img> and </img>)
        ids, mask = x["input_ids"], x["attention_mask"]
        cols = torch.ones(ids.shape[1], dtype=torch.bool)
        cols[(ids[0] == model.config.image_token_id).nonzero()[feats.shape[0]:, 0]] = False
        with torch.no_grad():
            return model(input_ids=ids[:, cols], attention_mask=mask[:, cols], mm_encoder_outputs=feed).logits[0, -1]
    x = fam.singles[b]
    ids, mask = x["input_ids"], x["attention_mask"]
    pos = spec(model).prompt_positions(dict(x), ids, mask)  # [R, 1, L] (or [1, L])
    img = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
    n = feats.shape[0]
    slots = torch.arange(n)  # the placeholder whose position each token takes
    slots[: kept.shape[0]] = kept  # kept tokens come first, then merged ones (at their slot)
    cols = torch.cat([(ids[0] != model.config.image_token_id).nonzero()[:, 0], img[:n]]).sort().values
    at = cols.clone()
    at[(ids[0][cols] == model.config.image_token_id).nonzero()[:, 0]] = img[slots]
    extra = {} if pos is None else {"position_ids": pos[..., at]}
    with torch.no_grad():
        return model(input_ids=ids[:, cols], attention_mask=mask[:, cols], mm_encoder_outputs=feed,
                     **extra).logits[0, -1]


def is_subsequence(rows: torch.Tensor, seq: torch.Tensor, atol: float) -> bool:
    """True when every row of ``rows`` [k, D] appears in ``seq`` [n, D] in the same order (within atol)."""
    j = 0
    for r in rows:
        while j < seq.shape[0] and (seq[j] - r).abs().max() > atol:
            j += 1
        if j == seq.shape[0]:
            return False
        j += 1
    return True


@pytest.mark.parametrize("pruner,family", cases(lambda cls: tuple(cls.stages) == ("pre_llm",)))
def test_pre_llm_equals_kept_tokens(families, pruner, family):
    if refused(families, pruner, family, "pre_llm_equals_kept_tokens"):
        return
    fam = families[family]
    model = fam.model
    with apply_pruner(model, pruner, budget=fam.budget) as h, LLMInputs(model) as rec:
        out = logits_of(model, fam.batch)[:, -1]
        kept = [k.clone() for k in h.kept_indices]
    (call,) = rec.calls
    assert call["mm"] is not None, "a pre-LLM method must hand the LLM its visual tokens (mm_encoder_outputs)"
    seen = per_image(call["mm"]["image"].pooler_output, call["input_ids"],
                     model.config.image_token_id)  # [n_b, Dt] per image, in the order the LLM sees them
    own = model_visual_tokens(model, fam.batch)
    levels = getattr(call["mm"]["image"], "deepstack_features", None)  # DeepStack: per level, per image
    own_levels = model_deepstack(model, fam.batch) if levels is not None else None
    for b in range(2):
        n = seen[b].shape[0]
        assert int((call["input_ids"][b] == model.config.image_token_id).sum()) == n
        assert len(kept[b]) <= n <= fam.budget, f"sample {b}: {n} visual tokens for budget {fam.budget}"
        assert bool((kept[b][1:] > kept[b][:-1]).all()), f"sample {b}: kept indices not in order"
        want = own[b][kept[b]]
        if len(kept[b]) == n:  # no merged tokens: exactly the model's own tokens at the kept indices
            assert (seen[b] - want).abs().max() <= 1e-5, f"sample {b}: LLM tokens are not the kept tokens"
        else:
            assert is_subsequence(want, seen[b], 1e-5), f"sample {b}: kept tokens missing from the LLM input"
        deepstack = None
        if levels is not None:  # each level's features of the kept tokens are the model's own of those units
            deepstack = [level[b] for level in levels]
            for i, (d, mine) in enumerate(zip(deepstack, own_levels)):
                assert d.shape == seen[b].shape, f"sample {b}: DeepStack level {i} does not match the tokens"
                if len(kept[b]) == n:
                    assert (d - mine[b][kept[b]]).abs().max() <= 1e-5, f"sample {b}: DeepStack level {i} differs"
                else:
                    assert is_subsequence(mine[b][kept[b]], d, 1e-5), f"sample {b}: DeepStack level {i} misses kept units"
        ref = reference_on_tokens(fam, b, seen[b], kept[b], deepstack)
        assert (out[b] - ref).abs().max() <= 1e-5, f"sample {b}: differs from the model run on the kept tokens"


# ---- 3. batch of two = two batches of one ----------------------------------------------------------
@pytest.mark.parametrize("pruner,family", cases())
def test_batch_of_two_equals_two_batches_of_one(families, pruner, family):
    if refused(families, pruner, family, "batch_of_two_equals_two_batches_of_one"):
        return
    fam = families[family]
    model = fam.model
    with apply_pruner(model, pruner, budget=fam.budget) as h:
        both = logits_of(model, fam.batch)[:, -1]
        kept_both = [k.clone() for k in h.kept_indices]
        gen_both = generate(model, fam.batch)
        for i in range(2):
            one = logits_of(model, fam.singles[i])[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4, f"sample {i}: logits differ alone and in a batch"
            assert torch.equal(h.kept_indices[0], kept_both[i]), f"sample {i}: kept set differs alone and in a batch"
            assert torch.equal(generate(model, fam.singles[i])[0], gen_both[i]), f"sample {i}: generate() differs"


# ---- 3b. several images per sample, and none ---------------------------------------------------------
MULTI_PROMPTS = [
    "USER: <image> <image> what is the colour of the circle ? ASSISTANT:",
    "USER: how many ? ASSISTANT:",
    "USER: <image> how many ? ASSISTANT:",
]


@pytest.mark.parametrize("pruner,family", cases())
def test_several_images_and_none(families, pruner, family):
    if refused(families, pruner, family, "several_images_and_none"):
        return
    fam = families[family]
    model, processor = fam.model, fam.processor
    per_sample = [[0, 1], [], [1]]  # images of each sample (indices into fam.images)

    def inputs(samples):
        imgs = [fam.images[i] for s in samples for i in per_sample[s]]
        texts = family_prompts(get_family(family), [MULTI_PROMPTS[s] for s in samples])
        return processor(images=imgs or None, text=texts, return_tensors="pt", padding=True)

    with apply_pruner(model, pruner, budget=fam.budget) as h:
        samples = [0, 1, 2]  # in-LLM methods too: a two-image sample's visual slots are not one span
        batch = inputs(samples)
        both = logits_of(model, batch)[:, -1]
        kept_both = [k.clone() for k in h.kept_indices]
        counts_both = list(h.token_counts)
        assert len(kept_both) == sum(len(per_sample[s]) for s in samples), "one kept entry per image"
        assert len(counts_both) == len(samples)
        j = 0
        for i, s in enumerate(samples):
            one = logits_of(model, inputs([s]))[:, -1]
            assert (one[0] - both[i]).abs().max() <= 1e-4, f"sample {s}: logits differ alone and in a batch"
            alone = list(h.kept_indices)
            n = len(per_sample[s])
            assert len(alone) == n and all(torch.equal(a, b) for a, b in zip(alone, kept_both[j : j + n])), (
                f"sample {s}: kept sets differ alone and in a batch")
            j += n
            if n == 0:
                c = counts_both[i]
                assert not c.visual_in and not any(c.llm_visual or [0]), "an image-less sample has no visual tokens"


# ---- 4. same seed, same result -----------------------------------------------------------------------
def kept_and_logits(model, pruner, budget, seed, inputs):
    with apply_pruner(model, pruner, budget=budget, seed=seed) as h:
        out = logits_of(model, inputs)
        return [k.tolist() for k in h.kept_indices], {k: [x.tolist() for x in v] for k, v in h.kept_by_layer.items()}, out


@pytest.mark.parametrize("pruner,family", cases())
def test_same_seed_same_result(families, pruner, family):
    if refused(families, pruner, family, "same_seed_same_result"):
        return
    fam = families[family]
    a, b, c = (kept_and_logits(fam.model, pruner, fam.budget, s, fam.batch) for s in (3, 3, 4))
    assert a[0] == b[0] and a[1] == b[1], "same seed, different kept sets"
    assert torch.equal(a[2], b[2]), "same seed, different logits"
    if get_pruner_class(pruner).uses_seed:
        assert a[0] != c[0], "uses_seed is declared but another seed keeps the same tokens"
    else:
        assert a[0] == c[0] and torch.equal(a[2], c[2]), (
            "the result depends on the seed: declare uses_seed = True (seeds=[...] runs it once per seed)")


# ---- 5. cached generate = full recompute -------------------------------------------------------------
@pytest.mark.parametrize("pruner,family", cases())
def test_cached_generate_equals_recompute(families, pruner, family, monkeypatch):
    """The recompute replays the prefill's pruner decisions (in call order: per tile on LLaVA-NeXT, per
    layer in the LLM) at every step: with the KV cache those decisions are made once, at prefill, and the
    cache must then give what a full recompute with the same kept tokens gives."""
    if refused(families, pruner, family, "cached_generate_equals_recompute"):
        return
    fam = families[family]
    params = {**get_pruner_class(pruner).conformance_params, "budget": fam.budget}
    cached, ref = cached_and_recomputed(fam.model, fam.batch, pruner, params, GEN_STEPS, monkeypatch)
    assert (cached - ref).abs().max() <= 1e-4


# ---- 6. remove restores ----------------------------------------------------------------------------
@pytest.mark.parametrize("pruner,family", cases())
def test_remove_restores(families, pruner, family):
    if refused(families, pruner, family, "remove_restores"):
        return
    fam = families[family]
    model = fam.model
    h = apply_pruner(model, pruner, budget=fam.budget)
    try:
        logits_of(model, fam.batch)
        generate(model, fam.batch)
    finally:
        h.remove()
    assert torch.equal(logits_of(model, fam.batch), fam.ref_logits)
    assert torch.equal(generate(model, fam.batch), fam.ref_generate)
    assert hook_snapshot(model) == fam.hooks_before, "hooks left behind after remove()"
    assert set(model.__dict__) - fam.attrs_before <= {"_prunebench_handle"}, "attributes left behind"
    assert model._prunebench_handle.removed


# ---- 7. two threads = one thread --------------------------------------------------------------------
@pytest.mark.parametrize("pruner,family", cases())
def test_two_threads_equal_one_thread(families, pruner, family):
    if refused(families, pruner, family, "two_threads_equal_one_thread"):
        return
    fam = families[family]
    model = fam.model
    plans = [  # (4 forwards, 1 generate) per thread, in different orders and shapes
        ([fam.batch, fam.singles[0], fam.singles[1], fam.batch_rev], fam.batch),
        ([fam.singles[1], fam.batch_rev, fam.batch, fam.singles[0]], fam.singles[1]),
    ]
    barrier = threading.Barrier(2, timeout=THREAD_TIMEOUT_S)

    def work(plan, sync: bool):
        forwards, gen_inputs = plan
        outs, kept = [], []
        try:
            for x in forwards:
                if sync:
                    barrier.wait()
                outs.append(logits_of(model, x))
                kept.append([k.tolist() for k in h.kept_indices])  # this thread's last prefill
            if sync:
                barrier.wait()
            return outs, generate(model, gen_inputs), kept
        except BaseException:
            if sync:
                barrier.abort()  # do not leave the other thread waiting
            raise

    with apply_pruner(model, pruner, budget=fam.budget) as h:
        thread_safe = getattr(h.adapter, "thread_safe", True)
        single = [work(p, sync=False) for p in plans]
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(work, p, True) for p in plans]
            results, errors = [], []
            for f in futures:
                try:
                    results.append(f.result(timeout=THREAD_TIMEOUT_S))
                except threading.BrokenBarrierError:
                    results.append(None)
                except Exception as e:  # reported below
                    results.append(None)
                    errors.append(e)
    if not thread_safe:  # declared: concurrent use must fail loudly, never give a wrong result
        assert any(isinstance(e, RuntimeError) and "thread" in str(e).lower() for e in errors), (
            f"the adapter declares thread_safe=False but concurrent use raised {errors!r} instead of a "
            f"RuntimeError naming threads")
        errors = []
    if errors:
        raise errors[0]
    for t, (res, ref) in enumerate(zip(results, single)):
        if res is None:
            continue
        for i, (a, b) in enumerate(zip(res[0], ref[0])):
            assert torch.equal(a, b), f"thread {t}, forward {i}: differs from the single-threaded result " \
                                      f"by {(a - b).abs().max():.3g}"
        assert torch.equal(res[1], ref[1]), f"thread {t}: generate() differs from the single-threaded result"
        assert res[2] == ref[2], f"thread {t}: handle.kept_indices differ from the single-threaded ones"
    assert thread_safe is False or all(r is not None for r in results)


# ---- 8. bad budgets and parameters ---------------------------------------------------------------------
#: budget -> accepted exception types. TypeError only for the non-int values, which Pruner.__init__
#: refuses with a TypeError today; a budget of the wrong size must be a ValueError.
def bad_budgets(n_max: int) -> list[tuple[Any, tuple[type[Exception], ...]]]:
    return [(0, (ValueError,)), (-1, (ValueError,)), (n_max + 1, (ValueError,)),
            (True, (ValueError, TypeError)), (2.5, (ValueError, TypeError)), ("2.5", (ValueError, TypeError))]


@pytest.mark.parametrize("pruner,family", cases())
def test_bad_budgets_rejected(families, pruner, family):
    if refused(families, pruner, family, "bad_budgets_rejected"):
        return
    fam = families[family]
    for budget, accepted in bad_budgets(fam.n_max):
        try:
            h = apply_pruner(fam.model, pruner, budget=budget)
        except accepted as e:
            assert "budget" in str(e), f"budget={budget!r}: the error does not name the budget: {e}"
        else:
            h.remove()
            pytest.fail(f"budget={budget!r} was accepted; expected {' or '.join(a.__name__ for a in accepted)}")
        assert_nothing_attached(fam.model)


@pytest.mark.parametrize("pruner,family", cases())
def test_unknown_parameter_rejected(families, pruner, family):
    if refused(families, pruner, family, "unknown_parameter_rejected"):
        return
    fam = families[family]
    with pytest.raises(ValueError) as exc:
        apply_pruner(fam.model, pruner, budget=fam.budget, zz_not_a_parameter=1)
    assert "zz_not_a_parameter" in str(exc.value)
    assert_nothing_attached(fam.model)


# ---- 9. golden kept-set fingerprint -----------------------------------------------------------------
def golden_key(pruner: str, family: str) -> str:
    return f"{pruner}/{family}"


def read_golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


def write_golden(data: dict[str, Any]) -> None:
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    tmp = GOLDEN.with_suffix(".tmp")
    lines = [f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(data.items())]
    tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one entry per line: reviewable diffs
    tmp.replace(GOLDEN)


def fingerprint(kept: list[list[int]], by_layer: dict[int, list[list[int]]]) -> str:
    blob = json.dumps({"kept_indices": kept, "kept_by_layer": {str(k): v for k, v in sorted(by_layer.items())}},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@pytest.mark.parametrize("pruner,family", cases())
def test_golden_kept_set(families, pruner, family):
    if refused(families, pruner, family, "golden_kept_set"):
        return
    fam = families[family]
    cls = get_pruner_class(pruner)
    kept, by_layer, _ = kept_and_logits(fam.model, pruner, fam.budget, SEED, fam.batch)
    entry = {"version": cls.version, "engine_version": mllm_adapters.ENGINE_VERSION, "budget": fam.budget,
             "sha256": fingerprint(kept, by_layer), "kept_counts": [len(k) for k in kept]}
    key = golden_key(pruner, family)
    old = read_golden().get(key)
    where = f"{cls.__module__}.{cls.__qualname__}"
    same_identity = old is not None and all(old.get(k) == entry[k] for k in ("version", "engine_version", "budget"))
    silent_change = same_identity and old["sha256"] != entry["sha256"]
    if UPDATE_GOLDEN not in ("", "0"):
        if silent_change and UPDATE_GOLDEN != "force":
            pytest.fail(f"{key}: refusing to regenerate: the kept tokens changed but {where}.version is still "
                        f"{cls.version}; bump it first (or PRUNEBENCH_UPDATE_GOLDEN=force when the change is not "
                        f"the method's, e.g. a locked-environment upgrade)")
        data = read_golden()
        data[key] = entry
        write_golden(data)
        return
    if old is None:
        pytest.fail(f"no golden kept-set fingerprint for {key} in tests/golden/kept_sets.json (a new pruner or "
                    f"family): generate it with {REGENERATE} and commit the file")
    if old.get("budget") != entry["budget"]:
        pytest.fail(f"{key}: the suite's fixed inputs changed (budget {old.get('budget')} -> {entry['budget']}): "
                    f"regenerate with {REGENERATE}")
    if (old.get("version"), old.get("engine_version")) != (entry["version"], entry["engine_version"]):
        pytest.fail(f"{key}: golden entry is for {where}.version={old.get('version')} / ENGINE_VERSION="
                    f"{old.get('engine_version')}, now {entry['version']} / {entry['engine_version']}: "
                    f"regenerate with {REGENERATE} and commit the file with the version bump")
    if silent_change:
        pytest.fail(f"{key}: the kept tokens changed on the fixed inputs (counts {old.get('kept_counts')} -> "
                    f"{entry['kept_counts']}) but {where}.version is still {cls.version}. A behaviour change must "
                    f"bump the pruner's `version` (or mllm_adapters.ENGINE_VERSION for an adapter change) so "
                    f"cached results of the old behaviour are not reused; then regenerate with {REGENERATE}")


def test_golden_file_has_no_stale_entries():
    keys = {golden_key(p, f) for p in PRUNERS for f in FAMILIES}
    data = read_golden()
    stale = sorted(set(data) - keys)
    if UPDATE_GOLDEN not in ("", "0") and stale:
        write_golden({k: v for k, v in data.items() if k in keys})
        return
    assert not stale, f"golden entries for pruners/families that no longer exist: {stale}; regenerate with {REGENERATE}"


# ---- the suite itself ------------------------------------------------------------------------------
def test_every_model_class_has_a_tiny_model(families):
    assert FAMILIES, "no model family registered"
    built = {type(families[f].model).__name__ for f in FAMILIES}
    missing = sorted(set(supported_model_classes()) - built)
    assert not missing, (f"supported model classes no family builds a tiny model of: {missing}; the conformance "
                         f"suite runs every pruner on each family's build_tiny() model, so add a family (or a "
                         f"tiny builder) for them")


def test_every_pruner_is_covered():
    assert PRUNERS, "no pruner registered"
    assert set(PRUNERS) == {p for p in available_pruners() if not p.startswith("_")}


def test_every_invariant_has_a_test():
    g = globals()
    assert all(callable(g.get(f"test_{name}")) for name in INVARIANTS)


@pytest.mark.parametrize("pruner", PRUNERS)
def test_opt_outs_are_declared_well(pruner):
    """Opt-out keys name an invariant (optionally ':<model class>') and carry a reason."""
    outs = get_pruner_class(pruner).conformance_opt_outs
    assert isinstance(outs, dict)
    for key, reason in outs.items():
        invariant, _, family = key.partition(":")
        assert invariant in INVARIANTS or invariant == "*", f"{pruner}: opt-out {key!r} names no invariant; known: {INVARIANTS}"
        assert not family or family in FAMILIES, f"{pruner}: opt-out {key!r} names no family; known: {FAMILIES}"
        assert isinstance(reason, str) and len(reason.strip()) >= 10, f"{pruner}: opt-out {key!r} needs a reason"
