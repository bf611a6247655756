"""Entry point payload for lmms-eval's model registry (group ``lmms_eval.models``).

Kept apart from ``model.py`` so lmms-eval can read the manifest without importing the model code.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="prunebench_llava", simple_class_path="benchmarks.lmms.model.PrunebenchLlava")
