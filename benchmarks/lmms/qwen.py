"""``prunebench_qwen2_5_vl`` / ``prunebench_qwen2_vl``: lmms-eval's ``qwen2_5_vl`` / ``qwen2_vl`` models with a
prunebench pruner attached.

Everything lmms-eval does for Qwen-VL stays theirs: loading (``Qwen2_5_VL`` loads bfloat16, ``Qwen2_VL`` the
checkpoint's dtype; ``min_pixels`` / ``max_pixels`` override the processor's), the messages (system
prompt, each image as a JPEG data URL, then the question), ``qwen_vl_utils.process_vision_info``, the
chat template, generation (greedy unless the task sets ``temperature > 0``) and answer clean-up. These
classes load the checkpoint, then call ``apply_pruner``; model arguments that lmms-eval's class does not
know are the method's parameters (``--model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=fastv,
budget=64,layer=2``), parsed as YAML scalars, as for ``prunebench_llava`` (`benchmarks.lmms.common`).

``--batch_size N`` runs lmms-eval's own batched code (N requests per ``generate`` call, left-padded), with
two fixes made here rather than in site-packages: the tokenizer pads on the left for ``qwen2_vl`` too
(lmms-eval's ``Qwen2_VL`` keeps the tokenizer's saved padding side; right padding corrupts batched
generation), and requests are batched per task (lmms-eval's classes look every request
of a batch up in the first request's task, so a batch mixing two tasks of equal generation arguments
would read the wrong documents). The pruners are batch-exact, so answers equal batch size 1's in
float32; ``Qwen2_5_VL`` always loads bfloat16, where a pruned padded batch differs from single requests
by rounding (the shapes differ), which can flip near-tied tokens.

Offline: images reach ``qwen_vl_utils`` as base64 data URLs (no fetching); ``decord`` is imported by
lmms-eval's module and used for video files only (prunebench refuses video); no flash-attn unless asked
(``attn_implementation=flash_attention_2`` / ``use_flash_attention_2=true``).

A checkpoint folder holding a ``prunebench.json`` (``prompt_template`` with ``<image>``, as the runner's
models) gets the chat template that reproduces that prompt (`content_chat_template_from_prompt`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL

from benchmarks.lmms.common import PrunebenchModel, content_chat_template_from_prompt
from mllm_adapters.registry import family_for


class _PrunebenchQwen(PrunebenchModel):
    """What the two Qwen models share; the lmms-eval class comes second in the bases."""

    #: lmms-eval's class (the second base).
    BASE: type = Qwen2_5_VL

    def __init__(self, pretrained: str, method: str = "none", budget: Any = None, seed: Any = 0,
                 **kwargs: Any) -> None:
        qwen_kwargs, method_params = self.split_model_args(self.BASE, kwargs)
        self.check_pretrained(pretrained)
        super().__init__(pretrained=pretrained, **qwen_kwargs)
        # Batched generate needs left padding (lmms-eval's Qwen2_VL does not ask for it; Qwen2_5_VL does).
        self.processor.tokenizer.padding_side = "left"
        self._tokenizer.padding_side = "left"
        meta = Path(pretrained) / "prunebench.json"
        if meta.is_file():
            template = json.loads(meta.read_text())["prompt_template"]
            self.processor.chat_template = content_chat_template_from_prompt(
                template, family_for(self.model).prompt_image)
        self.attach_pruner(method, budget, seed, self._tokenizer, method_params)

    def _generate(self, requests) -> list[str]:
        """lmms-eval's ``generate_until``, called once per (task, split) so no batch mixes two tasks."""
        groups: dict[tuple[Any, Any], list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((request.args[-2], request.args[-1]), []).append(i)
        if len(groups) <= 1:
            return super()._generate(requests)
        out: list[Any] = [None] * len(requests)
        for idx in groups.values():
            for i, answer in zip(idx, super()._generate([requests[i] for i in idx])):
                out[i] = answer
        return out


class PrunebenchQwen2_5_VL(_PrunebenchQwen, Qwen2_5_VL):
    """Qwen2.5-VL (HF format) evaluated by lmms-eval's ``qwen2_5_vl`` with visual-token pruning."""

    MODEL_ID = "prunebench_qwen2_5_vl"
    BASE = Qwen2_5_VL

    def __init__(self, pretrained: str = "Qwen/Qwen2.5-VL-3B-Instruct", **kwargs: Any) -> None:
        super().__init__(pretrained=pretrained, **kwargs)


class PrunebenchQwen2_VL(_PrunebenchQwen, Qwen2_VL):
    """Qwen2-VL (HF format) evaluated by lmms-eval's ``qwen2_vl`` with visual-token pruning."""

    MODEL_ID = "prunebench_qwen2_vl"
    BASE = Qwen2_VL

    def __init__(self, pretrained: str = "Qwen/Qwen2-VL-7B-Instruct", **kwargs: Any) -> None:
        super().__init__(pretrained=pretrained, **kwargs)


class PrunebenchQwen3_VL(_PrunebenchQwen, Qwen3_VL):
    """Qwen3-VL (HF format, dense or MoE) evaluated by lmms-eval's ``qwen3_vl`` with visual-token pruning.

    lmms-eval's class loads bfloat16, resizes each image with ``qwen_vl_utils`` (16 px patches) and calls
    the processor without resizing; it reads every request of a batch with the first request's
    ``doc_to_visual``, hence the per-task batches of `_PrunebenchQwen`. An MoE checkpoint (a name with
    ``A<n>B``, e.g. ``Qwen/Qwen3-VL-30B-A3B-Instruct``) loads Qwen3VLMoeForConditionalGeneration, pruned
    through the ``qwen3_vl_moe`` family."""

    MODEL_ID = "prunebench_qwen3_vl"
    BASE = Qwen3_VL

    def __init__(self, pretrained: str = "Qwen/Qwen3-VL-8B-Instruct", **kwargs: Any) -> None:
        super().__init__(pretrained=pretrained, **kwargs)
