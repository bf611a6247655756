"""Train the embedded default model: ``python -m benchmarks.embedded.train [--out runs/embedded] ...``.

Two stages (why: docs/embedded-model.md; a naive end-to-end recipe stays at the answer prior for
CPU-hours):

1. Vision stage: the CLIP ViT alone, with dense per-patch targets on hidden_states[-2] (exactly what
   LLaVA feeds its projector: colour / shape / digit class, object centre, cell row / column), heads on
   the CLS token of that layer (presence of every colour x shape and digit, per-colour counts), and,
   from ``--contrastive-start`` on, a CLIP contrastive loss (weight 0.3) between the pooled ViT output and
   a CLIP text tower reading generated captions. Small batches: optimizer steps are what count.
2. LLM stage: tower frozen; projector + Llama trained on sequences packing several question/answer
   turns about one image (loss on every answer and its end token), with a bridge curriculum
   (position-addressed questions about every attribute first, then content-addressed ones mixed in),
   caption turns (``--caption-prob``), family weights (``--family-weights``) and a grounding loss on
   one LLM layer's attention (``--attn-aux-*``; without it the LLM stayed at a pooled-statistics
   plateau, see the model card), plus an optional token-dropout curriculum (``--bg-ramp-*``). Validated every ``--eval-every`` steps on the 'val' split (never the eval split); the best
   checkpoint by (min family accuracy + overall accuracy) is exported as a HF folder to ``<out>/best``.

Seeded, single-threaded by default (2 shared cores: two 1-thread processes beat one 2-thread one),
logs to ``<out>/train.log`` and ``<out>/curve.jsonl``, checkpoints every ``--ckpt-every`` steps and
resumes from the last checkpoint when re-run with the same ``--out``. The defaults are the first
9,500 stage-2 steps of the shipped lineage condensed into one session (grounding on all question
turns and 6 turns for the first 4,250 steps, family weights from step 5,250, grounding off from step
6,750). The shipped checkpoint continued from there in further sessions (single-head grounding, a
vision stage continued with ``--count-map`` / ``--shapes-map`` / ``--presence-map`` via ``--s1-init``,
``--bg-drop-prob``, a count / exists phase, a mixed phase); its card lists every session's arguments,
in order. ``make train-embedded`` runs `benchmarks.embedded.recipe`, which chains such sessions as the
``--phase``s of one run. A resumed stage 2 keeps its elapsed time, so raise ``--stage2-minutes`` to
train further.

Modules: ``common`` (constants, the learning-rate schedule, the log), ``stage1`` (the vision stage),
``data`` (stage-2 token ids, packed turns, dropout, grounding targets), ``losses`` (the grounding
losses), ``stage2`` (the LLM stage, validation, growing the LLM), ``cli`` (arguments and ``main``).
The names below are re-exported so ``from benchmarks.embedded import train as T; T.stage2_batch``
keeps working.
"""

from __future__ import annotations

from benchmarks.embedded.train.cli import main, parse_args
from benchmarks.embedded.train.common import (
    BRIDGE_WEIGHTS,
    MAX_CLS_COUNT,
    MIXED_WEIGHTS,
    N_COMBOS,
    log,
    lr_at,
)
from benchmarks.embedded.train.data import (
    CAPTION_QUESTION,
    SINK,
    Encoder,
    bg_keep_fraction,
    foreground_patches,
    grounded,
    head_targets,
    llm_caption,
    pad_batch,
    stage2_batch,
    stage2_inputs,
)
from benchmarks.embedded.train.losses import grounding_loss, head_grounding_loss
from benchmarks.embedded.train.stage1 import (
    Stage1,
    VisionHeads,
    patch_targets,
    run_stage1,
    stage1_batch,
    stage1_loss,
)
from benchmarks.embedded.train.stage2 import GROW_ZERO_COLUMNS, grow_llm, run_stage2, validate

__all__ = [
    "BRIDGE_WEIGHTS", "CAPTION_QUESTION", "GROW_ZERO_COLUMNS", "MAX_CLS_COUNT", "MIXED_WEIGHTS", "N_COMBOS", "SINK",
    "Encoder", "Stage1", "VisionHeads", "bg_keep_fraction", "foreground_patches", "grounded", "grounding_loss",
    "grow_llm", "head_grounding_loss", "head_targets", "llm_caption", "log", "lr_at", "main", "pad_batch",
    "parse_args", "patch_targets", "run_stage1", "run_stage2", "stage1_batch", "stage1_loss", "stage2_batch",
    "stage2_inputs", "validate",
]
