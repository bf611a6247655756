"""Test-only helpers shared by the adapter tests: a fixed in-LLM pruner, a projector recorder,
greedy decoding by full recompute, and cached generate() beside that recompute with the prefill's
pruner decisions replayed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mllm_adapters import apply_pruner
from pruners import register_pruner
from pruners.base import LLMLayerContext, Pruner


@register_pruner("_test_fixed_llm")
class FixedLLM(Pruner):
    """Test-only LLM-stage pruner keeping given visual indices after layer `layer`."""

    stages = ("llm",)
    defaults = {"layer": 2, "keep": None, "positions": "original"}

    def llm_layers(self) -> list[int]:
        return [self.params["layer"]]

    def llm_attention_layers(self) -> list[int]:
        return []

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor:
        return torch.as_tensor(self.params["keep"]).expand(ctx.visual_pos.shape[0], -1)


class ProjectorInputs:
    """Records what the projector receives (the adapter projects the LLM's visual tokens last)."""

    def __init__(self, model):
        self.calls: list[torch.Tensor] = []
        self.h = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: self.calls.append(a[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.h.remove()


#: processor outputs describing the images (passed through wherever the pixels are)
IMAGE_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw")


def placeholder_ids(model) -> list[int]:
    """The model's image / video placeholder token ids: a random tiny model may rank one first, and a
    placeholder in the generated text would be read as an image at the next recomputed prefill, so greedy
    decoding here never picks one (``suppress_tokens`` in generate(); the returned logits are raw)."""
    cfg = model.config
    ids = (getattr(cfg, k, None) for k in ("image_token_id", "image_token_index", "video_token_id"))
    return sorted({int(i) for i in ids if i is not None and 0 <= int(i) < cfg.get_text_config().vocab_size})


def greedy_recompute(model, inputs, steps: int, method: str, params: dict) -> torch.Tensor:
    """Greedy decoding without a KV cache: the whole prompt plus the generated tokens re-run each step
    under pruner ``method`` (``params`` include the budget). Image inputs (``pixel_values`` and, for
    LLaVA-NeXT, ``image_sizes``) are passed through. Returns the step logits [B, steps, V]; a placeholder
    token is never picked (`placeholder_ids`)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image = {k: inputs[k] for k in IMAGE_INPUTS if k in inputs}
    never = placeholder_ids(model)
    mm = inputs.get("mm_token_type_ids")  # Qwen: 0 for text, so generated tokens extend it with zeros
    out = []
    with apply_pruner(model, method, **params):
        for _ in range(steps):
            extra = {} if mm is None else {"mm_token_type_ids": mm}
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, **image, **extra, use_cache=False).logits[:, -1]
            nxt = logits.index_fill(-1, torch.tensor(never, dtype=torch.long), float("-inf")).argmax(-1, keepdim=True)
            out.append(logits)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            if mm is not None:
                mm = torch.cat([mm, torch.zeros_like(nxt)], 1)
    return torch.stack(out, 1)


#: the pruner method each stage calls
STAGE_FUNCTIONS = {"vision": "prune_vision", "pre_llm": "prune_pre_llm", "llm": "prune_llm"}


def clone_decision(x):
    """A deep copy of a stage's decision (a tensor, a dataclass of tensors, or anything else as is)."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: clone_decision(getattr(x, f.name)) for f in dataclasses.fields(x)})
    return x


def cached_and_recomputed(model, inputs, method: str, params: dict, steps: int,
                          monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(generate()'s step logits with the pruned KV cache, `greedy_recompute`'s) [B, steps, V] under pruner
    ``method`` (``params`` include the budget). The recompute replays the prefill's decisions in call order
    (per view, per layer) at every step, with the filler slots `keep_top` marked: with the cache they are
    made once, at prefill, and an in-LLM method's choice depends on the last token, which changes at every
    recomputed step. Checks that every declared stage was called, and replayed once per step."""
    from pruners import get_pruner_class

    cls = get_pruner_class(method)
    names = [STAGE_FUNCTIONS[s] for s in cls.stages]
    recorded: dict[str, list] = {n: [] for n in names}
    calls = {n: 0 for n in names}

    def recorder(name, fn):
        def wrapped(self, ctx):
            out = fn(self, ctx)
            recorded[name].append((clone_decision(out), clone_decision(getattr(ctx, "fillers", None))))
            return out
        return wrapped

    def replayer(name):
        def replay(self, ctx):
            seq = recorded[name]
            out, fillers = seq[calls[name] % len(seq)]
            calls[name] += 1
            if fillers is not None:
                ctx.fillers = fillers.clone()
            return clone_decision(out)
        return replay

    with monkeypatch.context() as mp:
        for n in names:
            mp.setattr(cls, n, recorder(n, getattr(cls, n)))
        with apply_pruner(model, method, **params), torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True, suppress_tokens=placeholder_ids(model))
    cached = torch.stack(gen.logits, 1)  # [B, steps, V]
    with monkeypatch.context() as mp:
        for n in names:
            assert recorded[n], f"{method} declares stage of {n} but the adapter never called it"
            mp.setattr(cls, n, replayer(n))
        ref = greedy_recompute(model, inputs, steps, method, params)
    for n in names:
        assert calls[n] == steps * len(recorded[n]), f"{n}: {calls[n]} calls in {steps} recomputed prefills"
    return cached, ref


def counted_flops(model, inputs) -> int:
    """FlopCounterMode's total for one prefill of ``inputs`` (logits of the last position only, as the
    runner and `benchmarks.flops` count it)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(**inputs, logits_to_keep=1)
    return counter.get_total_flops()


def text_tokens(model, inputs, b: int = 0) -> int:
    """Sample ``b``'s text tokens: its attended positions minus its image placeholders."""
    ids = inputs["input_ids"][b]
    return int(inputs["attention_mask"][b].sum()) - int((ids == model.config.image_token_id).sum())


def assert_refused(model, method: str, match: str, **kwargs) -> None:
    """Attaching ``method`` (``kwargs``: budget 4 unless given, its parameters) raises a ValueError matching
    ``match`` that names the method, and leaves no hook on the model."""
    with pytest.raises(ValueError, match=match) as e:
        apply_pruner(model, method, **{"budget": 4, **kwargs})
    assert method in str(e.value)
    assert not model._forward_pre_hooks


def assert_video_refused(model, inputs) -> None:
    """A Qwen-style forward given ``video_grid_thw`` (a video) under a pruner raises a ValueError naming video."""
    x = dict(inputs)
    x["video_grid_thw"] = torch.tensor([[2, 4, 4]])
    with apply_pruner(model, "random", budget=4), pytest.raises(ValueError, match="video"), torch.no_grad():
        model(**x)
