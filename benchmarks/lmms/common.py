"""What every prunebench lmms-eval model shares: model-argument parsing, loading defaults, the pruner.

A prunebench lmms-eval model is lmms-eval's own model class with `PrunebenchModel` mixed in first::

    class PrunebenchLlava(PrunebenchModel, LlavaHf): ...

Its ``__init__`` calls `split_model_args` (the base class's own arguments vs the method's parameters),
then the base class's ``__init__`` (lmms-eval loads the checkpoint), then `attach_pruner`.
`PrunebenchModel.generate_until` runs the base class's generation (``_generate``, overridable) and
raises when a request did not reach the model with its image: lmms-eval classes that log a failed
generation and return '' would otherwise score a broken pruner as wrong answers.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import yaml

from mllm_adapters import apply_pruner

#: The prompt's image placeholder in prunebench prompt templates (``prunebench.json``, conf/model).
IMAGE = "<image>"


def scalar(value: Any) -> Any:
    """lmms-eval passes model_args as strings: '64' -> 64, 'null' -> None, 'compact' -> 'compact'."""
    return yaml.safe_load(value) if isinstance(value, str) else value


def _esc(s: str) -> str:
    """``s`` as the body of a single-quoted Jinja string literal."""
    return s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def _split_template(prompt_template: str) -> tuple[str, str, str]:
    """(before the image, between the image and the question, after the question)."""
    prefix, suffix = prompt_template.split("{question}")
    if IMAGE not in prefix:
        raise ValueError(f"prompt_template must put {IMAGE} before {{question}}, got {prompt_template!r}")
    before, after = prefix.split(IMAGE, 1)
    return before, after, suffix


def chat_template_from_prompt(prompt_template: str) -> str:
    """A Jinja chat template that reproduces a prunebench ``prompt_template`` for one user turn.

    llava_hf sends ``"<image>\\n" + question`` as the user message; rendering it with this template
    gives exactly ``prompt_template.format(question=question)``, the prompt the model was trained on.
    """
    before, after, suffix = _split_template(prompt_template)
    content = f"message['content'] | replace('<image>\\n', '<image>{_esc(after)}')"
    return (
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        f"{{{{ '{_esc(before)}' }}}}{{{{ {content} }}}}{{{{ '{_esc(suffix)}' }}}}"
        "{% endif %}{% endfor %}"
    )


def content_chat_template_from_prompt(prompt_template: str, image: str) -> str:
    """As `chat_template_from_prompt`, for processors whose user message is a list of content parts.

    lmms-eval's Qwen classes send ``[{"type": "image", ...}, ..., {"type": "text", "text": question}]``
    (after a system message, which a prunebench prompt has no place for and this template drops). Each
    image part renders as ``image`` (the family's placeholder, e.g. ``<|vision_start|><|image_pad|>
    <|vision_end|>``), so one image and the question give ``prompt_template.format(question=question)``
    with ``<image>`` written as ``image``.
    """
    before, after, suffix = _split_template(prompt_template)
    return (
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        f"{{{{ '{_esc(before)}' }}}}"
        "{% if message['content'] is string %}"
        f"{{{{ '{_esc(after)}' }}}}{{{{ message['content'] }}}}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{{{{ '{_esc(image)}' }}}}"
        f"{{% elif part['type'] == 'text' %}}{{{{ '{_esc(after)}' }}}}{{{{ part['text'] }}}}{{% endif %}}"
        "{% endfor %}{% endif %}"
        f"{{{{ '{_esc(suffix)}' }}}}"
        "{% endif %}{% endfor %}"
    )


class PrunebenchModel:
    """Mixin for an lmms-eval model class: put it first in the bases (see the module docstring)."""

    #: The name lmms-eval knows the model by (``--model``), used in error messages.
    MODEL_ID = "prunebench"

    @classmethod
    def split_model_args(cls, base: type, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(arguments of ``base.__init__``, the method's parameters) from the extra model arguments.

        Checks ``batch_size`` (an integer >= 1) and fills in the device: ``device`` defaults to CUDA when
        there is one, else CPU, and an unset ``device_map`` to that device (``cuda:LOCAL_RANK`` per
        process under ``accelerate launch``), where lmms-eval's defaults (``cuda``, ``auto``, ``""``) fail
        on a CPU machine or are rejected by transformers 5. Method parameters are parsed as YAML scalars.
        """
        batch_size = kwargs.get("batch_size", 1)
        if not (str(batch_size).isdigit() and int(batch_size) >= 1):
            raise ValueError(f"{cls.MODEL_ID}: --batch_size {batch_size!r} is not supported; accepted: an integer "
                             ">= 1 (requests per generate call; 'auto' is not supported)")
        own = set(inspect.signature(base.__init__).parameters) - {"self", "kwargs"}
        base_kwargs = {k: v for k, v in kwargs.items() if k in own}
        method_params = {k: scalar(v) for k, v in kwargs.items() if k not in own}
        base_kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        if not base_kwargs.get("device_map"):
            rank = os.environ.get("LOCAL_RANK")
            dev = base_kwargs["device"]
            base_kwargs["device_map"] = f"cuda:{rank}" if rank is not None and str(dev).startswith("cuda") else dev
        return base_kwargs, method_params

    @classmethod
    def check_pretrained(cls, path: str) -> None:
        """Fail fast, with what to do, when ``path`` is neither a folder nor a loadable hub model."""
        from huggingface_hub.constants import HF_HUB_OFFLINE

        from benchmarks.models import check_checkpoint

        check_checkpoint(path, local_only=bool(HF_HUB_OFFLINE), name=cls.MODEL_ID)

    def attach_pruner(self, method: str, budget: Any, seed: Any, tokenizer: Any, method_params: dict[str, Any]) -> None:
        """``apply_pruner`` on the loaded (unwrapped) model; ``self.handle`` removes it."""
        model = self.model
        self.handle = apply_pruner(model, method, budget=scalar(budget), seed=int(scalar(seed)), tokenizer=tokenizer,
                                   **method_params)
        self._prefills, self._image_call = 0, 0
        # Runs before the pruner's hook (which consumes pixel_values) and after a completed forward.
        model.register_forward_pre_hook(self._mark_image_call, with_kwargs=True, prepend=True)
        model.register_forward_hook(self._count_prefill)

    def _mark_image_call(self, module, args, kwargs) -> None:
        # Prefill with images: one per sample of the batch (rows of input_ids, or of the embeddings).
        rows = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        self._image_call = rows.shape[0] if kwargs.get("pixel_values") is not None and rows is not None else 0

    def _count_prefill(self, module, args, output) -> None:
        self._prefills += self._image_call
        self._image_call = 0

    def generate_until(self, requests):
        """The base class's generation (`_generate`); a request that did not run with its image raises."""
        before = self._prefills
        out = self._generate(requests)
        done = self._prefills - before
        if done < len(requests):
            raise RuntimeError(
                f"{self.MODEL_ID}: {len(requests) - done} of {len(requests)} requests did not run with their image "
                f"(method={self.handle.pruner.name!r}); see the log above for the generation error"
            )
        return out

    def _generate(self, requests) -> list[str]:
        return super().generate_until(requests)
