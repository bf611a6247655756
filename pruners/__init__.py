"""prunebench pruners: the registry, the base interfaces, one file per method, and the fused ops.

This layer knows nothing of model families: attaching a pruner to a model is the adapters' job
(`mllm_adapters.apply_pruner`).
"""

from pruners.registry import available_pruners, get_pruner_class, register_pruner

__all__ = ["available_pruners", "get_pruner_class", "register_pruner"]
