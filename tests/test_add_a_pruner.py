"""The README's "Adding a pruner" steps, followed literally in a copy of the repository.

Copy the tracked tree (as a fresh clone has it), save the README's example as
``pruners/my_method.py``, then ``make bench METHOD=my_method`` and ``make lint`` there, reusing this
test's venv (``VENV=...``; ``-o <stamp>`` so make does not reinstall the copy into it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    """The first python block of the README's "Adding a pruner" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Adding a pruner"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def fresh_copy(dest: Path) -> Path:
    """The tracked files of this checkout (a clone's content, uncommitted edits included)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.slow
def test_readme_add_a_pruner_steps_run_and_lint(tmp_path):
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.fail("make and git are needed to follow the README's steps")
    repo = fresh_copy(tmp_path / "clone")
    code = readme_example()
    assert '@register_pruner("my_method")' in code
    (repo / "pruners" / "my_method.py").write_text(code)

    venv = Path(sys.executable).parent.parent
    make = ["make", "-o", str(venv / ".prunebench-installed"), f"VENV={venv}"]
    bench = subprocess.run([*make, "bench", "METHOD=my_method", "N=8", "BUDGETS=[null,36,18]",
                            "ARGS=progress=false latency.n_samples=1"],
                           cwd=repo, capture_output=True, text=True, timeout=900)
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    cells = sorted((repo / "results" / "cells" / "embedded" / "shapes" / "my_method").glob("*/metrics.json"))
    assert len(cells) == 2, bench.stdout[-2000:]
    budgets = sorted(json.loads(p.read_text())["budget"] for p in cells)
    assert budgets == [18, 36]
    assert (repo / "results" / "leaderboard.csv").is_file()

    lint = subprocess.run([*make, "lint"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert lint.returncode == 0, lint.stdout[-3000:] + lint.stderr[-3000:]
