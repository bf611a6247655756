"""lmms-eval integration for Qwen3-VL: `prunebench_qwen3_vl` runs a pruner inside lmms-eval's own ``qwen3_vl``
class, offline, and its answers are the ones direct prunebench use gives; on the dense model and on its MoE
variant (lmms-eval loads Qwen3VLMoeForConditionalGeneration for an ``A<n>B`` checkpoint name).

The tiny saved Qwen3-VL (random weights, word-level tokenizer, DeepStack) gets a chat template reproducing
the tiny Qwen prompt format. The reference is ``apply_pruner`` on the same loaded model and processor, the
same prompt and greedy ``generate``, one request at a time; what is lmms-eval's own before the processor
(``qwen_vl_utils`` resizing each image to multiples of 32 px, 16 px patches, within its pixel bounds, then
the processor without resizing) and after ``generate`` (decoding, cut at ``until``) is reproduced as
lmms-eval does it.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.lmms.common import content_chat_template_from_prompt
from mllm_adapters import apply_pruner
from mllm_adapters.tiny import TINY_QWEN_IMAGE, TINY_QWEN_MAX_PIXELS, TINY_QWEN_MIN_PIXELS
from mllm_adapters.tiny_qwen3_vl import build_tiny_qwen3_vl
from tests._lmms_docs import DOCS, NEW, TEMPLATE, requests


@pytest.fixture(scope="module", params=["dense", "moe"])
def saved(tmp_path_factory, request):
    """The saved tiny Qwen3-VL, or its MoE variant in a folder named like an MoE checkpoint (``-A3B``: how
    lmms-eval's class decides to load Qwen3VLMoeForConditionalGeneration)."""
    moe = request.param == "moe"
    model, processor = build_tiny_qwen3_vl(seed=0, moe=moe)
    processor.chat_template = content_chat_template_from_prompt(TEMPLATE, TINY_QWEN_IMAGE)
    processor.tokenizer.padding_side = "right"  # batches must pad left anyway
    folder = tmp_path_factory.mktemp("qwen3_vl-tiny-A3B" if moe else "qwen3_vl")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _load(folder, model_args: str, batch_size: int):
    """The lmms-eval model as ``--model prunebench_qwen3_vl --model_args ...`` builds it."""
    from lmms_eval.models import get_model

    cls = get_model("prunebench_qwen3_vl")
    args = f"pretrained={folder},{model_args},min_pixels={TINY_QWEN_MIN_PIXELS},max_pixels={TINY_QWEN_MAX_PIXELS}"
    lm = cls.create_from_arg_string(args, {"batch_size": batch_size, "device": "cpu"})
    # lmms-eval's Qwen3_VL always loads bfloat16, where a pruned padded batch differs from single requests by
    # rounding; compare in float32 (casting the loaded bfloat16 weights is exact)
    assert lm.model.dtype == torch.bfloat16
    assert type(lm.model).__name__ == ("Qwen3VLMoeForConditionalGeneration" if "A3B" in str(folder)
                                       else "Qwen3VLForConditionalGeneration")
    lm.model.float()
    lm.task_dict = {task: {"test": docs} for task, docs in DOCS.items()}
    return lm


def _reference(lm, method: str, budget: int, params: dict) -> list[str]:
    """Direct prunebench use on lm's model and processor, one request at a time, greedy."""
    from qwen_vl_utils import fetch_image

    lm.handle.remove()
    tok = lm.processor.tokenizer
    answers = []
    with apply_pruner(lm.model, method, budget=budget, **params):
        for req in requests():
            doc = DOCS[req.args[4]][req.args[3]]
            image = fetch_image({"image": doc["image"], "min_pixels": lm.min_pixels, "max_pixels": lm.max_pixels},
                                image_patch_size=16)  # lmms-eval's resizing (process_vision_info)
            prompt = TEMPLATE.format(question=doc["question"]).replace("<image>", TINY_QWEN_IMAGE)
            inputs = lm.processor(images=[image], text=[prompt], do_resize=False, return_tensors="pt")
            with torch.no_grad():
                out = lm.model.generate(**inputs, max_new_tokens=NEW, do_sample=False,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            answers.append(lm.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                                     clean_up_tokenization_spaces=False)[0])
    return answers


def test_chat_template_gives_the_tiny_prompt(saved):
    lm = _load(saved, "method=none", 1)
    messages = [[{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": [{"type": "image", "image": "x"},
                                              {"type": "text", "text": "what is the colour ?"}]}]]
    text = lm.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)[0]
    assert text == f"USER: {TINY_QWEN_IMAGE} what is the colour ? ASSISTANT:"


@pytest.mark.parametrize("model_args", ["method=random,budget=4,seed=3", "method=fastv,budget=4,layer=1"])
def test_lmms_eval_answers_equal_prunebench_generation(saved, model_args):
    """Batch size 1 and 2 (two tasks, padded batches) give the answers of direct prunebench use; fastv at
    layer 1 prunes before DeepStack's last injection (after layer 2)."""
    lm1 = _load(saved, model_args, batch_size=1)
    lm2 = _load(saved, model_args, batch_size=2)
    one = lm1.generate_until(requests())
    two = lm2.generate_until(requests())
    assert lm1._prefills == lm2._prefills == len(one) == 4
    args = dict(kv.split("=") for kv in model_args.split(","))
    method, budget = args.pop("method"), int(args.pop("budget"))
    ref = _reference(lm1, method, budget, {k: int(v) for k, v in args.items()})
    assert one == ref
    assert two == one
    assert all(a.strip() for a in one)


def test_requests_of_two_tasks_are_batched_per_task(saved):
    lm4 = _load(saved, "method=random,budget=4", batch_size=4)
    lm1 = _load(saved, "method=random,budget=4", batch_size=1)
    assert lm4.generate_until(requests()) == lm1.generate_until(requests())


def test_bad_arguments_are_refused(saved):
    with pytest.raises(ValueError, match="no_such_param"):
        _load(saved, "method=fastv,budget=4,no_such_param=1", batch_size=1)
    with pytest.raises(ValueError, match=r"vtc_cls.*\[CLS\]"):
        _load(saved, "method=vtc_cls,budget=4", batch_size=1)
