"""Run the embedded model's training recipe: ``python -m benchmarks.embedded.recipe [--out runs/embedded]``
(``make train-embedded``).

A recipe (default: ``recipe.yaml`` next to this module) is an ordered list of phases. Each phase is one
`benchmarks.embedded.train` run in the same ``--out`` folder with the recipe's ``common`` arguments plus
its own, tagged ``--phase <name>``: the vision phase trains stage 1, and each stage-2 phase continues the
previous phase's checkpoint with a fresh optimizer (``benchmarks.embedded.train``'s ``--phase``). All phases log into one
``train.log`` / ``curve.jsonl``, so ``python -m benchmarks.embedded.card --run <out>`` describes the whole
run, a session per phase.

Resumable: a finished phase is recorded in ``<out>/recipe_state.json`` and skipped when the recipe is
run again; an interrupted phase resumes from its last checkpoint. ``--threads`` and ``--seed`` override
the recipe (and are part of the command a resumed run must repeat).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from benchmarks.embedded import train

DEFAULT_RECIPE = Path(__file__).with_name("recipe.yaml")


def load_recipe(path: str | Path) -> list[tuple[str, dict]]:
    """The recipe's phases as (name, training arguments), ``common`` merged under each phase's own."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameter '--recipe': no recipe file at {path}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    phases = cfg.get("phases") or []
    if not phases:
        raise ValueError(f"recipe {path} has no phases")
    names = [p.get("name") for p in phases]
    if None in names or len(set(names)) != len(names):
        raise ValueError(f"recipe {path}: every phase needs a unique 'name', got {names}")
    return [(p["name"], {**cfg.get("common", {}), **(p.get("args") or {})}) for p in phases]


def phase_argv(name: str, args: dict, out: Path) -> list[str]:
    """The training argv for one phase: ``--key value`` per argument, ``--key`` for a true flag."""
    argv = ["--out", str(out), "--phase", name]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    try:
        train.parse_args(argv)  # unknown or malformed arguments fail here, before any phase runs
    except SystemExit as e:  # argparse has printed which argument it rejected
        raise ValueError(f"recipe phase {name!r}: the training CLI rejects its arguments {argv[4:]}") from e
    return argv


def run_recipe(recipe: str | Path, out: str | Path, overrides: dict | None = None) -> list[str]:
    """Run every unfinished phase of ``recipe`` in order into ``out``; returns the names of the phases run."""
    out = Path(out)
    phases = [(name, phase_argv(name, {**args, **(overrides or {})}, out)) for name, args in load_recipe(recipe)]
    state_file = out / "recipe_state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if Path(state["recipe"]).resolve() != Path(recipe).resolve():
            raise ValueError(f"parameter '--out': {out} holds a run of recipe {state['recipe']}, not {recipe}; "
                             "choose another --out")
        done = state["done"]
    elif (out / "train.log").exists():
        raise ValueError(f"parameter '--out': {out} holds a training run not started by a recipe; choose another --out")
    else:
        done = []
    ran = []
    for name, argv in phases:
        if name in done:
            continue
        train.main(argv)
        done.append(name)
        ran.append(name)
        out.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"recipe": str(recipe), "done": done}, indent=1) + "\n")
    return ran


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    ap.add_argument("--out", default="runs/embedded", help="run folder of every phase")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the training CLI's)")
    ap.add_argument("--seed", type=int, default=None, help="seed (default: the recipe's)")
    a = ap.parse_args(argv)
    overrides = {k: v for k, v in (("threads", a.threads), ("seed", a.seed)) if v is not None}
    run_recipe(a.recipe, a.out, overrides)


if __name__ == "__main__":
    main()
