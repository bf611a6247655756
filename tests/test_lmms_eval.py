"""lmms-eval integration: `prunebench_llava` runs a pruner inside lmms-eval, offline, and its answers
are the ones prunebench's own generation gives for the same prompts and kept tokens, on LLaVA-1.5 and on
the other families lmms-eval's ``llava_hf`` loads (LLaVA-NeXT, LLaVA-OneVision)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.lmms.export_shapes import export
from benchmarks.lmms.model import chat_template_from_prompt
from benchmarks.tasks import Task, get_task
from mllm_adapters import apply_pruner
from mllm_adapters.registry import get_family
from mllm_adapters.tiny import build_tiny_llava
from pruners import register_pruner
from pruners.base import LLMLayerContext, Pruner

TEMPLATE = "USER: <image> {question} ASSISTANT:"
N = 4


@register_pruner("_test_broken_llm")
class Broken(Pruner):
    """Fails inside the LLM: lmms-eval must surface that, not score empty answers."""

    stages = ("llm",)

    def llm_layers(self) -> list[int]:
        return [1]

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor:
        raise RuntimeError("deliberately broken pruner")


def _saved(root, model, processor):
    """(root, model, processor) with the model saved for lmms-eval under root/model and the task exported."""
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "model" / "prunebench.json").write_text(json.dumps({"prompt_template": TEMPLATE}))
    export(root / "task", "shapes", n=N)
    return root, model, processor


@pytest.fixture(scope="module")
def lmms_setup(tmp_path_factory, monkeypatch_module):
    return _saved(tmp_path_factory.mktemp("lmms"), *build_tiny_llava())


@pytest.fixture(scope="module", params=["llava", "llava_next", "llava_onevision"])
def lmms_family_setup(request, tmp_path_factory, monkeypatch_module, lmms_setup):
    """The saved tiny model of each family lmms-eval's ``llava_hf`` loads (by the config's model_type)."""
    if request.param == "llava":
        return lmms_setup
    model, processor = get_family(request.param).build_tiny(seed=0)
    return _saved(tmp_path_factory.mktemp(f"lmms_{request.param}"), model, processor)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    yield mp
    mp.undo()


def _evaluate(root, model_args: str, batch_size: int = 1):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(
        model="prunebench_llava",
        model_args=f"pretrained={root / 'model'},{model_args}",
        tasks=["prunebench_shapes"],
        task_manager=TaskManager(include_path=str(root / "task")),
        limit=N,
        device="cpu",
        log_samples=True,
        batch_size=batch_size,
    )


def test_chat_template_reproduces_the_prompt_template():
    from jinja2 import Template

    for template in (TEMPLATE, "USER: <image>\n{question} ASSISTANT:", "Q: <image>\n\n{question}\nA:"):
        rendered = Template(chat_template_from_prompt(template)).render(
            messages=[{"role": "user", "content": "<image>\nwhat is it's colour?"}]
        )
        assert rendered == template.format(question="what is it's colour?")


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("model_args", ["method=none", "method=fastv,budget=8,layer=2", "method=random,budget=5,seed=3"])
def test_lmms_eval_answers_equal_prunebench_generation(lmms_family_setup, model_args, batch_size):
    """Batch size 3 over 4 requests: one padded batch of 3 and one of 1, each answer equal to batch size 1's;
    on LLaVA-1.5, LLaVA-NeXT (anyres tiles) and LLaVA-OneVision, all through ``prunebench_llava``."""
    root, model, processor = lmms_family_setup
    res = _evaluate(root, model_args, batch_size)
    logged = res["samples"]["prunebench_shapes"]
    assert len(logged) == N
    args = dict(kv.split("=") for kv in model_args.split(","))
    method = args.pop("method")
    budget = int(args.pop("budget")) if "budget" in args else None
    params = {k: int(v) for k, v in args.items()}
    task = get_task("shapes")
    samples = {s.id: s for s in task.samples(split="eval", n=N)}
    hits = []
    with apply_pruner(model, method, budget=budget, **params):
        for entry in logged:
            sample = samples[entry["doc"]["id"]]
            inputs = processor(images=[sample.image], text=[TEMPLATE.format(question=sample.question)],
                               return_tensors="pt")
            eot = processor.tokenizer.eos_token_id
            out = model.generate(**inputs, max_new_tokens=task.max_new_tokens, do_sample=False,
                                 pad_token_id=eot, eos_token_id=eot)
            ours = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
            assert entry["filtered_resps"][0] == ours
            hits.append(float(Task.normalise(ours) == Task.normalise(sample.answer)))
    assert res["results"]["prunebench_shapes"]["exact_match,none"] == pytest.approx(sum(hits) / N)


def test_a_failing_pruner_is_an_error_not_an_empty_answer(lmms_setup):
    root, _, _ = lmms_setup
    with pytest.raises(RuntimeError, match="did not run"):
        _evaluate(root, "method=_test_broken_llm,budget=4")
    with pytest.raises(RuntimeError, match="deliberately broken"):  # batched: generate's error itself
        _evaluate(root, "method=_test_broken_llm,budget=4", batch_size=2)


def _cli_args(root, model_args: str, *extra: str) -> list[str]:
    return ["--model", "prunebench_llava", "--model_args", f"pretrained={root / 'model'},{model_args}",
            "--tasks", "prunebench_shapes", "--include_path", str(root / "task"), "--limit", str(N),
            "--device", "cpu", *extra]


def test_documented_entry_point_exit_codes(lmms_setup, capsys):
    """`python -m benchmarks.lmms` (the README's command) returns 0 on success and 1 on a failed run,
    where lmms-eval's own `__main__` exits 0 either way."""
    from benchmarks.lmms.__main__ import main

    root, _, _ = lmms_setup
    assert main(_cli_args(root, "method=random,budget=5", "--batch_size", "2")) == 0
    assert "exact_match" in capsys.readouterr().out
    assert main(_cli_args(root, "method=_test_broken_llm,budget=4")) == 1
    assert "prunebench: lmms-eval evaluation failed: RuntimeError" in capsys.readouterr().err
    assert main(_cli_args(root, "method=none", "--batch_size", "0")) == 1
    assert "--batch_size '0' is not supported" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("why, model_args", [
    ("unknown method", "method=no_such_method"),
    ("missing model folder", "method=none"),
])
def test_documented_command_exits_nonzero_in_a_subprocess(lmms_setup, why, model_args):
    import subprocess
    import sys

    root, _, _ = lmms_setup
    args = _cli_args(root, model_args)
    if why == "missing model folder":
        args[3] = f"pretrained={root / 'no_such_folder'},method=none"
    run = subprocess.run([sys.executable, "-m", "benchmarks.lmms", *args], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 1, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("prunebench: lmms-eval evaluation failed:"), last
    assert ("no_such_method" in last) if why == "unknown method" else ("folder not found" in last), last
