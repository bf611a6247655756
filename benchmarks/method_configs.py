"""Method configs from the pruner registry: a new ``pruners/<name>.py`` is ``method=<name>`` with no other step.

``register_method_configs()`` (run when ``benchmarks.run`` or ``benchmarks.tune`` is imported, before
Hydra composes) stores ``{name, params: <the class's defaults>}`` in Hydra's ConfigStore as
``method/<name>`` for every registered pruner that has no ``conf/method/<name>.yaml``. YAML files in
``conf/method/`` are kept only where they add something: a tuned or published variant
(``vflowopt_tuned_eq36.yaml``), or a file you write to pin other parameters.

    python -m benchmarks.method_configs list            # registered methods, stages, source of config
    python -m benchmarks.method_configs show fastv      # the config `method=fastv` composes, as YAML
    python -m benchmarks.method_configs write fastv --as fastv_l3   # a YAML to edit into a variant
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

CONF_METHOD = Path(__file__).resolve().parent.parent / "conf" / "method"


def method_node(name: str) -> dict:
    """The config of registered pruner ``name``: its name and every parameter with its default."""
    from pruners import get_pruner_class

    return {"name": name, "params": dict(get_pruner_class(name).defaults)}


def method_yaml(name: str) -> str:
    """``method_node(name)`` as YAML, headed by the first paragraph of the method's module docstring."""
    from pruners import get_pruner_class

    cls = get_pruner_class(name)
    doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or name).strip().split("\n\n")[0]
    header = "".join(f"# {line.strip()}\n" for line in doc.splitlines())
    stages = ", ".join(cls.stages) or "none"
    body = OmegaConf.to_yaml(OmegaConf.create(method_node(name)))
    return f"{header}# Stages: {stages}. Override a parameter with method.params.<key>=<value>.\n{body}"


def register_method_configs(conf_dir: Path = CONF_METHOD) -> list[str]:
    """Store ``method/<name>`` in Hydra's ConfigStore for every registered pruner without a YAML file.

    Idempotent: a pruner registered later (a test's, a plugin's) is added by calling it again.
    Returns the names stored.
    """
    from hydra.core.config_store import ConfigStore

    from pruners import available_pruners

    store = ConfigStore.instance()
    stored = []
    for name in available_pruners():
        if not (conf_dir / f"{name}.yaml").exists():
            store.store(group="method", name=name, node=method_node(name))
            stored.append(name)
    return stored


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.method_configs",
        description="Method configs from the pruner registry (Hydra ConfigStore). " + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="every registered method, its stages, and where its config comes from")
    show = sub.add_parser("show", help="print the config `method=NAME` composes, as YAML")
    show.add_argument("name")
    write = sub.add_parser("write", help="write conf/method/<AS>.yaml from a method's defaults, to edit")
    write.add_argument("name")
    write.add_argument("--as", dest="as_name", default=None, help="file name (default: NAME; a variant name "
                       "keeps the registry's config of NAME untouched)")
    write.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)

    from pruners import available_pruners, get_pruner_class

    if args.cmd == "list":
        for name in available_pruners():
            src = f"conf/method/{name}.yaml" if (CONF_METHOD / f"{name}.yaml").exists() else "registry"
            print(f"{name:16s} {', '.join(get_pruner_class(name).stages) or '-':16s} {src}")
        extra = sorted(p.stem for p in CONF_METHOD.glob("*.yaml") if p.stem not in available_pruners())
        for name in extra:
            print(f"{name:16s} {'(variant)':16s} conf/method/{name}.yaml")
        return 0
    try:
        get_pruner_class(args.name)
    except ValueError as e:
        parser.error(str(e))
    if args.cmd == "show":
        path = CONF_METHOD / f"{args.name}.yaml"
        print(path.read_text() if path.exists() else method_yaml(args.name), end="")
        return 0
    path = CONF_METHOD / f"{args.as_name or args.name}.yaml"
    if path.exists() and not args.force:
        parser.error(f"{path} exists; pass --force to overwrite it")
    path.write_text(method_yaml(args.name))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
