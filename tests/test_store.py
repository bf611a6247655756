"""Result cells: config hashing, atomic writes, skip-when-finished, stale temporary directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import store


def test_config_hash_is_order_independent_and_value_sensitive():
    a = {"model": {"name": "tiny"}, "budget": 9, "method": {"name": "fastv", "params": {"layer": 2}}}
    b = {"method": {"params": {"layer": 2}, "name": "fastv"}, "budget": 9, "model": {"name": "tiny"}}
    assert store.config_hash(a) == store.config_hash(b)
    c = {**a, "method": {"name": "fastv", "params": {"layer": 3}}}
    assert store.config_hash(a) != store.config_hash(c)
    assert store.config_hash({**a, "budget": None}) != store.config_hash(a)


def cell_files(digest: str, n: int = 1, **extra) -> dict[str, str]:
    """The three files of a valid cell with ``n`` prediction rows."""
    metrics = {"model": "tiny", "task": "shapes", "method": "fastv", "budget": 9, "n_samples": n,
               "accuracy": 1.0, "config_hash": digest, **extra}
    return {"config.yaml": "a: 1\n", "predictions.jsonl": '{"id": "s", "score": 1.0}\n' * n,
            "metrics.json": json.dumps(metrics)}


def test_write_cell_is_complete_or_absent(tmp_path):
    digest = "ab" * 32
    path = store.cell_dir(tmp_path, "tiny", "shapes", "fastv", 9, digest)
    assert not store.is_finished(path)
    assert store.write_cell(path, cell_files(digest, x=1))
    assert store.is_finished(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "metrics.json", "predictions.jsonl"]
    assert store.iter_cells(tmp_path) == [path]
    # A second writer of the same cell loses the race cleanly: first copy kept, no temporary left.
    assert not store.write_cell(path, cell_files(digest, x=2))
    assert store.read_metrics(path)["x"] == 1
    assert not [p for p in path.parent.iterdir() if p.name.startswith(store.TMP_PREFIX)]


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / "metrics.json").write_text('{"model": "tiny", "acc'), "metrics.json does not parse"),
    (lambda p: (p / "metrics.json").unlink(), "missing metrics.json"),
    (lambda p: (p / "predictions.jsonl").write_text(""), "predictions.jsonl has 0 rows for n_samples=2"),
    (lambda p: (p / "metrics.json").write_text('{"model": "tiny"}'), "metrics.json lacks task"),
    (lambda p: (p / "config.yaml").write_text("a: [1"), "config.yaml does not parse"),
])
def test_a_damaged_cell_is_moved_aside_and_rewritten(tmp_path, damage, reason, caplog):
    """Problem 2: a truncated metrics.json was skipped forever, a folder missing it failed every rerun
    with 'Directory not empty'. Now it is moved to results_dir/damaged/ (named in the log) and the
    cell can be written again."""
    digest = "cd" * 32
    path = store.cell_dir(tmp_path, "tiny", "shapes", "fastv", 9, digest)
    assert store.write_cell(path, cell_files(digest, n=2))
    damage(path)
    assert reason in store.cell_problem(path)
    assert not store.is_finished(path) and store.iter_cells(tmp_path) == []
    assert [p for p, _ in store.unreadable_cells(tmp_path)] == [path]
    with caplog.at_level("WARNING", logger="prunebench.store"):
        assert not store.reusable(path)
    assert not path.exists()
    moved = list((tmp_path / store.DAMAGED).rglob("b9-*"))
    assert len(moved) == 1 and moved[0].parent.name == "fastv"
    assert str(path) in caplog.text and str(moved[0]) in caplog.text and reason in caplog.text
    assert store.write_cell(path, cell_files(digest, n=2)) and store.is_finished(path)


def test_failed_write_leaves_nothing(tmp_path):
    path = store.cell_dir(tmp_path, "tiny", "shapes", "fastv", 9, "cd" * 32)

    with pytest.raises(TypeError):
        store.write_cell(path, {"metrics.json": 123})  # not text: the write fails midway
    assert not path.exists()
    assert list(path.parent.iterdir()) == []


def test_stale_tmp_of_dead_process_is_removed_live_one_kept(tmp_path):
    import socket

    host = socket.gethostname()
    parent = tmp_path / store.CELLS / "tiny" / "shapes" / "fastv"
    parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = parent / f"{store.TMP_PREFIX}b9-abc-{host}-{dead_pid}-deadbeef"
    live = parent / f"{store.TMP_PREFIX}b18-abc-{host}-{os.getpid()}-cafef00d"
    other_host = parent / f"{store.TMP_PREFIX}b4-abc-elsewhere.example-{dead_pid}-0badf00d"
    for p in (stale, live, other_host):
        p.mkdir()
        (p / "metrics.json").write_text("{}")
    assert store.clean_stale_tmp(tmp_path) == [stale]
    assert live.exists() and other_host.exists() and not stale.exists()
    assert store.iter_cells(tmp_path) == []  # temporaries never count as finished cells


def test_unwritable_results_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"results_dir=.*a_file/sub.* is not writable"):
        store.check_writable(blocker / "sub")


def test_atomic_write_text_replaces(tmp_path):
    p = tmp_path / "leaderboard.csv"
    store.atomic_write_text(p, "a\n")
    store.atomic_write_text(p, "b\n")
    assert p.read_text() == "b\n"
    assert [x.name for x in tmp_path.iterdir()] == ["leaderboard.csv"]
