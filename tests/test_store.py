"""Result cells: config hashing, atomic writes, skip-when-finished, stale temporary directories."""

from __future__ import annotations

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


def test_write_cell_is_complete_or_absent(tmp_path):
    path = store.cell_dir(tmp_path, "tiny", "shapes", "fastv", 9, "ab" * 32)
    assert not store.is_finished(path)
    assert store.write_cell(path, {"config.yaml": "a: 1\n", "predictions.jsonl": "{}\n", "metrics.json": "{\"x\": 1}"})
    assert store.is_finished(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "metrics.json", "predictions.jsonl"]
    assert store.iter_cells(tmp_path) == [path]
    # A second writer of the same cell loses the race cleanly: first copy kept, no temporary left.
    assert not store.write_cell(path, {"metrics.json": "{\"x\": 2}"})
    assert store.read_metrics(path) == {"x": 1}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(store.TMP_PREFIX)]


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
