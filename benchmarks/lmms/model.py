"""``prunebench_llava``: lmms-eval's ``llava_hf`` model with a prunebench pruner attached.

Everything lmms-eval does for LLaVA (batching, chat template, generation arguments) stays theirs;
this class only loads the checkpoint (``pretrained=embedded`` means the shipped default model), then
calls ``apply_pruner``. Model arguments that ``llava_hf`` does not know are the method's parameters
(``--model_args pretrained=...,method=fastv,budget=64,layer=3``); values are parsed as YAML scalars.

``--batch_size N`` batches N requests per ``generate`` (left-padded, as prunebench's runner batches;
the pruners are batch-exact, so answers equal batch size 1). ``llava_hf`` itself asserts batch size 1,
so batch size 1 runs its own code unchanged and N > 1 runs ``_generate_batched`` (image tasks only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import PIL.Image
from lmms_eval import utils as lmms_utils
from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, VICUNA_CHAT_TEMPLATE, LlavaHf

from benchmarks.lmms.common import PrunebenchModel, chat_template_from_prompt
from benchmarks.models import EMBEDDED_DIR

__all__ = ["PrunebenchLlava", "chat_template_from_prompt"]


class PrunebenchLlava(PrunebenchModel, LlavaHf):
    """LLaVA (HF format) evaluated by lmms-eval with visual-token pruning."""

    MODEL_ID = "prunebench_llava"

    def __init__(
        self,
        pretrained: str = "llava-hf/llava-1.5-7b-hf",
        method: str = "none",
        budget: Any = None,
        seed: Any = 0,
        **kwargs: Any,
    ) -> None:
        llava_kwargs, method_params = self.split_model_args(LlavaHf, kwargs)
        path = str(EMBEDDED_DIR) if pretrained == "embedded" else pretrained
        self.check_pretrained(path)
        meta = Path(path) / "prunebench.json"
        if meta.is_file() and llava_kwargs.get("chat_template") is None:
            llava_kwargs["chat_template"] = chat_template_from_prompt(json.loads(meta.read_text())["prompt_template"])
        super().__init__(pretrained=path, **llava_kwargs)
        self.attach_pruner(method, budget, seed, self._tokenizer, method_params)

    def _generate(self, requests) -> list[str]:
        """llava_hf's own code at batch size 1 (it asserts 1), else `_generate_batched`."""
        return super()._generate(requests) if self.batch_size == 1 else self._generate_batched(requests)

    def _chat(self, context: str, n_images: int) -> str:
        """The prompt llava_hf builds for one request (image tokens first if the task gave none)."""
        if DEFAULT_IMAGE_TOKEN not in context:
            context = f"{' '.join([DEFAULT_IMAGE_TOKEN] * n_images)}\n{context}"
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        elif self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
        messages = [{"role": "user", "content": context}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _generate_batched(self, requests) -> list[str]:
        """llava_hf's ``generate_until`` for ``batch_size`` requests per ``generate`` call.

        Same request order (lmms-eval's Collator), prompts, generation arguments and stopping rule
        (EOS only: llava_hf drops ``until``), one left-padded processor call per batch. A failing
        ``generate`` raises.
        """
        collator = lmms_utils.Collator([r.args for r in requests], lambda x: (-len(self.tok_encode(x[0])), x[0]),
                                       grouping=True)
        res: list[str] = []
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            texts, images = [], []
            for context, to_visual, doc_id, task, split in zip(contexts, doc_to_visual, doc_ids, tasks, splits):
                visuals = self.flatten([to_visual(self.task_dict[task][split][doc_id])])
                if not visuals or not all(isinstance(v, PIL.Image.Image) for v in visuals):
                    raise ValueError(f"prunebench_llava: --batch_size {self.batch_size} supports image tasks only "
                                     f"(task {task!r} gave {type(visuals[0]).__name__ if visuals else 'no visual'}); "
                                     "use --batch_size 1")
                texts.append(self._chat(context, len(visuals)))
                images.extend(visuals)
            gen = dict(all_gen_kwargs[0])  # the Collator groups requests with equal generation kwargs
            temperature = gen.get("temperature", 0)
            inputs = self._image_processor(images=images, text=texts, return_tensors="pt", padding=True)
            inputs = inputs.to(self._device, self.model.dtype)
            out = self.model.generate(
                **inputs, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_p=gen.get("top_p"), num_beams=gen.get("num_beams", 1), max_new_tokens=gen.get("max_new_tokens", 1024),
                use_cache=self.use_cache, pad_token_id=self.eot_token_id, eos_token_id=self.eot_token_id,
            )
            answers = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)
            for context, g, answer in zip(contexts, all_gen_kwargs, answers):
                self.cache_hook.add_partial("generate_until", (context, g), answer)
            res.extend(answers)
        return collator.get_original(res)
