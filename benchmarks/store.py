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
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("prunebench.store")

CELLS = "cells"
#: Damaged cells are moved here (same relative path, plus a time stamp), kept for inspection.
DAMAGED = "damaged"
TMP_PREFIX = ".tmp-"
METRICS = "metrics.json"
PREDICTIONS = "predictions.jsonl"
CONFIG = "config.yaml"
CELL_FILES = (CONFIG, PREDICTIONS, METRICS)
#: Fields every metrics.json must have for the cell to be reused or aggregated.
REQUIRED_METRICS = ("model", "task", "method", "budget", "n_samples", "accuracy", "config_hash")


def config_hash(cell_config: dict[str, Any]) -> str:
    """sha256 hex digest of the cell config as canonical JSON (sorted keys, no whitespace)."""
    blob = json.dumps(cell_config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _safe(name: Any) -> str:
    s = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in str(name))
    return s or "_"


def cell_dir(results_dir: str | Path, model: str, task: str, method: str, budget: int | str | None, digest: str,
             seed: int | None = None) -> Path:
    """Where a cell lives: ``results_dir/cells/<model>/<task>/<method>/b<budget|all|auto>[-s<seed>]-<hash12>``
    (``-s<seed>`` for the cells of a ``seeds=[...]`` run)."""
    label = ("ball" if budget is None else "bauto" if budget == "auto"
             else f"b{budget:g}" if isinstance(budget, float) else f"b{int(budget)}")  # fractions: b0.25
    if seed is not None:
        label += f"-s{int(seed)}"
    return Path(results_dir) / CELLS / _safe(model) / _safe(task) / _safe(method) / f"{label}-{digest[:12]}"


def cell_problem(path: str | Path) -> str | None:
    """Why the folder ``path`` is not a complete, readable cell, or None when it is.

    Checks that every file is present and parses, that metrics.json has `REQUIRED_METRICS`, that its
    config_hash matches the folder name, and that predictions.jsonl has one row per sample.
    """
    path = Path(path)
    missing = [name for name in CELL_FILES if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        metrics = json.loads((path / METRICS).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{METRICS} does not parse ({e})"
    if not isinstance(metrics, dict):
        return f"{METRICS} is not a JSON object"
    absent = [k for k in REQUIRED_METRICS if k not in metrics]
    if absent:
        return f"{METRICS} lacks {', '.join(absent)}"
    digest = str(metrics["config_hash"])
    if "-" in path.name and not digest.startswith(path.name.rsplit("-", 1)[1]):
        return f"{METRICS} config_hash {digest[:12]} does not match the folder name {path.name}"
    try:
        rows = [json.loads(line) for line in (path / PREDICTIONS).read_text(encoding="utf-8").splitlines() if line]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{PREDICTIONS} does not parse ({e})"
    if len(rows) != metrics["n_samples"]:
        return f"{PREDICTIONS} has {len(rows)} rows for n_samples={metrics['n_samples']}"
    try:
        config = yaml.safe_load((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return f"{CONFIG} does not parse ({e})"
    if not isinstance(config, dict):
        return f"{CONFIG} is not a mapping"
    return None


def is_finished(path: str | Path) -> bool:
    """A cell is finished when its directory (renamed into place only when complete) is a whole,
    readable cell (`cell_problem` finds nothing)."""
    return Path(path).is_dir() and cell_problem(path) is None


def quarantine(path: str | Path, reason: str) -> Path:
    """Move a damaged cell folder to ``<results_dir>/damaged/<same relative path>-<UTC time>`` and log it.

    ``path`` must lie under ``<results_dir>/cells/``; the moved copy is kept for inspection and the
    cell is computed again.
    """
    path = Path(path)
    parts = path.parts
    root = Path(*parts[: len(parts) - 1 - parts[::-1].index(CELLS)])  # the results_dir
    dest = root / DAMAGED / path.relative_to(root / CELLS)
    dest = dest.with_name(f"{dest.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, dest)
    log.warning("damaged cell %s (%s): moved to %s; it will be computed again", path, reason, dest)
    return dest


def reusable(path: str | Path) -> bool:
    """True when ``path`` is a finished cell; a damaged or half-written folder there is quarantined
    (and False returned) so the cell can be written again."""
    path = Path(path)
    if not path.exists():
        return False
    problem = cell_problem(path)
    if problem is None:
        return True
    try:
        quarantine(path, problem)
    except FileNotFoundError:  # another job moved or replaced it meanwhile
        return is_finished(path)
    return False


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


def cell_folders(results_dir: str | Path) -> list[Path]:
    """Every cell folder under ``results_dir/cells`` (``<model>/<task>/<method>/<cell>``, temporary
    directories excluded), finished or not, sorted."""
    root = Path(results_dir) / CELLS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*/*/*/*") if p.is_dir() and not p.name.startswith(TMP_PREFIX))


def iter_cells(results_dir: str | Path) -> list[Path]:
    """Finished, readable cell directories under ``results_dir`` (temporary directories excluded), sorted."""
    return [p for p in cell_folders(results_dir) if cell_problem(p) is None]


def unreadable_cells(results_dir: str | Path) -> list[tuple[Path, str]]:
    """(folder, what is wrong) for every cell folder under ``results_dir`` that is not a whole cell."""
    return [(p, why) for p in cell_folders(results_dir) if (why := cell_problem(p)) is not None]


def read_predictions(cell: str | Path) -> list[dict[str, Any]]:
    """The rows of a finished cell's predictions.jsonl."""
    text = (Path(cell) / PREDICTIONS).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line]


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
