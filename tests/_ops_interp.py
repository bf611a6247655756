"""Run a test module's Triton-interpreter comparisons in a fresh Python process.

``@triton.jit`` decides between compiled and interpreted kernels when ``pruners.ops`` is imported,
from ``TRITON_INTERPRET``. Inside one pytest process the package is usually imported already (by
other tests) without it, so each ``tests/test_ops_*.py`` runs its kernel-vs-reference cases in a
subprocess started with ``TRITON_INTERPRET=1``: the subprocess imports the test module by path and
calls its ``interpreter_results()``, which returns ``{case_id: {"ok": bool, "msg": str}}`` plus
``"__interpret__"`` (whether the kernels really ran in the interpreter). One subprocess per test
file keeps the start-up cost (~3 s for torch + triton) paid once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

_CODE = """
import importlib.util, json, sys
import torch
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("_ops_interp_target", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
with open(sys.argv[2], "w") as f:
    json.dump(mod.interpreter_results(), f)
"""


def run_interpreter_cases(test_file: str, timeout: float = 600) -> dict:
    """Run ``interpreter_results()`` of ``test_file`` under TRITON_INTERPRET=1; return its dict."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    env.pop("PRUNEBENCH_OPS", None)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "results.json"
        proc = subprocess.run(
            [sys.executable, "-c", _CODE, test_file, str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"interpreter subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def collect(cases: dict[str, dict], check: Callable[[dict], None]) -> dict:
    """Run ``check(params)`` for every case (in the interpreter subprocess); record pass/fail text."""
    from pruners.ops._dispatch import INTERPRET

    results: dict = {"__interpret__": bool(INTERPRET)}
    for cid, params in cases.items():
        try:
            check(params)
            results[cid] = {"ok": True, "msg": ""}
        except Exception as e:  # reported by the parent test with the message
            results[cid] = {"ok": False, "msg": f"{type(e).__name__}: {e}"}
    return results


def assert_case(results: dict, cid: str) -> None:
    """Parent-side assertion for one case id."""
    assert results["__interpret__"], "the subprocess did not run the kernels in Triton's interpreter"
    r = results[cid]
    assert r["ok"], r["msg"]


TOL = {  # (rtol, atol) for outputs in the input dtype (one output ulp)
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def interpreter_suite(test_file: str, cases: dict[str, dict], check: Callable[[dict], None]):
    """The three pieces every ``tests/test_ops_*.py`` needs, bound to its cases and check:

    ``interpreter_results`` (called in the subprocess), the module-scoped ``interp`` fixture (runs the
    subprocess once per file) and the parametrised ``test_triton_kernel_matches_reference``. Unpack
    them into module globals with those names so pytest collects them.
    """
    import pytest

    def interpreter_results() -> dict:
        return collect(cases, check)

    @pytest.fixture(scope="module")
    def interp():
        return run_interpreter_cases(test_file)

    @pytest.mark.parametrize("case", sorted(cases))
    def test_triton_kernel_matches_reference(interp, case):
        assert_case(interp, case)

    return interpreter_results, interp, test_triton_kernel_matches_reference
