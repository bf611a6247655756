"""``prunebench_llava``: lmms-eval's ``llava_hf`` model with a prunebench pruner attached.

Everything lmms-eval does for LLaVA (batching, chat template, generation arguments) stays theirs;
this class only loads the checkpoint (``pretrained=embedded`` means the shipped default model), then
calls ``apply_pruner``. Model arguments that ``llava_hf`` does not know are the method's parameters
(``--model_args pretrained=...,method=fastv,budget=64,layer=3``); values are parsed as YAML scalars.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from lmms_eval.models.simple.llava_hf import LlavaHf

from benchmarks.models import EMBEDDED_DIR
from pruners import apply_pruner


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
        own = set(inspect.signature(LlavaHf.__init__).parameters) - {"self", "kwargs"}
        llava_kwargs = {k: v for k, v in kwargs.items() if k in own}
        method_params = {k: _scalar(v) for k, v in kwargs.items() if k not in own}
        path = str(EMBEDDED_DIR) if pretrained == "embedded" else pretrained
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
        self._prefills, self._image_call = 0, False
        # Runs before the pruner's hook (which consumes pixel_values) and after a completed forward.
        self._model.register_forward_pre_hook(self._mark_image_call, with_kwargs=True, prepend=True)
        self._model.register_forward_hook(self._count_prefill)

    def _mark_image_call(self, module, args, kwargs) -> None:
        self._image_call = kwargs.get("pixel_values") is not None

    def _count_prefill(self, module, args, output) -> None:
        self._prefills += int(self._image_call)
        self._image_call = False

    def generate_until(self, requests):
        """llava_hf's generation, but a failed request is an error, not an empty answer.

        (llava_hf logs generation exceptions and returns ''; for a benchmark that would silently
        score a broken pruner as wrong answers.)
        """
        before = self._prefills
        out = super().generate_until(requests)
        done = self._prefills - before
        if done < len(requests):
            raise RuntimeError(
                f"prunebench_llava: {len(requests) - done} of {len(requests)} requests did not run "
                f"(method={self.handle.pruner.name!r}); see the log above for the generation error"
            )
        return out
