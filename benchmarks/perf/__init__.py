"""Performance figures for ``make perf`` (``python -m benchmarks.perf``); see ``__main__.py``.

- ``memory``: exact peak live-tensor accounting (``LiveTensorBytes``), CPU or GPU.
- ``ops``: reference ``attention_rows`` memory vs the full attention map; per-op timings (Triton vs
  reference on CUDA).
- ``model``: pruner overhead fraction and realised prefill speed-up vs the FLOPs bound on a
  LLaVA-1.5-shaped model.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    """The repository's HEAD commit (what a perf figure was measured at), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None
