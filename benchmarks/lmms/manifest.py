"""Entry point payload for lmms-eval's model registry (group ``lmms_eval.models``).

Kept apart from the model modules so lmms-eval can read the manifests without importing the model code.
pyproject.toml's one entry point (``prunebench_llava = benchmarks.lmms.manifest:MANIFEST``) registers every
model listed here: lmms-eval accepts an iterable of manifests as an entry point's payload, so a new model
needs a line here, not a new entry point (nor a reinstall of the editable package).
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = (
    ModelManifest(model_id="prunebench_llava", simple_class_path="benchmarks.lmms.model.PrunebenchLlava"),
    ModelManifest(model_id="prunebench_qwen2_5_vl", simple_class_path="benchmarks.lmms.qwen.PrunebenchQwen2_5_VL"),
    ModelManifest(model_id="prunebench_qwen2_vl", simple_class_path="benchmarks.lmms.qwen.PrunebenchQwen2_VL"),
    ModelManifest(model_id="prunebench_qwen3_vl", simple_class_path="benchmarks.lmms.qwen.PrunebenchQwen3_VL"),
)
