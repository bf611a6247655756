"""The running environment is the locked one (``requirements.lock``), and a drift names its package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks import lockfile

ROOT = Path(__file__).resolve().parent.parent


def test_the_environment_matches_the_lock():
    problems = lockfile.drift(lockfile.read_lock(lockfile.lock_path()), lockfile.installed())
    assert not problems, "environment differs from the lock (run `make setup`):\n" + "\n".join(map(str, problems))


def test_a_swapped_version_is_caught_and_named(tmp_path):
    env = lockfile.installed()
    lock_text = lockfile.lock_path().read_text()
    assert "\ntorch==" in lock_text
    swapped = tmp_path / "requirements.lock"
    swapped.write_text(lock_text.replace(f"\ntorch=={env['torch']} ", "\ntorch==2.0.0 "))
    problems = lockfile.drift(lockfile.read_lock(swapped), env)
    assert [str(p) for p in problems] == [f"torch: locked 2.0.0, installed {env['torch']}"]
    run = subprocess.run([sys.executable, "-m", "benchmarks.lockfile", "check", "--lock", str(swapped)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1
    assert f"torch: locked 2.0.0, installed {env['torch']}" in run.stderr


def test_missing_and_extra_packages_are_named():
    lock = {"a": "1", "b": "2", "prunebench": "9"}
    env = {"a": "1", "c": "3", "prunebench": "0.1.0"}
    assert [str(p) for p in lockfile.drift(lock, env)] == [
        "b: locked 2, not installed", "c: 3 installed, not in the lock"]


def test_every_lock_line_is_pinned_and_hashed():
    lines = [ln for ln in lockfile.lock_path().read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines and all("==" in ln and " --hash=sha256:" in ln for ln in lines)
    names = [ln.split("==")[0] for ln in lines]
    assert names == sorted(names) and len(set(names)) == len(names)
    # The consistent set the issue asks for: Hydra's antlr with an lmms-eval that accepts it.
    pins = lockfile.read_lock(lockfile.lock_path())
    assert pins["antlr4-python3-runtime"].startswith("4.9.")
    assert tuple(int(x) for x in pins["filelock"].split(".")[:2]) < (4, 3)
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
