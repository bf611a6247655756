"""Performance figures for ``make perf`` (``python -m benchmarks.perf``); see ``__main__.py``.

- ``memory``: exact peak live-tensor accounting (``LiveTensorBytes``), CPU or GPU.
- ``ops``: reference ``attention_rows`` memory vs the full attention map; per-op timings (Triton vs
  reference on CUDA).
- ``model``: pruner overhead fraction and realised prefill speed-up vs the FLOPs bound on a
  LLaVA-1.5-shaped model.
"""
