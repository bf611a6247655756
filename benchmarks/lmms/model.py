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

import inspect
import json
import os
from pathlib import Path
from typing import Any

import PIL.Image
import torch
import yaml
from lmms_eval import utils as lmms_utils
from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, VICUNA_CHAT_TEMPLATE, LlavaHf

from benchmarks.models import EMBEDDED_DIR, check_checkpoint
from mllm_adapters import apply_pruner


def _scalar(value: Any) -> Any:
    """lmms-eval passes model_args as strings: '64' -> 64, 'null' -> None, 'compact' -> 'compact'."""
    return yaml.safe_load(value) if isinstance(value, str) else value


def chat_template_from_prompt(prompt_template: str) -> str:
    """A Jinja chat template that reproduces a prunebench ``prompt_template`` for one user turn.

    llava_hf sends ``"<image>\\n" + question`` as the user message; rendering it with this template
    gives exactly ``prompt_template.format(question=question)``, the prompt the model was trained on.
    """
    prefix, suffix = prompt_template.split("{question}")
    if "<image>" not in prefix:
        raise ValueError(f"prompt_template must put <image> before {{question}}, got {prompt_template!r}")
    before, after = prefix.split("<image>", 1)
    esc = lambda s: s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")  # noqa: E731
    content = f"message['content'] | replace('<image>\\n', '<image>{esc(after)}')"
    return (
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        f"{{{{ '{esc(before)}' }}}}{{{{ {content} }}}}{{{{ '{esc(suffix)}' }}}}"
        "{% endif %}{% endfor %}"
    )


class PrunebenchLlava(LlavaHf):
    """LLaVA (HF format) evaluated by lmms-eval with visual-token pruning."""

    def __init__(
        self,
        pretrained: str = "llava-hf/llava-1.5-7b-hf",
        method: str = "none",
        budget: Any = None,
        seed: Any = 0,
        **kwargs: Any,
    ) -> None:
        batch_size = kwargs.get("batch_size", 1)
        if not (str(batch_size).isdigit() and int(batch_size) >= 1):
            raise ValueError(f"prunebench_llava: --batch_size {batch_size!r} is not supported; accepted: an integer "
                             ">= 1 (requests per generate call; 'auto' is not supported)")
        own = set(inspect.signature(LlavaHf.__init__).parameters) - {"self", "kwargs"}
        llava_kwargs = {k: v for k, v in kwargs.items() if k in own}
        method_params = {k: _scalar(v) for k, v in kwargs.items() if k not in own}
        path = str(EMBEDDED_DIR) if pretrained == "embedded" else pretrained
        from huggingface_hub.constants import HF_HUB_OFFLINE

        check_checkpoint(path, local_only=bool(HF_HUB_OFFLINE), name="prunebench_llava")
        meta = Path(path) / "prunebench.json"
        if meta.is_file() and llava_kwargs.get("chat_template") is None:
            llava_kwargs["chat_template"] = chat_template_from_prompt(json.loads(meta.read_text())["prompt_template"])
        llava_kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        if not llava_kwargs.get("device_map"):
            # llava_hf's default device_map "" is rejected by transformers 5: name the device (per process).
            rank = os.environ.get("LOCAL_RANK")
            dev = llava_kwargs["device"]
            llava_kwargs["device_map"] = f"cuda:{rank}" if rank is not None and str(dev).startswith("cuda") else dev
        super().__init__(pretrained=path, **llava_kwargs)
        self.handle = apply_pruner(
            self._model, method, budget=_scalar(budget), seed=int(_scalar(seed)), tokenizer=self._tokenizer,
            **method_params,
        )
        self._prefills, self._image_call = 0, 0
        # Runs before the pruner's hook (which consumes pixel_values) and after a completed forward.
        self._model.register_forward_pre_hook(self._mark_image_call, with_kwargs=True, prepend=True)
        self._model.register_forward_hook(self._count_prefill)

    def _mark_image_call(self, module, args, kwargs) -> None:
        # Prefill with images: one per sample of the batch (rows of input_ids, or of the embeddings).
        rows = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        self._image_call = rows.shape[0] if kwargs.get("pixel_values") is not None and rows is not None else 0

    def _count_prefill(self, module, args, output) -> None:
        self._prefills += self._image_call
        self._image_call = 0

    def generate_until(self, requests):
        """llava_hf's generation, but a failed request is an error, not an empty answer.

        (llava_hf logs generation exceptions and returns ''; for a benchmark that would silently
        score a broken pruner as wrong answers.)
        """
        before = self._prefills
        out = super().generate_until(requests) if self.batch_size == 1 else self._generate_batched(requests)
        done = self._prefills - before
        if done < len(requests):
            raise RuntimeError(
                f"prunebench_llava: {len(requests) - done} of {len(requests)} requests did not run "
                f"(method={self.handle.pruner.name!r}); see the log above for the generation error"
            )
        return out

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
