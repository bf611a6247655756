"""GPU readiness without a GPU: `make gpu-check` and `make perf ARGS='--device cuda'` say clearly that
nothing was checked, and the ops cases' CUDA mode builds the same inputs on another device."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check
from tests._ops_interp import ROOT, OnDevice, check_mode

no_gpu = not torch.cuda.is_available()


@pytest.mark.skipif(not no_gpu, reason="this machine has a CUDA GPU: gpu-check really runs there")
def test_gpu_check_without_gpu_skips_with_a_clear_line_and_exit_code(tmp_path, capsys):
    code = gpu_check.main(["--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == gpu_check.NO_GPU_EXIT
    assert "SKIPPED" in out and "no CUDA GPU" in out and "nothing was checked" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "SKIPPED" and report["steps"] == []
    assert "no CUDA GPU" in (tmp_path / "report.md").read_text()


def test_gpu_check_steps_cover_every_ops_test_and_reject_unknown_steps():
    cmds = gpu_check.step_commands("python")
    ops = sorted(p.name for p in (ROOT / "tests").glob("test_ops_*.py"))
    assert [c.split("/")[-1] for c in cmds["kernels"][4:]] == ops and "test_ops_compile.py" in ops
    assert cmds["perf"][3:5] == ["--device", "cuda"]
    with pytest.raises(SystemExit):
        gpu_check.main(["--steps", "kernels,bogus"])


@pytest.mark.skipif(not no_gpu, reason="this machine has a CUDA GPU: perf really runs there")
def test_perf_device_cuda_without_gpu_prints_a_skip_line(tmp_path):
    out = tmp_path / "perf.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.perf", "--device", "cuda", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped: --device cuda: no CUDA GPU" in proc.stdout
    report = json.loads(out.read_text())
    assert report["skipped"] and report["device"] == "cuda" and report["threads"] == 1
    assert set(report) >= {"commit", "machine", "dtype", "torch"}


def test_on_device_moves_what_factories_create_and_keeps_values():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want = torch.randn(2, 3, generator=g1)
    with OnDevice("meta"):
        x = torch.randn(2, 3, generator=g2)  # the CPU generator still works: created on CPU, then moved
        t = torch.tensor([1, 2])
        kept = torch.zeros(2, device="cpu")  # an explicit device is honoured
        y = (x + 1).to(torch.float16)  # not a factory: follows its input
        z = torch.zeros_like(want)  # a CPU-like is moved too
    assert x.device.type == t.device.type == y.device.type == z.device.type == "meta"
    assert kept.device.type == "cpu" and x.shape == want.shape and y.dtype == torch.float16
    g3 = torch.Generator().manual_seed(3)
    with OnDevice("cpu"):
        assert torch.equal(torch.randn(2, 3, generator=g3), want)


def test_ops_check_mode_is_validated(monkeypatch):
    monkeypatch.delenv("PRUNEBENCH_OPS_CHECK", raising=False)
    assert check_mode() == "interpret"
    monkeypatch.setenv("PRUNEBENCH_OPS_CHECK", "gpu")
    with pytest.raises(ValueError, match="PRUNEBENCH_OPS_CHECK='gpu'; accepted: interpret, cuda"):
        check_mode()
