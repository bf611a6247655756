"""Keep ``conf/method/`` in step with the pruner registry: one YAML per registered pruner.

``python -m benchmarks.method_configs`` writes ``conf/method/<name>.yaml`` (name + the class's
default parameters + the first paragraph of its module docstring) for every registered pruner that
has none; ``--force`` rewrites them all. ``tests/test_run.py`` checks that the files and the classes
agree, so a new pruner cannot silently miss its config.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

CONF_METHOD = Path(__file__).resolve().parent.parent / "conf" / "method"


def method_yaml(name: str) -> str:
    """The YAML text of ``conf/method/<name>.yaml`` from the registered class."""
    from pruners import get_pruner_class

    cls = get_pruner_class(name)
    doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or name).strip().split("\n\n")[0]
    header = "".join(f"# {line.strip()}\n" for line in doc.splitlines())
    stages = ", ".join(cls.stages) or "none"
    body = OmegaConf.to_yaml(OmegaConf.create({"name": name, "params": dict(cls.defaults)}))
    return f"{header}# Stages: {stages}. Override a parameter with method.params.<key>=<value>.\n{body}"


def write_missing(force: bool = False, conf_dir: Path = CONF_METHOD) -> list[Path]:
    """Write the config of every registered pruner lacking one (all of them with ``force``)."""
    from pruners import available_pruners

    written = []
    for name in available_pruners():
        path = conf_dir / f"{name}.yaml"
        if force or not path.exists():
            path.write_text(method_yaml(name))
            written.append(path)
    return written


if __name__ == "__main__":
    for p in write_missing(force="--force" in sys.argv[1:]):
        print(f"wrote {p}")
