"""Content fingerprints of files and checkpoint folders, with a persistent digest cache.

Part of every result cell's identity (the model's weights, `benchmarks.models` re-exports these) and
read by pruners that store files or schedules for one model (gsearch's ``found_on``, dyvte's router
weights). In ``pruners/`` because it is the lowest layer: every other package may import it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

#: Files of a checkpoint folder that do not change what the model computes (cards, plots, scores).
IGNORED_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf")
IGNORED_NAMES = ("eval_results.json",)
_DIGEST_MEMO: dict[str, str] = {}


def digest_cache_path() -> Path:
    """Where file digests are cached: ``$PRUNEBENCH_CACHE_DIR`` or ``~/.cache/prunebench``."""
    root = os.environ.get("PRUNEBENCH_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prunebench"
    return Path(root) / "file-digests.json"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's full content, cached by (absolute path, size, mtime_ns, inode).

    A 14 GB checkpoint is read once; a copy, a rewrite or a replacement changes the key (new inode
    or mtime) and is hashed again. The one change the cache cannot see is an in-place rewrite that
    keeps the size and restores the mtime (e.g. ``os.utime`` after editing): delete the cache file
    (`digest_cache_path`) after such surgery.
    """
    f = Path(path).resolve()
    st = f.stat()
    key = f"{f}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if key in _DIGEST_MEMO:
        return _DIGEST_MEMO[key]
    cache_file = digest_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    digest = cache.get(key)
    if not isinstance(digest, str):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
        digest = h.hexdigest()
        cache[key] = digest
        try:  # best effort: a read-only home only costs re-hashing next time
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}-{os.getpid()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass
    _DIGEST_MEMO[key] = digest
    return digest


def weights_fingerprint(folder: str | Path) -> str:
    """Content fingerprint of a checkpoint folder: sha256 over every file's relative path and full
    content digest (`file_digest`, cached), subfolders included (e.g. the embedded model's
    ``text_tower/``). Files that do not change what the model computes are left out: cards and
    images (`IGNORED_SUFFIXES`), ``eval_results.json`` and hidden files. Part of every result cell's
    hash, so damaged, retrained or swapped weights under the same model name never reuse stale cells."""
    root = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if (f.suffix.lower() in IGNORED_SUFFIXES or f.name in IGNORED_NAMES
                or any(part.startswith(".") for part in f.relative_to(root).parts)):
            continue
        h.update(f"{rel}:{file_digest(f)}\n".encode())
    return h.hexdigest()[:16]
