"""The locked environment: ``requirements.lock`` is every distribution of the set-up, exact version and hash.

A benchmark's numbers must be reproducible months later, so its environment must be too: an unpinned
transitive dependency can change under a fresh clone overnight (filelock 4.3 removed a module that
lmms-eval 0.7.3 imports). ``make setup`` therefore installs only ``requirements.lock`` (pip's
hash-checking mode, ``--no-deps``), then prunebench itself with ``--no-deps``.

``make lock`` re-resolves ``pyproject.toml`` with every extra in a scratch venv, runs the fast tests
there and rewrites the lock from pip's installation report (``pip install --report``):

    python -m benchmarks.lockfile write REPORT.json --out requirements.lock --extras test,lmms
    python -m benchmarks.lockfile check [--lock requirements.lock]   # does this interpreter match?

``tests/test_environment.py`` checks that the running environment matches the lock and names the
package that drifted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
#: The project itself is installed from the working tree (``pip install --no-deps -e .``), not locked.
PROJECT = "prunebench"
_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")


def normalise(name: str) -> str:
    """PEP 503 name normalisation: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_path() -> Path:
    """The lock in force: ``$PRUNEBENCH_LOCK`` (``make lock`` tests a new one) or ``requirements.lock``."""
    return Path(os.environ.get("PRUNEBENCH_LOCK") or LOCK)


def lock_digest(path: Path | str | None = None) -> str | None:
    """sha256 (16 hex) of the lock file's bytes, or None when there is none (an installed copy of
    prunebench without its repository): part of every result cell's identity, so an upgrade made
    with `make lock` never reuses cells computed in the old environment."""
    path = Path(path) if path is not None else lock_path()
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def read_lock(path: Path | str) -> dict[str, str]:
    """``{normalised name: version}`` of every ``name==version`` line of a lock file."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"{path}:{n}: expected 'name==version --hash=sha256:...', got {raw!r}")
        pins[normalise(m.group(1))] = m.group(2)
    return pins


def installed() -> dict[str, str]:
    """``{normalised name: version}`` of every distribution the running interpreter can import."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalise(name), dist.version)
    return found


@dataclass(frozen=True)
class Drift:
    """One way the environment differs from the lock."""

    name: str
    locked: str | None  # None: installed but not in the lock
    found: str | None  # None: in the lock but not installed

    def __str__(self) -> str:
        if self.found is None:
            return f"{self.name}: locked {self.locked}, not installed"
        if self.locked is None:
            return f"{self.name}: {self.found} installed, not in the lock"
        return f"{self.name}: locked {self.locked}, installed {self.found}"


def drift(lock: dict[str, str], env: dict[str, str]) -> list[Drift]:
    """Every package whose presence or version differs between ``lock`` and ``env`` (sorted by name)."""
    out = []
    for name in sorted((set(lock) | set(env)) - {PROJECT}):
        if lock.get(name) != env.get(name):
            out.append(Drift(name, lock.get(name), env.get(name)))
    return out


def _sha256(report_item: dict) -> str:
    info = report_item.get("download_info") or {}
    hashes = (info.get("archive_info") or {}).get("hashes") or {}
    if "sha256" in hashes:
        return hashes["sha256"]
    url = info.get("url", "")
    if url.startswith("file://") and Path(url[7:]).is_file():
        return hashlib.sha256(Path(url[7:]).read_bytes()).hexdigest()
    name = report_item["metadata"]["name"]
    raise ValueError(f"pip's report has no sha256 for {name} ({url or 'no download url'}); cannot lock it")


def lock_text(report: dict, extras: str) -> str:
    """The lock file for a ``pip install --report`` of the project with ``extras``."""
    pins = {}
    for item in report["install"]:
        name = normalise(item["metadata"]["name"])
        if name != PROJECT:
            pins[name] = f"{name}=={item['metadata']['version']} --hash=sha256:{_sha256(item)}"
    env = report.get("environment", {})
    header = [
        "# prunebench's locked environment: every distribution, exact version and sha256.",
        "# Written by `make lock` (python -m benchmarks.lockfile write); do not edit by hand: change",
        "# pyproject.toml, run `make lock`, commit both. `make setup` installs it with",
        "# `pip install --require-hashes --no-deps -r requirements.lock`, then prunebench with --no-deps.",
        f"# Extras: {extras}",
        f"# Made for: Python {env.get('python_full_version', platform.python_version())}, "
        f"{env.get('sys_platform', sys.platform)} {env.get('platform_machine', platform.machine())}"
        f" (torch's wheels here are CUDA 13 builds; they run on the CPU too)",
        f"# Resolved: {datetime.now(timezone.utc).strftime('%Y-%m-%d')}",
    ]
    return "\n".join(header + [pins[n] for n in sorted(pins)]) + "\n"


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lockfile", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the lock from a `pip install --report` JSON file")
    w.add_argument("report", type=Path)
    w.add_argument("--out", type=Path, default=LOCK)
    w.add_argument("--extras", default="", help="the extras that were installed (recorded in the header)")
    c = sub.add_parser("check", help="compare this interpreter's distributions with the lock")
    c.add_argument("--lock", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.cmd == "write":
        args.out.write_text(lock_text(json.loads(args.report.read_text()), args.extras))
        print(f"wrote {args.out} ({len(read_lock(args.out))} distributions)")
        return 0
    path = args.lock or lock_path()
    problems = drift(read_lock(path), installed())
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"the environment differs from {path} in {len(problems)} package(s): run `make setup`",
              file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(_main())
