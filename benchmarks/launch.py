"""Sweep plumbing shared by the launchers: no worker outlives its sweep; Ray through joblib.

`SweepGuard` is a Hydra callback (``conf/config.yaml``, ``hydra.callbacks``). At the start of a
multirun it records the sweep's parent process (host and pid) in the environment, which the
launcher's workers inherit. `watch_sweep_parent`, called by every job (`benchmarks.run.run`), starts
a watchdog thread in a worker process: when the parent is gone (killed with ``kill -9``, so it could
not shut its pool down), the worker exits at once instead of going on writing cells. A cell being
written then is left as a temporary folder, which the next run removes (`benchmarks.store`).
Workers on another host (SLURM) are not watched: their parent's pid means nothing there.

With ``hydra/launcher=ray`` (Hydra's joblib launcher, ``backend: ray``) the same callback registers
Ray's joblib backend in the parent (`connect_ray`), so the jobs run as Ray tasks on the cluster
``RAY_ADDRESS`` names. This replaces hydra-ray-launcher, which pins ray 1.12 (no Python 3.11 wheel).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger("prunebench.launch")

#: ``<host>:<pid>`` of the process that launched the sweep (set by `SweepGuard`).
PARENT_ENV = "PRUNEBENCH_SWEEP_PARENT"
POLL_S = 0.5
_watching = False


class SweepGuard(Callback):
    """At the start of a multirun: record the sweep's parent for `watch_sweep_parent` (inherited by
    every worker started later), and with ``hydra/launcher=ray`` (joblib's ``backend: ray``) connect to
    Ray (`connect_ray`) before the launcher starts its pool."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        os.environ[PARENT_ENV] = f"{socket.gethostname()}:{os.getpid()}"
        if config.hydra.launcher.get("backend") == "ray":
            connect_ray()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch_sweep_parent() -> bool:
    """In a sweep worker on the parent's host, exit as soon as the sweep's parent is gone. Returns
    True when this process is watched (once per process; the parent itself is never watched)."""
    global _watching
    marker = os.environ.get(PARENT_ENV, "")
    host, _, pid_s = marker.rpartition(":")
    if _watching or not pid_s.isdigit() or host != socket.gethostname() or int(pid_s) == os.getpid():
        return _watching
    parent = int(pid_s)
    direct = os.getppid() == parent  # joblib's workers are children; Ray's are the raylet's

    def watch() -> None:
        while (os.getppid() == parent) if direct else _alive(parent):
            time.sleep(POLL_S)
        log.error("sweep parent %d is gone: worker %d exits", parent, os.getpid())
        os._exit(3)

    threading.Thread(target=watch, name="prunebench-sweep-guard", daemon=True).start()
    _watching = True
    return True


def connect_ray() -> None:
    """Connect this (the sweep's parent) process to Ray and register Ray's joblib backend, so Hydra's
    joblib launcher with ``backend: ray`` (``hydra/launcher=ray``) runs every job as a Ray task.

    ``ray.init()`` without an address joins the cluster ``RAY_ADDRESS`` names (``ray start --head``
    prints it), or else one running on this machine, or else starts a private one for the sweep.
    """
    try:
        import ray
        from ray.util.joblib import register_ray
    except ImportError as e:
        raise ImportError("hydra/launcher=ray needs Ray: pip install 'prunebench[ray]' (make setup installs it "
                          "from the lock)") from e
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    register_ray()
    log.info("Ray joblib backend registered (cluster %s)", ray.get_runtime_context().gcs_address)
