"""Two threads sharing one pruned model get exactly their single-threaded results.

Before, the adapter kept its per-forward state on itself: two threads gave silently different
generations (random 13 of 40, fastv 6 of 18 in a probe) or crashed inside the LLM stage. The state
now lives per thread (`mllm_adapters.engine.Engine._fw`, `mllm_adapters.handle._PerThread`).
"""

from __future__ import annotations

import threading

import pytest
import torch

from mllm_adapters import apply_pruner
from mllm_adapters.tiny import build_tiny_llava
from tests.conftest import PROMPTS, make_images

ROUNDS = 6


def _work(model, processor, handle, i: int) -> tuple[list, list]:
    """ROUNDS alternating prefill + generate calls on sample i; the kept indices each saw."""
    inputs = processor(images=make_images(2)[i : i + 1], text=PROMPTS[i : i + 1], return_tensors="pt")
    outs, kept = [], []
    for r in range(ROUNDS):
        with torch.no_grad():
            if r % 2:
                outs.append(model.generate(**inputs, max_new_tokens=4, do_sample=False))
            else:
                outs.append(model(**inputs).logits)
        kept.append([k.clone() for k in handle.kept_indices])
    return outs, kept


@pytest.mark.parametrize("method, budget", [("random", 9), ("fastv", 9), ("transprune", 9), ("pdrop", 9)])
def test_two_threads_equal_one_thread(method, budget):
    model, processor = build_tiny_llava()
    with apply_pruner(model, method, budget=budget) as handle:
        alone = [_work(model, processor, handle, i) for i in (0, 1)]
        results: dict[int, tuple] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def run(i: int) -> None:
            try:
                barrier.wait()
                results[i] = _work(model, processor, handle, i)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i in (0, 1):
            for a, b in zip(alone[i][0], results[i][0]):
                assert torch.equal(a, b), (method, i)
            for a, b in zip(alone[i][1], results[i][1]):
                assert all(torch.equal(x, y) for x, y in zip(a, b)), (method, i)


def test_a_model_keeping_call_state_refuses_a_second_thread(monkeypatch):
    """A family whose model keeps per-call state itself (`FamilySpec.keeps_call_state`, Qwen2-VL's
    rope_deltas) declares ``thread_safe = False``: the first thread works, a second one gets a clear
    RuntimeError naming threads, never a silently mixed result."""
    from mllm_adapters.families.llava import LlavaSpec

    monkeypatch.setattr(LlavaSpec, "keeps_call_state", True)
    model, processor = build_tiny_llava()
    inputs = processor(images=make_images(1), text=PROMPTS[:1], return_tensors="pt")
    with apply_pruner(model, "random", budget=9) as handle:
        assert handle.adapter.thread_safe is False
        with torch.no_grad():
            model(**inputs)
        errors: list[BaseException] = []

        def other():
            try:
                with torch.no_grad():
                    model(**inputs)
            except BaseException as e:  # noqa: BLE001 - recorded for the assertion
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError) and "thread" in str(errors[0])
        with torch.no_grad():
            model(**inputs)  # the owning thread goes on
