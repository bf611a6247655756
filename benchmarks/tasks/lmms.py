"""``lmms``: any lmms-eval task evaluated by prunebench's runner (``task=lmms task.names=[pope,gqa]``).

The task's documents, prompt (``doc_to_text``), image (``doc_to_visual``), target and generation
settings are lmms-eval's; each prediction is scored by the task's own ``process_results`` and the cell's
``task_metrics`` are its own aggregations (POPE's accuracy / precision / recall / F1 / yes-ratio, MME's
perception and cognition scores, ...). The runner adds what lmms-eval's CLI loses: FLOPs, latency,
KV bytes, kept sets, batching and the leaderboard. The row ``score`` is the task's first metric for that
document (used for ``accuracy`` and its intervals).

Refused with a clear error, before the model loads: tasks judged by an API model (MM-Vet,
LLaVA-Bench, GPT-matched MMBench: a ``gpt_eval_model_name`` in their metadata, or a known name), tasks
whose output type is not ``generate_until`` or whose documents are not images (video, text-only), groups
(run their member tasks by name), and datasets that are not available offline. A document with several
images becomes one sample holding all of them (`Sample.extra_images`): the model's prompt places them,
in the task's order, where it places one (its ``<image>`` tokens in the question text are removed).
docs/tasks.md "lmms-eval tasks in the runner".
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

from benchmarks.tasks import Sample, Task, register_task

#: Tasks scored by an API judge (refused: prunebench runs offline).
API_JUDGED = ("mmvet", "llava_in_the_wild", "llava_bench", "llava_wilder", "mmbench", "mathvista", "mmvetv2")
IMAGE_TOKEN = "<image>"
#: lmms-eval task name prefix -> the ability it stresses (UniPruneBench's grouping, coarsened); others: general
ABILITIES = {
    "textvqa": "ocr", "ocrbench": "ocr", "docvqa": "ocr", "chartqa": "ocr", "infovqa": "ocr", "ai2d": "ocr",
    "pope": "hallucination", "hallusion": "hallucination",
    "mme": "perception", "seedbench": "perception", "realworldqa": "perception",
    "scienceqa": "reasoning", "mmmu": "reasoning", "mathverse": "reasoning",
    "gqa": "general", "vqav2": "general", "vizwiz": "general", "mmstar": "general",
}


def ability_of(name: str) -> str:
    """The ability lmms-eval task ``name`` stresses (`ABILITIES` by prefix; ``general`` otherwise)."""
    for prefix, ability in ABILITIES.items():
        if name == prefix or name.startswith(prefix + "_"):
            return ability
    return "general"


@lru_cache(maxsize=4)
def task_manager(include_path: str | None) -> Any:
    """lmms-eval's task index (about 8 s: it reads every task YAML once per process and path)."""
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, verbosity="ERROR")


def _judged(name: str, config: Any) -> bool:
    """Scored by an API model: a known name, or (``config`` given) judge settings in its metadata."""
    if any(name == j or name.startswith(j + "_") for j in API_JUDGED):
        return True
    if config is None:
        return False
    meta = config.metadata
    metas = meta if isinstance(meta, list) else [meta or {}]
    return any(isinstance(m, dict) and any("gpt_eval" in k or "judge" in k for k in m) for m in metas)


