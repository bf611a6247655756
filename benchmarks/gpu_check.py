"""``make gpu-check``: the one command to run when a CUDA machine is available (no network needed).

Everything it uses is installed by ``make setup`` and built from config (no checkpoint, no dataset).
Steps, each timed, into one report file (``results/gpu-check/report.md``, plus ``report.json``):

1. ``kernels``: the Triton kernels against their torch references, compiled for real on the GPU (the
   cases of every ``tests/test_ops_*.py``, run with ``PRUNEBENCH_OPS_CHECK=cuda``: see
   ``tests/_ops_interp.py``), and the ahead-of-time compile tests (``tests/test_ops_compile.py``).
2. ``perf``: ``python -m benchmarks.perf --device cuda``: per-op Triton vs reference timings and the
   model prefill timed with CUDA events.
3. ``suite``: the whole test suite with ``PRUNEBENCH_OPS_CHECK=cuda`` (the ops cases on the GPU; every
   other test runs as in CI: the tests that take a device are the ops cases and the runner's device
   resolution).

Without a CUDA GPU it checks nothing: it prints one ``SKIPPED`` line saying so, writes the report
with that status and exits with code 3 (so a script cannot mistake it for a passed check). Budget:
under 10 minutes on one GPU (the suite is the long step; ``--steps kernels,perf`` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.perf import git_commit

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("kernels", "perf", "suite")
NO_GPU_EXIT = 3


def step_commands(python: str = sys.executable) -> dict[str, list[str]]:
    """The command each step runs (from the repository root)."""
    ops_tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_ops_*.py"))
    return {
        "kernels": [python, "-m", "pytest", "-q", *ops_tests],
        "perf": [python, "-m", "benchmarks.perf", "--device", "cuda", "--out", "results/gpu-check/perf.json"],
        "suite": [python, "-m", "pytest", "-q", "tests"],
    }


def write_report(out_dir: Path, report: dict) -> Path:
    """``report.json`` and a readable ``report.md`` in ``out_dir``; returns the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"# gpu-check: {report['status']}", "",
             f"- when: {report['when']}", f"- commit: {report['commit']}", f"- machine: {report['machine']}",
             f"- gpu: {report['gpu']}", f"- torch: {report['torch']}", ""]
    if report.get("reason"):
        lines += [report["reason"], ""]
    for s in report["steps"]:
        lines += [f"## {s['name']}: {'passed' if s['returncode'] == 0 else 'FAILED'} ({s['seconds']:.0f} s)", "",
                  f"`{' '.join(s['command'])}`", "", "```", s["tail"].rstrip(), "```", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of: {', '.join(STEPS)} (default: all)")
    p.add_argument("--out", default="results/gpu-check", help="report folder (default results/gpu-check)")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown or not steps:
        p.error(f"--steps accepts {', '.join(STEPS)}; got {args.steps!r}")
    import torch

    out_dir = Path(args.out)
    report: dict = {"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "commit": git_commit(),
                    "machine": f"{platform.node()} {platform.machine()}", "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "steps": []}
    if not torch.cuda.is_available():
        report["status"] = "SKIPPED"
        report["reason"] = ("no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing was checked; "
                            "run `make gpu-check` on a machine with one")
        path = write_report(out_dir, report)
        print(f"gpu-check: SKIPPED: {report['reason']} (report: {path})")
        return NO_GPU_EXIT
    env = {**os.environ, "PRUNEBENCH_OPS_CHECK": "cuda"}
    env.pop("TRITON_INTERPRET", None)
    commands = step_commands()
    for name in steps:
        print(f"gpu-check: {name}: {' '.join(commands[name])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(commands[name], cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        report["steps"].append({"name": name, "command": commands[name], "returncode": proc.returncode,
                                "seconds": seconds, "tail": tail})
        print(f"gpu-check: {name}: {'passed' if proc.returncode == 0 else 'FAILED'} in {seconds:.0f} s", flush=True)
    failed = [s["name"] for s in report["steps"] if s["returncode"] != 0]
    report["status"] = "FAILED: " + ", ".join(failed) if failed else "passed"
    path = write_report(out_dir, report)
    print(f"gpu-check: {report['status']} (report: {path})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
