"""lmms-eval integration for Qwen-VL: `prunebench_qwen2_5_vl` / `prunebench_qwen2_vl` run a pruner inside
lmms-eval's own Qwen classes, offline, and their answers are the ones direct prunebench use gives.

The tiny saved models (random weights, word-level tokenizer) get a chat template reproducing
`TINY_QWEN_PROMPT`'s format. The reference is ``apply_pruner`` on the same loaded model and processor,
the same prompt and greedy ``generate``, one request at a time; what is lmms-eval's own before the
processor (each image sent as a JPEG data URL and resized by ``qwen_vl_utils``) and after ``generate``
(its decoding and clean-up) is reproduced as lmms-eval does it.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.lmms.common import content_chat_template_from_prompt
from mllm_adapters import apply_pruner
from mllm_adapters.tiny import (
    TINY_QWEN_IMAGE,
    TINY_QWEN_MAX_PIXELS,
    TINY_QWEN_MIN_PIXELS,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
)
from tests._lmms_docs import DOCS, NEW, TEMPLATE, requests

FAMILIES = {"qwen2_5_vl": build_tiny_qwen2_5_vl, "qwen2_vl": build_tiny_qwen2_vl}
#: lmms-eval's own answer clean-up after decoding (Qwen2_VL strips whitespace, Qwen2_5_VL does not).
CLEAN = {"qwen2_5_vl": lambda s: s, "qwen2_vl": str.strip}


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    family = request.param
    model, processor = FAMILIES[family](seed=0)
    processor.chat_template = content_chat_template_from_prompt(TEMPLATE, TINY_QWEN_IMAGE)
    processor.tokenizer.padding_side = "right"  # as the Qwen2-VL tokenizers: batches must pad left anyway
    folder = tmp_path_factory.mktemp(family)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return family, folder


def _load(family: str, folder, model_args: str, batch_size: int):
    """The lmms-eval model as ``--model prunebench_<family> --model_args ...`` builds it."""
    from lmms_eval.models import get_model

    cls = get_model(f"prunebench_{family}")
    args = f"pretrained={folder},{model_args},min_pixels={TINY_QWEN_MIN_PIXELS},max_pixels={TINY_QWEN_MAX_PIXELS}"
    lm = cls.create_from_arg_string(args, {"batch_size": batch_size, "device": "cpu"})
    if family == "qwen2_5_vl":
        # lmms-eval's Qwen2_5_VL always loads bfloat16. There a pruned padded batch differs from single
        # requests by rounding (logits ~0.03 apart, float32: ~1e-6), enough to flip the tiny random model's
        # near-tied tokens; compare in float32 (casting the loaded bfloat16 weights is exact).
        assert lm.model.dtype == torch.bfloat16
        lm.model.float()
    lm.task_dict = {task: {"test": docs} for task, docs in DOCS.items()}
    return lm


def _reference(family: str, lm, method: str, budget: int | None, params: dict) -> list[str]:
    """Direct prunebench use on lm's model and processor, one request at a time, greedy."""
    from qwen_vl_utils import fetch_image

    lm.handle.remove()
    tok = lm.processor.tokenizer
    answers = []
    with apply_pruner(lm.model, method, budget=budget, **params):
        for req in requests():
            doc = DOCS[req.args[4]][req.args[3]]
            # lmms-eval's image preparation: a JPEG data URL, resized by qwen_vl_utils within its pixel bounds
            image = fetch_image({"image": lm._encode_image_data_url(doc["image"]), "min_pixels": lm.min_pixels,
                                 "max_pixels": lm.max_pixels})
            prompt = TEMPLATE.format(question=doc["question"]).replace("<image>", TINY_QWEN_IMAGE)
            inputs = lm.processor(images=[image], text=[prompt], return_tensors="pt")
            with torch.no_grad():
                out = lm.model.generate(**inputs, max_new_tokens=NEW, do_sample=False,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            text = lm.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False)[0]
            answers.append(CLEAN[family](text))
    return answers


def test_chat_template_gives_the_tiny_prompt(saved):
    family, folder = saved
    lm = _load(family, folder, "method=none", 1)
    messages = [[{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": [{"type": "image", "image": "data:image/jpeg;base64,"},
                                              {"type": "text", "text": "what is the colour ?"}]}]]
    text = lm.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)[0]
    assert text == f"USER: {TINY_QWEN_IMAGE} what is the colour ? ASSISTANT:"


@pytest.mark.parametrize("model_args", ["method=random,budget=4,seed=3", "method=fastv,budget=4,layer=2"])
def test_lmms_eval_answers_equal_prunebench_generation(saved, model_args):
    """Batch size 1 and 2 (two tasks, padded batches) give the answers of direct prunebench use."""
    family, folder = saved
    lm1 = _load(family, folder, model_args, batch_size=1)
    lm2 = _load(family, folder, model_args, batch_size=2)
    assert lm2.processor.tokenizer.padding_side == "left"
    one = lm1.generate_until(requests())
    two = lm2.generate_until(requests())
    assert lm1._prefills == lm2._prefills == len(one) == 4
    args = dict(kv.split("=") for kv in model_args.split(","))
    method, budget = args.pop("method"), int(args.pop("budget"))
    ref = _reference(family, lm1, method, budget, {k: int(v) for k, v in args.items()})
    assert one == ref
    assert two == one
    assert all(a.strip() for a in one)


def test_requests_of_two_tasks_are_batched_per_task(saved):
    """lmms-eval's class reads every request of a batch from the first request's task; ours batches per
    task, so a batch of 4 over two tasks is two batches of 2 and answers equal batch size 1's."""
    family, folder = saved
    lm4 = _load(family, folder, "method=random,budget=4", batch_size=4)
    lm1 = _load(family, folder, "method=random,budget=4", batch_size=1)
    assert lm4.generate_until(requests()) == lm1.generate_until(requests())


def test_bad_arguments_are_refused(saved):
    family, folder = saved
    with pytest.raises(ValueError, match="--batch_size 'auto' is not supported"):
        _load(family, folder, "method=none", batch_size="auto")
    with pytest.raises(ValueError, match="no_such_param"):
        _load(family, folder, "method=fastv,budget=4,no_such_param=1", batch_size=1)


def test_documented_command_with_a_prunebench_json_folder(saved, tmp_path, monkeypatch, capsys):
    """`python -m benchmarks.lmms --model prunebench_<family>` on prunebench's shapes task, batch size 2: a
    folder whose processor has no chat template but a prunebench.json gets the template of its prompt."""
    from benchmarks.lmms.__main__ import main
    from benchmarks.lmms.export_shapes import export

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    family, _ = saved
    model, processor = FAMILIES[family](seed=0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model" / "chat_template.jinja").exists()
    (tmp_path / "model" / "prunebench.json").write_text(json.dumps({"prompt_template": TEMPLATE}))
    export(tmp_path / "task", "shapes", n=2)
    args = f"pretrained={tmp_path / 'model'},method=fastv,budget=4,layer=2,min_pixels={TINY_QWEN_MIN_PIXELS},"
    args += f"max_pixels={TINY_QWEN_MAX_PIXELS}"
    assert main(["--model", f"prunebench_{family}", "--model_args", args, "--tasks", "prunebench_shapes",
                 "--include_path", str(tmp_path / "task"), "--limit", "2", "--device", "cpu",
                 "--batch_size", "2"]) == 0
    assert "exact_match" in capsys.readouterr().out
