"""Run a test module's Triton-interpreter comparisons in a fresh Python process.

``@triton.jit`` decides between compiled and interpreted kernels when ``pruners.ops`` is imported,
from ``TRITON_INTERPRET``. Inside one pytest process the package is usually imported already (by
other tests) without it, so each ``tests/test_ops_*.py`` runs its kernel-vs-reference cases in a
subprocess started with ``TRITON_INTERPRET=1``: the subprocess imports the test module by path and
calls its ``interpreter_results()``, which returns ``{case_id: {"ok": bool, "msg": str}}`` plus
``"__interpret__"`` (whether the kernels really ran in the interpreter). One subprocess per test
file keeps the start-up cost (~3 s for torch + triton) paid once.

``PRUNEBENCH_OPS_CHECK=cuda`` (what ``make gpu-check`` sets on a GPU machine) runs the same cases with
the kernels compiled for real on the GPU instead: the subprocess starts without ``TRITON_INTERPRET``
and every tensor the cases create (``torch.randn``, ``torch.tensor``, ...) is built as written, on the
CPU with the same generators, then moved to ``cuda`` (`OnDevice`), so kernel and reference see the
same inputs there. The default, ``interpret``, is what CI runs.
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
MODES = ("interpret", "cuda")


def check_mode() -> str:
    """``PRUNEBENCH_OPS_CHECK``: ``interpret`` (default: Triton's CPU interpreter) or ``cuda`` (compiled)."""
    mode = os.environ.get("PRUNEBENCH_OPS_CHECK", "interpret")
    if mode not in MODES:
        raise ValueError(f"PRUNEBENCH_OPS_CHECK={mode!r}; accepted: {', '.join(MODES)}")
    return mode


#: torch factory functions whose results `OnDevice` moves (they are called as written, on the CPU)
FACTORIES = ("randn", "rand", "randint", "randperm", "tensor", "arange", "eye", "ones", "zeros", "full", "empty",
             "linspace", "ones_like", "zeros_like", "randn_like", "rand_like", "full_like", "empty_like")


class OnDevice(torch.overrides.TorchFunctionMode):
    """Inside it, every tensor a torch factory function creates without an explicit ``device`` is created
    as written (on the CPU, with the caller's generator: the same values) and moved to ``device``."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self._factories = {getattr(torch, n) for n in FACTORIES}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self._factories and kwargs.get("device") is None and isinstance(out, torch.Tensor):
            like = func.__name__.endswith("_like") and args and isinstance(args[0], torch.Tensor)
            if not like or args[0].device.type == "cpu":
                out = out.to(self.device)
        return out


_CODE = """
import importlib.util, json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from tests._ops_interp import OnDevice
spec = importlib.util.spec_from_file_location("_ops_interp_target", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
if sys.argv[4] == "cuda":
    with OnDevice("cuda"):
        results = mod.interpreter_results()
else:
    results = mod.interpreter_results()
with open(sys.argv[2], "w") as f:
    json.dump(results, f)
"""


def run_interpreter_cases(test_file: str, timeout: float = 600) -> dict:
    """Run ``interpreter_results()`` of ``test_file`` under TRITON_INTERPRET=1 (or compiled on CUDA with
    ``PRUNEBENCH_OPS_CHECK=cuda``); return its dict."""
    mode = check_mode()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if mode == "interpret":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    env.pop("PRUNEBENCH_OPS", None)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "results.json"
        proc = subprocess.run(
            [sys.executable, "-c", _CODE, test_file, str(out), str(ROOT), mode],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"interpreter subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def collect(cases: dict[str, dict], check: Callable[[dict], None]) -> dict:
    """Run ``check(params)`` for every case (in the interpreter subprocess); record pass/fail text."""
    from pruners.ops._dispatch import INTERPRET

    results: dict = {"__interpret__": bool(INTERPRET), "__device__": str(torch.empty(0).device.type)}
    for cid, params in cases.items():
        try:
            check(params)
            results[cid] = {"ok": True, "msg": ""}
        except Exception as e:  # reported by the parent test with the message
            results[cid] = {"ok": False, "msg": f"{type(e).__name__}: {e}"}
    return results


def assert_case(results: dict, cid: str) -> None:
    """Parent-side assertion for one case id."""
    if check_mode() == "interpret":
        assert results["__interpret__"], "the subprocess did not run the kernels in Triton's interpreter"
    else:
        assert not results["__interpret__"] and results["__device__"] == "cuda", (
            f"PRUNEBENCH_OPS_CHECK=cuda but the kernels ran interpreted={results['__interpret__']} with inputs "
            f"on {results['__device__']}")
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
