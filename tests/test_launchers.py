"""Sweeps on the launchers users scale out to: joblib (local), submitit (SLURM's code path), Ray.

The same sweep through each launcher gives exactly the same cells: the same cell folders (hashes),
byte-identical predictions and equal accuracy and FLOPs fields. Killing the parent of a joblib sweep
leaves no worker behind. Ray runs on a local head bound to 127.0.0.1 only (node IP 127.0.0.1,
dashboard and usage stats off).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from benchmarks import store

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ["model=tiny", "method=fastv,random", "budgets=[null,9]", "n_samples=4", "batch_size=2", "progress=false",
         "latency.n_samples=1", "latency.warmup=0", "latency.decode_tokens=2"]
EXACT = ("accuracy", "accuracy_by_family", "accuracy_ci95", "accuracy_rel", "accuracy_rel_ci95", "tflops_prefill",
         "flops_rel", "equiv_tokens", "variant", "n_samples", "config_hash")
#: Ray on loopback only: without this Ray resolves 127.0.0.1 to the machine's interface address.
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def sweep(tmp: Path, launcher: list[str], env: dict[str, str] | None = None) -> Path:
    results = tmp / "r"
    run = subprocess.run([sys.executable, "-m", "benchmarks.run", "-m", *launcher, *SWEEP, f"results_dir={results}",
                          f"hydra.sweep.dir={tmp / 'h'}"], capture_output=True, text=True, cwd=ROOT, timeout=900,
                         env={**os.environ, **(env or {})})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return results


def cells(results: Path) -> dict[str, tuple[bytes, dict]]:
    """Relative cell folder -> (predictions bytes, the fields that must match exactly)."""
    out = {}
    for c in store.iter_cells(results):
        m = store.read_metrics(c)
        out[c.relative_to(results).as_posix()] = ((c / store.PREDICTIONS).read_bytes(), {k: m[k] for k in EXACT})
    return out


@pytest.fixture(scope="module")
def joblib_cells(tmp_path_factory) -> dict:
    got = cells(sweep(tmp_path_factory.mktemp("joblib"), ["hydra/launcher=local", "hydra.launcher.n_jobs=2"]))
    assert len(got) == 3  # the reference once, fastv and random
    return got


@pytest.mark.slow
def test_submitit_local_gives_exactly_the_joblib_cells(tmp_path, joblib_cells):
    """submitit's local executor runs the job code path SLURM runs (pickled job, subprocess)."""
    assert cells(sweep(tmp_path, ["hydra/launcher=submitit_local"])) == joblib_cells


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 only, stopped afterwards."""
    ray = Path(sys.executable).parent / "ray"
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must stay under 108 characters
    env = {**os.environ, **LOOPBACK_RAY}
    start = subprocess.run([str(ray), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--include-dashboard=false", "--disable-usage-stats", "--num-cpus=2",
                            f"--temp-dir={tmp}"], capture_output=True, text=True, env=env, timeout=300)
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray), "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_ray_gives_exactly_the_joblib_cells(tmp_path, joblib_cells, ray_head):
    import psutil

    got = cells(sweep(tmp_path, ["hydra/launcher=ray"], env={**LOOPBACK_RAY, "RAY_ADDRESS": ray_head}))
    assert got == joblib_cells
    # Every socket Ray listens on is on loopback.
    ray_pids = {p.pid for p in psutil.process_iter(["name", "cmdline"])
                if "ray" in (p.info["name"] or "") or "raylet" in " ".join(p.info["cmdline"] or [])
                or "gcs_server" in (p.info["name"] or "")}
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in ray_pids:
            assert c.laddr.ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1"), c


@pytest.mark.slow
def test_killing_the_parent_of_a_joblib_sweep_leaves_no_worker(tmp_path):
    """Before: after `kill -9` of the parent the loky workers (~880 MB each) stayed alive and went on
    writing cells. Now each worker exits within a second of its parent."""
    import psutil

    long_sweep = ["model=tiny", "method=fastv,random,pdrop,divprune", "budgets=[null,9,6,3]", "n_samples=100",
                  "batch_size=2", "progress=false", f"results_dir={tmp_path / 'r'}", f"hydra.sweep.dir={tmp_path / 'h'}"]
    parent = subprocess.Popen([sys.executable, "-m", "benchmarks.run", "-m", "hydra/launcher=local",
                               "hydra.launcher.n_jobs=2", *long_sweep], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until the workers run and a first cell is written
            try:
                workers = psutil.Process(parent.pid).children(recursive=True)
            except psutil.Error:
                workers = []
            if len(workers) >= 2 and list(pathlib.Path(tmp_path / "r").rglob(store.METRICS)):
                break
            time.sleep(0.2)
        assert len(workers) >= 2 and parent.poll() is None, "the sweep did not start its workers"
    finally:
        parent.kill()
        parent.wait()
    written = len(list((tmp_path / "r").rglob(store.METRICS)))
    gone, alive = psutil.wait_procs(workers, timeout=15)
    for p in alive:
        p.kill()
    assert not alive, [(p.pid, p.status()) for p in alive]
    time.sleep(1)
    assert len(list((tmp_path / "r").rglob(store.METRICS))) == written  # nothing written after the kill


def test_the_guard_watches_workers_only(monkeypatch):
    from benchmarks import launch

    monkeypatch.setattr(launch, "_watching", False)
    monkeypatch.setenv(launch.PARENT_ENV, f"{socket.gethostname()}:{os.getpid()}")
    assert launch.watch_sweep_parent() is False  # the sweep's parent itself
    monkeypatch.setenv(launch.PARENT_ENV, f"another-host:{os.getppid()}")
    assert launch.watch_sweep_parent() is False  # a SLURM node: the pid means nothing here
    monkeypatch.delenv(launch.PARENT_ENV)
    assert launch.watch_sweep_parent() is False
