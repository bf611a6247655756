"""The family-independent pruning engine (hooks, vision loop, prompt surgery, LLM stage).

`Engine` attaches one pruner to one model through its family's `FamilySpec`; see docs/engine.md.
"""

from mllm_adapters.engine.layout import ImageLayout, split_budget
from mllm_adapters.engine.lifecycle import Engine
from mllm_adapters.engine.spec import AttentionParts, FamilySpec

__all__ = ["AttentionParts", "Engine", "FamilySpec", "ImageLayout", "split_budget"]
