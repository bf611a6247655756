"""The command line: ``python -m benchmarks.embedded.train`` (arguments, the log file, both stages)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from benchmarks.embedded import model as M
from benchmarks.embedded.train.common import log
from benchmarks.embedded.train.stage1 import run_stage1
from benchmarks.embedded.train.stage2 import run_stage2


def parse_args(argv=None):
    # the package docstring is the help text (the recipe, the stages)
    from benchmarks.embedded import train as package

    ap = argparse.ArgumentParser(prog="python -m benchmarks.embedded.train", description=package.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/embedded", help="run folder (logs, checkpoints, best export)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stage1-steps", type=int, default=5500)
    ap.add_argument("--contrastive-start", type=int, default=4000)
    ap.add_argument("--s1-batch", type=int, default=16)
    ap.add_argument("--s1-lr", type=float, default=1e-3)
    ap.add_argument("--stage2-steps", type=int, default=20000)
    ap.add_argument("--stage2-minutes", type=float, default=110.0, help="wall-clock budget of stage 2 (0 = none)")
    ap.add_argument("--bridge-steps", type=int, default=1500)
    ap.add_argument("--s2-batch", type=int, default=8)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--family-weights",
                    default='{"count": 8, "exists": 8, "relation": 8, "where_row": 2, "where_col": 2}',
                    help="JSON overrides of the mixed-phase family weights (base: 3 per eval family, 1 otherwise; '{}' keeps the base)")
    ap.add_argument("--s2-lr", type=float, default=2e-3)
    ap.add_argument("--bg-ramp-start", type=int, default=0,
                    help="token-dropout curriculum: only foreground patches reach the LLM before this step")
    ap.add_argument("--bg-ramp-end", type=int, default=0,
                    help="... and all patches from this step on, linear in between (0 = curriculum off)")
    ap.add_argument("--bg-drop-prob", type=float, default=0.0,
                    help="per image, the probability of keeping only the foreground and a random 5-100%% of the "
                         "background, at compact positions (as pre-LLM pruning feeds the LLM)")
    ap.add_argument("--caption-prob", type=float, default=0.5,
                    help="probability that an image's turns include a caption turn ('what objects are there ?')")
    ap.add_argument("--attn-aux-weight", type=float, default=0.5,
                    help="weight of a grounding loss on one LLM layer's attention (answer position -> relevant patches)")
    ap.add_argument("--attn-aux-layer", type=int, default=4,
                    help="LLM layer of the grounding loss (4: no default pruner scores there on 8 layers)")
    ap.add_argument("--grounding-targets", choices=["all", "evidence"], default="evidence",
                    help="turns that get the grounding loss: all with relevant patches, or only positive evidence")
    ap.add_argument("--grounding-mode", choices=["mass", "heads", "heads_colour"], default="mass",
                    help="'mass': -log head-mean attention mass on the relevant patches (evidence turns only, "
                         "see --grounding-targets); 'heads': per-head target distributions with a sink "
                         "(see head_targets); 'heads_colour': 'heads' with existence looked up by colour")
    ap.add_argument("--attn-aux-steps", type=int, default=6750, help="the grounding loss is off from this step on")
    ap.add_argument("--conj", action="store_true", help="add the conjunctive per-patch targets in stage 1")
    ap.add_argument("--count-map", action="store_true",
                    help="add the per-patch 'objects of my colour' target in stage 1 (see VisionHeads)")
    ap.add_argument("--shapes-map", action="store_true",
                    help="add the per-patch 'shapes in my colour' target in stage 1 (see VisionHeads)")
    ap.add_argument("--llm-heads", type=int, default=M.LLM_HEADS, help="LLM attention heads (dimension 32 each)")
    ap.add_argument("--llm-mlp", type=int, default=M.LLM_MLP, help="LLM MLP width")
    ap.add_argument("--grow-from", default=None,
                    help="start stage 2 from this stage2.pt of a smaller LLM, grown function-preserving to "
                         "--llm-heads / --llm-mlp (when the run has no stage-2 checkpoint yet)")
    ap.add_argument("--presence-map", action="store_true",
                    help="stage 1: every object patch also encodes the image's colour x shape presence (continue a "
                         "finished vision stage with --s1-init)")
    ap.add_argument("--s1-init", default=None, help="initialise stage 1 from this stage-1 checkpoint (weights only)")
    ap.add_argument("--s2-init", choices=["default", "fanin"], default="default",
                    help="LLM attention projection init: Llama default (std 0.02) or std 1/sqrt(fan_in)")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--val-n", type=int, default=300)
    ap.add_argument("--patience", type=int, default=0, help="stop after this many evals without improvement (0 = never)")
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--restart-stage2", action="store_true", help="ignore an existing stage-2 checkpoint")
    ap.add_argument("--only-stage1", action="store_true")
    ap.add_argument("--phase", default=None,
                    help="name of this training phase (benchmarks.embedded.recipe): a stage-2 checkpoint written "
                         "by another phase is continued with a fresh optimizer, warm-up and cosine")
    return ap.parse_args(argv)


def _log_to(out: Path) -> None:
    """Send this module's log to ``<out>/train.log`` (the card reads each session's arguments from it) and to
    stderr, whatever logging the caller configured; a later call for another folder moves the file."""
    fmt = logging.Formatter("%(asctime)s %(message)s")
    path = str((out / "train.log").resolve())
    for h in [h for h in log.handlers if isinstance(h, logging.FileHandler) and h.baseFilename != path]:
        log.removeHandler(h)
        h.close()
    if not any(isinstance(h, logging.FileHandler) for h in log.handlers):
        fh = logging.FileHandler(path)
        fh.setFormatter(fmt)
        log.addHandler(fh)
    if not any(type(h) is logging.StreamHandler for h in log.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        log.addHandler(sh)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"parameter '--threads' must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _log_to(out)
    log.info("args: %s", json.dumps(vars(args)))
    with open(out / "curve.jsonl", "a") as curve:
        s1 = run_stage1(args, out, curve)
        if not args.only_stage1:
            run_stage2(args, out, s1, curve)