@register_task("lmms")
class LmmsTask(Task):
    """One lmms-eval task; `configure` binds the name (``task.names`` holds one or more)."""

    families: list[str] = []
    options = ("names", "include_path")

    def __init__(self, lmms_name: str | None = None, include_path: str | None = None) -> None:
        self.lmms_name, self.include_path = lmms_name, include_path
        if lmms_name is not None:
            self.name = f"lmms-{lmms_name}"
            self.ability = ability_of(lmms_name)
        self._task: Any = None
        self._docs: dict[str, Any] = {}
        self._results: dict[tuple[str, str], dict[str, Any]] = {}
        self._last: dict[str, dict[str, Any]] = {}  # sample id -> its latest scored prediction's results

    # ---- configuration ---------------------------------------------------------------------------
    @classmethod
    def configured(cls, task_cfg: dict[str, Any]) -> list[LmmsTask]:
        """One bound task per name of ``task.names`` (a list or a comma string), checked before any model
        loads; ``task.include_path``: a folder of extra task YAMLs (e.g. `benchmarks.lmms.export_shapes`')."""
        names = task_cfg.get("names")
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError("task=lmms needs task.names: a list of lmms-eval task names, e.g. "
                             f"task.names=[pope,gqa]; got {names!r}")
        include = task_cfg.get("include_path")
        tasks = [cls(n, None if include is None else str(include)) for n in names]
        for t in tasks:
            t.lmms_task()
        return tasks

    def recorded_config(self) -> dict[str, Any]:
        """What a cell of this task records as its task config (and its hash covers)."""
        return {"name": self.name, "names": [self.lmms_name], "include_path": self.include_path}

    def lmms_task(self) -> Any:
        """The lmms-eval ``ConfigurableTask`` (loaded once), after the refusals of the module docstring."""
        if self._task is not None:
            return self._task
        if self.lmms_name is None:
            raise ValueError("task=lmms needs task.names (lmms-eval task names), e.g. task.names=[pope]")
        from lmms_eval.tasks import get_task_dict

        tm = task_manager(self.include_path)
        name = self.lmms_name
        if name not in tm.all_tasks:
            near = [t for t in tm.all_tasks if name.split("_")[0] in t][:8]
            raise ValueError(f"task.names: {name!r} is not an lmms-eval task (similar: {near}; extra YAMLs: "
                             "task.include_path=DIR)")
        if name in getattr(tm, "all_groups", ()):
            raise ValueError(f"task.names: {name!r} is an lmms-eval group; name its tasks instead")
        if _judged(name, None):
            raise ValueError(f"task.names: {name!r} is scored by an API judge model; prunebench runs offline and "
                             "accepts tasks scored by their own process_results")
        try:
            loaded = get_task_dict([name], tm)
        except Exception as err:  # noqa: BLE001 - datasets raise many kinds when offline
            raise ValueError(f"task.names: lmms-eval task {name!r} could not load its dataset offline "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); download it on a machine "
                             "with network into the Hugging Face cache first") from err
        task = loaded.get(name)
        if task is None or isinstance(task, dict):
            raise ValueError(f"task.names: {name!r} is an lmms-eval group; name its tasks instead")
        if task.OUTPUT_TYPE != "generate_until":
            raise ValueError(f"task.names: {name!r} has output_type {task.OUTPUT_TYPE!r}; accepted: 'generate_until'")
        if _judged(name, task.config):
            raise ValueError(f"task.names: {name!r} is scored by an API judge model; prunebench runs offline and "
                             "accepts tasks scored by their own process_results")
        self._task = task
        return task

    # ---- Task interface ----------------------------------------------------------------------------
    @property
    def max_new_tokens(self) -> int:  # type: ignore[override]
        return int(self.lmms_task().config.generation_kwargs.get("max_new_tokens", 128))

    def samples(self, split: str = "eval", n: int | None = None, seed: int = 0) -> list[Sample]:
        """The task's test documents (``split`` must be ``eval``), the first ``n``."""
        if split != "eval":
            raise ValueError(f"task {self.name!r}: split must be 'eval' (the lmms-eval task's test split), got {split!r}")
        task = self.lmms_task()
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        out = []
        for i in range(len(docs) if n is None else min(n, len(docs))):
            doc = docs[i]
            visuals = task.doc_to_visual(doc)
            if not visuals or not all(hasattr(v, "convert") for v in visuals):
                kinds = sorted({type(v).__name__ for v in visuals}) if visuals else None
                raise ValueError(f"task {self.name!r}: document {i} has {len(visuals)} visual(s) of type {kinds}; "
                                 "accepted: one or more images")
            question = task.doc_to_text(doc)
            if question.count(IMAGE_TOKEN) > len(visuals):
                raise ValueError(f"task {self.name!r}: document {i} places {question.count(IMAGE_TOKEN)} images but "
                                 f"has {len(visuals)}")
            question = re.sub(r"<image>\s*", "", question)  # the model's prompt places the image itself
            target = task.doc_to_target(doc)
            sid = f"{self.name}-{i}"
            self._docs[sid] = doc
            family = str(doc.get("category", doc.get("question_type", self.lmms_name))) if hasattr(doc, "get") else self.lmms_name
            out.append(Sample(id=sid, image=visuals[0].convert("RGB"), question=question,
                              answer=str(target[0] if isinstance(target, list) else target), family=family,
                              meta={"task": "lmms", "lmms_task": self.lmms_name, "doc_index": i},
                              extra_images=[v.convert("RGB") for v in visuals[1:]]))
        return out

    def relevant_patches(self, sample: Sample, grid_hw: tuple[int, int]) -> list[int]:
        return []  # unknown for external data: the recall column stays empty

    def clean_prediction(self, text: str) -> str:
        """The generation cut at the task's first stop sequence (``until``), as generate_until defines it."""
        for stop in self.lmms_task().config.generation_kwargs.get("until") or []:
            if stop and stop in text:
                text = text.split(stop, 1)[0]
        return text

    def _processed(self, prediction: str, sample_id: str) -> dict[str, Any]:
        key = (sample_id, prediction)
        if key not in self._results:
            self._results[key] = self.lmms_task().process_results(self._docs[sample_id], [prediction])
        self._last[sample_id] = self._results[key]
        return self._results[key]

    def score(self, prediction: str, sample: Sample) -> float:
        """The task's first metric for this document (a number, a ``score`` field, or the metric's
        aggregation over this one document)."""
        task = self.lmms_task()
        metric = task.config.metric_list[0]["metric"]
        value = self._processed(prediction, sample.id)[metric]
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, dict) and isinstance(value.get("score"), (int, float)):
            return float(value["score"])
        return float(task.aggregation()[metric]([value]))

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Every metric of the task aggregated the task's own way over the cell's predictions."""
        task = self.lmms_task()
        per_metric: dict[str, list[Any]] = {}
        for r in rows:  # the results `score` computed for the row (from the unstripped generation)
            done = self._last.get(r["id"])
            for k, v in (done if done is not None else self._processed(r["prediction"], r["id"])).items():
                per_metric.setdefault(k, []).append(v)
        out = {}
        for k, values in per_metric.items():
            fn = task.aggregation().get(k)
            if fn is not None:
                v = fn(values)
                out[k] = float(v) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else v
        return out
