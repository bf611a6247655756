"""Result cells on disk: keyed by a hash of their resolved config, written atomically, skipped when done.

A cell is one (model, task, method, budget) run. Its directory holds ``metrics.json``,
``predictions.jsonl`` and the resolved ``config.yaml``. The files are written into a hidden temporary
directory next to the final one and the directory is then renamed into place: a rename is atomic on
POSIX file systems, so a cell directory either exists complete or not at all. A sweep killed at any
moment therefore leaves only finished cells (plus a temporary directory that the next run removes),
and rerunning the same command skips them: nothing lost, partial or duplicated.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

CELLS = "cells"
TMP_PREFIX = ".tmp-"
METRICS = "metrics.json"


def config_hash(cell_config: dict[str, Any]) -> str:
    """sha256 hex digest of the cell config as canonical JSON (sorted keys, no whitespace)."""
    blob = json.dumps(cell_config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _safe(name: Any) -> str:
    s = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in str(name))
    return s or "_"


def cell_dir(results_dir: str | Path, model: str, task: str, method: str, budget: int | str | None, digest: str) -> Path:
    """Where a cell lives: ``results_dir/cells/<model>/<task>/<method>/b<budget|all|auto>-<hash12>``."""
    label = "ball" if budget is None else ("bauto" if budget == "auto" else f"b{int(budget)}")
    return Path(results_dir) / CELLS / _safe(model) / _safe(task) / _safe(method) / f"{label}-{digest[:12]}"


def is_finished(path: str | Path) -> bool:
    """A cell is finished when its directory (renamed into place only when complete) holds metrics.json."""
    return (Path(path) / METRICS).is_file()


def check_writable(results_dir: str | Path) -> Path:
    """Create ``results_dir`` if needed and prove it writable; a ValueError naming it otherwise."""
    path = Path(results_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f"{TMP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"results_dir={str(results_dir)!r} is not writable ({e.strerror or e}); "
            "accepted: a directory path this user can create and write"
        ) from e
    return path


def _fsync_write(path: Path, data: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_cell(final_dir: str | Path, files: dict[str, str]) -> bool:
    """Write ``files`` (name -> text) as one cell directory, atomically.

    Returns False (and discards this copy) when another process finished the same cell first.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f"{TMP_PREFIX}{final_dir.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # metrics.json last: even a non-atomic copy of the tree would only look finished when complete.
        for name in sorted(files, key=lambda n: n == METRICS):
            _fsync_write(tmp / name, files[name])
        try:
            os.rename(tmp, final_dir)
        except OSError:
            if is_finished(final_dir):
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(results_dir: str | Path) -> list[Path]:
    """Remove temporary cell directories left by killed processes of this host; returns them.

    Directories of live processes (a parallel job writing right now) and of other hosts (a shared
    file system under SLURM) are left alone.
    """
    root = Path(results_dir) / CELLS
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    host = socket.gethostname()
    for tmp in root.rglob(f"{TMP_PREFIX}*"):
        head, _, tail = tmp.name.rpartition(f"-{host}-")  # <prefix><name>-<host>-<pid>-<uuid>
        pid_s = tail.split("-", 1)[0]
        if not head or not tmp.is_dir() or not pid_s.isdigit():
            continue  # another host's (or not ours at all): leave it
        pid = int(pid_s)
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def iter_cells(results_dir: str | Path) -> list[Path]:
    """Finished cell directories under ``results_dir`` (temporary directories excluded), sorted."""
    root = Path(results_dir) / CELLS
    if not root.is_dir():
        return []
    return sorted(
        p.parent for p in root.rglob(METRICS) if not any(part.startswith(TMP_PREFIX) for part in p.parts)
    )


def read_metrics(cell: str | Path) -> dict[str, Any]:
    """The parsed metrics.json of a finished cell."""
    return json.loads((Path(cell) / METRICS).read_text(encoding="utf-8"))


def atomic_write_text(path: str | Path, data: str) -> None:
    """Write a single file atomically (temporary file in the same directory, then os.replace)."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _fsync_write(tmp, data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
