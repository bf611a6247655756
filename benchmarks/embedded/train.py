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
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionModel

from benchmarks.embedded import model as M
from benchmarks.tasks.shapes import eval_keys, sample_from_rng
from benchmarks.tasks.shapes import generator as G

log = logging.getLogger("embedded.train")

N_COMBOS = len(G.COLOUR_NAMES) * len(G.SHAPES)  # 18 colour x shape presence bits
MAX_CLS_COUNT = 4  # CLS count head classes 0..4 (4 = "4 or more")

# Family weights of the LLM stage: bridge phase, then the mixed phase.
BRIDGE_WEIGHTS = {
    "shape": 3, "pos_colour": 3, "pos_occupied": 1, "pos_digit": 2, "where_row": 1, "where_col": 1,
    "colour": 1, "count": 1, "exists": 1, "digit": 1, "relation": 1,
}
MIXED_WEIGHTS = {f: (3 if f in G.EVAL_FAMILIES else 1) for f in G.ALL_FAMILIES}


# ------------------------------------------------------------------------------------------ stage 1


class VisionHeads(nn.Module):
    """Linear probes on ViT hidden_states[-2]: per patch and on CLS."""

    def __init__(self, d: int, conj: bool = False, count_map: bool = False, shapes_map: bool = False,
                 presence_map: bool = False):
        super().__init__()
        self.colour = nn.Linear(d, 1 + len(G.COLOUR_NAMES))
        self.shape = nn.Linear(d, 1 + len(G.SHAPES))
        self.digit = nn.Linear(d, 11)
        self.centre = nn.Linear(d, 1)
        self.row = nn.Linear(d, G.GRID)
        self.col = nn.Linear(d, G.GRID)
        self.presence = nn.Linear(d, N_COMBOS + 10)
        self.counts = nn.Linear(d, len(G.COLOUR_NAMES) * (MAX_CLS_COUNT + 1))
        if count_map:
            # "count map" recipe: every object patch also encodes how many objects of its colour the image
            # holds (0 = background), global context in local tokens as real ViT patch tokens carry it.
            self.colour_count = nn.Linear(d, 1 + G.MAX_OBJECTS)
        if shapes_map:
            # "shapes map" recipe: every object patch also encodes which shapes occur in its colour anywhere
            # in the image (multi-label), so an existence question can be answered from any patch of the
            # named colour (and "no colour patch at all" still means the lookup must fail).
            self.colour_shapes = nn.Linear(d, len(G.SHAPES))
        if presence_map:
            # "presence map" recipe: every object patch also encodes which colour x shape combinations the
            # whole image holds (multi-label), so absence ("is there a red circle ?" -> no, "how many red
            # objects ?" -> zero) can be read from any object patch, as global context in local tokens.
            self.presence_map = nn.Linear(d, N_COMBOS)
        if not conj:
            return
        # Conjunctive per-patch targets ("conj" recipe): each object patch linearly encodes its
        # colour x shape, colour x shape x column / row, shape x cell and colour x cell, and object-centre
        # patches their colour, so that pooled (attention-averaged) visual tokens already carry bound
        # attributes and positions.
        nc, ns, nk = len(G.COLOUR_NAMES), len(G.SHAPES), G.GRID * G.GRID
        self.combo = nn.Linear(d, 1 + nc * ns)
        self.combo_col = nn.Linear(d, 1 + nc * ns * G.GRID)
        self.combo_row = nn.Linear(d, 1 + nc * ns * G.GRID)
        self.shape_cell = nn.Linear(d, 1 + ns * nk)
        self.colour_cell = nn.Linear(d, 1 + nc * nk)
        self.centre_colour = nn.Linear(d, 1 + nc)


def patch_targets(scene: dict) -> dict[str, np.ndarray]:
    """Per-patch (144) class targets of a scene plus CLS targets.

    A patch takes the label of the item covering the largest fraction of it if that fraction >= 0.2.
    """
    lm = G.label_map(scene)  # [192, 192]
    g, p = M.GRID, M.PATCH_SIZE
    items = [(i + 1, o) for i, o in enumerate(scene["objects"])]
    best = np.zeros((g, g))
    owner = np.zeros((g, g), dtype=np.int64)  # 0 bg, i+1 object, 255 digit
    for label in [i for i, _ in items] + ([255] if scene["digit"] is not None else []):
        frac = (lm == label).reshape(g, p, g, p).mean(axis=(1, 3))  # [12, 12]
        take = (frac >= 0.2) & (frac > best)
        owner[take], best[take] = label, frac[take]
    colour = np.zeros((g, g), dtype=np.int64)
    shape = np.zeros((g, g), dtype=np.int64)
    digit = np.zeros((g, g), dtype=np.int64)
    centre = np.zeros((g, g), dtype=np.float32)
    for i, o in items:
        colour[owner == i] = 1 + G.COLOUR_NAMES.index(o["colour"])
        shape[owner == i] = 1 + G.SHAPES.index(o["shape"])
        centre[o["cy"] // p, o["cx"] // p] = 1
    presence = np.zeros(N_COMBOS + 10, dtype=np.float32)
    counts = np.zeros(len(G.COLOUR_NAMES), dtype=np.int64)
    for o in scene["objects"]:
        ci = G.COLOUR_NAMES.index(o["colour"])
        presence[ci * len(G.SHAPES) + G.SHAPES.index(o["shape"])] = 1
        counts[ci] += 1
    if scene["digit"] is not None:
        d = scene["digit"]
        digit[owner == 255] = 1 + d["value"]
        centre[d["cy"] // p, d["cx"] // p] = 1
        presence[N_COMBOS + d["value"]] = 1
    rows = np.repeat(np.arange(g) * p // G.CELL, g).reshape(g, g)  # cell row of each patch
    ns = len(G.SHAPES)
    combo = np.zeros((g, g), dtype=np.int64)
    combo_col = np.zeros((g, g), dtype=np.int64)
    combo_row = np.zeros((g, g), dtype=np.int64)
    shape_cell = np.zeros((g, g), dtype=np.int64)
    colour_cell = np.zeros((g, g), dtype=np.int64)
    centre_colour = np.zeros((g, g), dtype=np.int64)
    for i, o in items:
        ci, si = G.COLOUR_NAMES.index(o["colour"]), G.SHAPES.index(o["shape"])
        cell = o["row"] * G.GRID + o["col"]
        k = ci * ns + si
        combo[owner == i] = 1 + k
        combo_col[owner == i] = 1 + k * G.GRID + o["col"]
        combo_row[owner == i] = 1 + k * G.GRID + o["row"]
        shape_cell[owner == i] = 1 + si * G.GRID * G.GRID + cell
        colour_cell[owner == i] = 1 + ci * G.GRID * G.GRID + cell
        centre_colour[o["cy"] // p, o["cx"] // p] = 1 + ci
    n_colour = {c: sum(o["colour"] == c for o in scene["objects"]) for c in G.COLOUR_NAMES}
    colour_count = np.zeros((g, g), dtype=np.int64)
    colour_shapes = np.zeros((g, g, len(G.SHAPES)), dtype=np.float32)
    for i, o in items:
        colour_count[owner == i] = n_colour[o["colour"]]
        for o2 in scene["objects"]:
            if o2["colour"] == o["colour"]:
                colour_shapes[owner == i, G.SHAPES.index(o2["shape"])] = 1.0
    presence_map = np.zeros((g, g, N_COMBOS), dtype=np.float32)
    presence_map[colour > 0] = presence[:N_COMBOS]  # object patches (not the digit)
    extra = {"colour_count": colour_count, "combo": combo, "combo_col": combo_col, "combo_row": combo_row, "shape_cell": shape_cell,
            "colour_cell": colour_cell, "centre_colour": centre_colour}
    return {
        "colour": colour.reshape(-1), "shape": shape.reshape(-1), "digit": digit.reshape(-1),
        "centre": centre.reshape(-1), "row": rows.reshape(-1), "col": rows.T.reshape(-1),
        "presence": presence, "counts": np.minimum(counts, MAX_CLS_COUNT),
        **{k: v.reshape(-1) for k, v in extra.items()},
        "colour_shapes": colour_shapes.reshape(g * g, len(G.SHAPES)),
        "presence_map": presence_map.reshape(g * g, N_COMBOS),
    }


class Stage1:
    """Vision tower + heads + text tower + visual projection, and their optimizer."""

    def __init__(self, args):
        torch.manual_seed(args.seed)
        self.vision = CLIPVisionModel(M.vision_config())
        self.text = M.build_text_tower(args.seed + 1)
        d = self.vision.config.hidden_size
        self.heads = VisionHeads(d, conj=args.conj, count_map=args.count_map, shapes_map=args.shapes_map,
                                 presence_map=args.presence_map)
        self.visual_projection = nn.Linear(d, self.text.config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.modules = nn.ModuleDict(
            {"vision": self.vision, "text": self.text, "heads": self.heads, "vproj": self.visual_projection}
        )
        params = list(self.modules.parameters()) + [self.logit_scale]
        self.opt = torch.optim.AdamW(params, lr=args.s1_lr, weight_decay=0.01)
        self.text_tok = M.make_tokenizer(padding_side="right")
        self.step = 0
        self.conj = args.conj
        self.count_map = args.count_map
        self.shapes_map = args.shapes_map
        self.presence_map = args.presence_map

    def state(self) -> dict:
        return {"modules": self.modules.state_dict(), "logit_scale": self.logit_scale.data,
                "opt": self.opt.state_dict(), "step": self.step}

    def load(self, st: dict) -> None:
        self.modules.load_state_dict(st["modules"])
        self.logit_scale.data.copy_(st["logit_scale"])
        self.opt.load_state_dict(st["opt"])
        self.step = st["step"]


_EVAL_SCENES: set | None = None


def stage1_batch(seed: int, step: int, batch: int):
    """Scenes of the vision stage (deterministic in (seed, step)); eval-split scenes are skipped."""
    global _EVAL_SCENES
    if _EVAL_SCENES is None:
        _EVAL_SCENES = {k[2] for k in eval_keys()}
    scenes = []
    j = 0
    while len(scenes) < batch:
        rng = np.random.default_rng([G.DOMAIN_TRAIN, seed, 1, step, j])
        j += 1
        sc = G.random_scene(rng)
        if G.scene_key(sc) not in _EVAL_SCENES:
            scenes.append(sc)
    return scenes


def stage1_loss(s1: Stage1, scenes: list[dict], contrastive: bool) -> tuple[torch.Tensor, dict]:
    imgs = [G.render(sc) for sc in scenes]
    tg = [patch_targets(sc) for sc in scenes]
    T = {k: torch.from_numpy(np.stack([t[k] for t in tg])) for k in tg[0]}
    out = M.vision_hidden(s1.vision, M.pixel_values(imgs))
    h = out.hidden_states[-2]  # [B, 145, D]
    cls, pt = h[:, 0], h[:, 1:]  # [B, D], [B, 144, D]
    H = s1.heads
    w_c = torch.tensor([1.0] + [3.0] * len(G.COLOUR_NAMES))
    w_s = torch.tensor([1.0] + [3.0] * len(G.SHAPES))
    w_d = torch.tensor([1.0] + [3.0] * 10)
    losses = {
        "colour": F.cross_entropy(H.colour(pt).flatten(0, 1), T["colour"].flatten(), weight=w_c),
        "shape": F.cross_entropy(H.shape(pt).flatten(0, 1), T["shape"].flatten(), weight=w_s),
        "digit": F.cross_entropy(H.digit(pt).flatten(0, 1), T["digit"].flatten(), weight=w_d),
        "centre": F.binary_cross_entropy_with_logits(
            H.centre(pt).squeeze(-1), T["centre"], pos_weight=torch.tensor(3.0)),
        "pos": 0.2 * (F.cross_entropy(H.row(pt).flatten(0, 1), T["row"].flatten())
                      + F.cross_entropy(H.col(pt).flatten(0, 1), T["col"].flatten())),
        "presence": F.binary_cross_entropy_with_logits(H.presence(cls), T["presence"]),
        "counts": F.cross_entropy(
            H.counts(cls).view(-1, MAX_CLS_COUNT + 1), T["counts"].flatten()),  # [B*6, 5]
    }
    if s1.conj:
        for name in ("combo", "combo_col", "combo_row", "shape_cell", "colour_cell", "centre_colour"):
            head = getattr(H, name)
            w = torch.full((head.out_features,), 3.0)
            w[0] = 1.0  # background / non-centre
            losses[name] = F.cross_entropy(head(pt).flatten(0, 1), T[name].flatten(), weight=w)
    if s1.count_map:
        w = torch.full((H.colour_count.out_features,), 3.0)
        w[0] = 1.0
        losses["colour_count"] = F.cross_entropy(H.colour_count(pt).flatten(0, 1), T["colour_count"].flatten(), weight=w)
    obj = T["colour"] > 0  # [B, 144] object patches: the maps below are defined there only
    if s1.shapes_map:
        losses["colour_shapes"] = F.binary_cross_entropy_with_logits(H.colour_shapes(pt)[obj], T["colour_shapes"][obj])
    if s1.presence_map:
        losses["presence_map"] = F.binary_cross_entropy_with_logits(H.presence_map(pt)[obj], T["presence_map"][obj])
    if contrastive:
        caps = [G.caption(sc) + " " + M.EOS_TOKEN for sc in scenes]
        tb = s1.text_tok(caps, return_tensors="pt", padding=True)
        temb = F.normalize(s1.text(input_ids=tb.input_ids, attention_mask=tb.attention_mask).text_embeds, dim=-1)
        vemb = F.normalize(s1.visual_projection(out.pooler_output), dim=-1)  # pooled = post-LN CLS of last layer
        logits = s1.logit_scale.exp().clamp(max=100) * vemb @ temb.T  # [B, B]
        lab = torch.arange(len(scenes))
        losses["clip"] = 0.3 * 0.5 * (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab))
    with torch.no_grad():
        fg = T["shape"] > 0
        acc = {
            "acc_colour_fg": (H.colour(pt).argmax(-1)[fg] == T["colour"][fg]).float().mean().item(),
            "acc_shape_fg": (H.shape(pt).argmax(-1)[fg] == T["shape"][fg]).float().mean().item(),
        }
        if s1.count_map:
            acc["acc_colour_count_fg"] = (H.colour_count(pt).argmax(-1)[fg] == T["colour_count"][fg]).float().mean().item()
        if s1.shapes_map:
            acc["acc_colour_shapes_fg"] = ((H.colour_shapes(pt)[fg] > 0).float() == T["colour_shapes"][fg]).all(-1).float().mean().item()
        if s1.presence_map:
            acc["acc_presence_map_fg"] = ((H.presence_map(pt)[fg] > 0).float() == T["presence_map"][fg]).all(-1).float().mean().item()
        if s1.conj:
            for name in ("combo_col", "shape_cell", "colour_cell"):
                acc[f"acc_{name}_fg"] = (getattr(H, name)(pt).argmax(-1)[fg] == T[name][fg]).float().mean().item()
        dg = T["digit"] > 0
        if dg.any():
            acc["acc_digit_fg"] = (H.digit(pt).argmax(-1)[dg] == T["digit"][dg]).float().mean().item()
        if contrastive:
            acc["clip_r1"] = (logits.argmax(1) == lab).float().mean().item()
    return sum(losses.values()), {**{k: v.item() for k, v in losses.items()}, **acc}


def lr_at(step: int, base: float, warmup: int, total: int, floor: float = 0.1, progress: float | None = None) -> float:
    """Linear warm-up then cosine decay to ``floor * base`` at ``total`` steps, or at ``progress`` = 1
    when a progress fraction is given (time-budgeted stage 2: the decay follows whichever of steps
    and wall-clock is further along, so a slow shared machine still ends with a decayed rate)."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if progress is not None:
        t = max(t, min(1.0, progress))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def run_stage1(args, out: Path, curve) -> Stage1:
    s1 = Stage1(args)
    done, ck = out / "stage1_final.pt", out / "stage1.pt"
    if done.exists():
        s1.load(torch.load(done, weights_only=False))
        log.info("stage 1 already finished (step %d); loaded %s", s1.step, done)
        return s1
    if ck.exists():
        s1.load(torch.load(ck, weights_only=False))
        log.info("resuming stage 1 from step %d", s1.step)
    elif args.s1_init:
        # Continue a finished vision stage with new heads: weights only, fresh optimizer, step 0.
        st = torch.load(args.s1_init, weights_only=False)
        missing, unexpected = s1.modules.load_state_dict(st["modules"], strict=False)
        s1.logit_scale.data.copy_(st["logit_scale"])
        log.info("stage 1 initialised from %s (new parameters: %s)", args.s1_init, sorted({m.rsplit('.', 1)[0] for m in missing}))
        if unexpected:
            raise ValueError(f"parameter '--s1-init': unexpected keys {unexpected}")
    s1.modules.train()
    t0, agg = time.time(), {}
    while s1.step < args.stage1_steps:
        for gp in s1.opt.param_groups:
            gp["lr"] = lr_at(s1.step, args.s1_lr, 200, args.stage1_steps)
        scenes = stage1_batch(args.seed, s1.step, args.s1_batch)
        loss, stats = stage1_loss(s1, scenes, contrastive=s1.step >= args.contrastive_start)
        s1.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s1.modules.parameters(), 1.0)
        s1.opt.step()
        s1.step += 1
        for k, v in stats.items():
            agg.setdefault(k, []).append(v)
        if s1.step % args.log_every == 0:
            rec = {"stage": 1, "step": s1.step, "time_s": round(time.time() - t0, 1),
                   **{k: round(float(np.mean(v)), 4) for k, v in agg.items()}}
            log.info(json.dumps(rec))
            curve.write(json.dumps(rec) + "\n")
            curve.flush()
            agg = {}
        if s1.step % args.ckpt_every == 0:
            torch.save(s1.state(), ck)
    torch.save(s1.state(), done)
    log.info("stage 1 finished at step %d", s1.step)
    return s1


# ------------------------------------------------------------------------------------------ stage 2


class Encoder:
    """Token ids for prompts and packed turns, identical to LlavaProcessor + PROMPT_TEMPLATE output."""

    def __init__(self):
        self.tok = M.make_tokenizer()
        ids = self.tok.convert_tokens_to_ids
        self.user = ids(["USER", ":"])
        self.assistant = ids(["ASSISTANT", ":"])
        self.image = ids(M.IMAGE_TOKEN)
        self.eos = ids(M.EOS_TOKEN)
        self.pad = self.tok.pad_token_id

    def words(self, text: str) -> list[int]:
        ids = self.tok.convert_tokens_to_ids(text.split())
        if self.tok.unk_token_id in ids:
            raise ValueError(f"out-of-vocabulary word in {text!r}")
        return ids

    def prompt(self, question: str, n_image: int = M.NUM_PATCHES) -> list[int]:
        """Single-turn prompt ids with ``n_image`` image placeholders."""
        return self.user + [self.image] * n_image + self.words(question) + self.assistant

    def packed(self, turns: list[tuple[str, str]], answer_pos: list[int] | None = None) -> tuple[list[int], list[int]]:
        """(ids, targets) of a multi-turn sequence; targets = next-token ids at answer/end positions
        (predicting the token at t+1 from position t), -100 elsewhere. ``answer_pos`` (if given)
        receives each turn's answer-predicting position (its final ':')."""
        ids: list[int] = []
        tgt: list[int] = []
        for t, (q, a) in enumerate(turns):
            seg = self.prompt(q) if t == 0 else self.user + self.words(q) + self.assistant
            ids += seg
            tgt += [-100] * len(seg)
            if answer_pos is not None:
                answer_pos.append(len(ids) - 1)
            ans = self.words(a) + [self.eos]
            tgt[-1] = ans[0]  # the last prompt token predicts the answer word
            ids += ans
            tgt += ans[1:] + [-100]  # the answer word predicts </s>
        return ids, tgt


def pad_batch(seqs: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids and attention mask, padded left or right."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    am = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, L - len(s):], am[i, L - len(s):] = torch.tensor(s), 1
        else:
            ids[i, : len(s)], am[i, : len(s)] = torch.tensor(s), 1
    return ids, am


def llm_caption(scene: dict) -> str:
    """The caption turn's answer: every object in raster order with its size, colour, shape and cell,
    e.g. "large red circle at row one column two , digit seven at row three column one" (LLaVA's
    caption-style supervision: every word after the first needs the image, most need binding)."""
    items = [(o["row"], o["col"], f"{o['size']} {o['colour']} {o['shape']} at {G._pos(o['row'], o['col'])}")
             for o in scene["objects"]]
    d = scene["digit"]
    if d is not None:
        items.append((d["row"], d["col"], f"digit {G.NUMBER_WORDS[d['value']]} at {G._pos(d['row'], d['col'])}"))
    return " , ".join(t for _, _, t in sorted(items))


CAPTION_QUESTION = "what objects are there ?"


def foreground_patches(scene: dict, min_cover: float = 0.05) -> np.ndarray:
    """[144] bool: patches at least ``min_cover`` covered by an object or the digit."""
    g, p = M.GRID, M.PATCH_SIZE
    cover = (G.label_map(scene) > 0).reshape(g, p, g, p).mean(axis=(1, 3))  # [12, 12]
    return (cover >= min_cover).reshape(-1)


def bg_keep_fraction(args, step: int) -> float:
    """Background-patch keep fraction of the token-dropout curriculum: 0 until ``--bg-ramp-start``,
    linear to 1 at ``--bg-ramp-end`` (1 throughout when the curriculum is off)."""
    if args.bg_ramp_end <= 0:
        return 1.0
    if step < args.bg_ramp_start:
        return 0.0
    return min(1.0, (step - args.bg_ramp_start) / max(1, args.bg_ramp_end - args.bg_ramp_start))


def stage2_batch(args, step: int, enc: Encoder, keys: frozenset):
    """Images, scenes and packed turn sequences for one step (deterministic in (seed, step))."""
    weights = BRIDGE_WEIGHTS if step < args.bridge_steps else {**MIXED_WEIGHTS, **json.loads(args.family_weights)}
    fams = list(weights)
    p = np.array([weights[f] for f in fams], dtype=float)
    p /= p.sum()
    images, scenes, seqs, tgts, grounding = [], [], [], [], []
    j = 0
    while len(images) < args.s2_batch:
        rng = np.random.default_rng([G.DOMAIN_TRAIN, args.seed, 2, step, j])
        j += 1
        first = sample_from_rng(rng, fams[int(rng.choice(len(fams), p=p))], "")
        if (first.family, first.question, G.scene_key(first.meta["scene"])) in keys:
            continue
        scene = first.meta["scene"]
        turns = [(first.question, first.answer)]
        infos: list[dict | None] = [first.meta]
        tfams: list[str | None] = [first.family]
        if args.caption_prob > 0 and rng.random() < args.caption_prob:
            at = int(rng.integers(2))
            turns.insert(at, (CAPTION_QUESTION, llm_caption(scene)))
            infos.insert(at, None)
            tfams.insert(at, None)
        for _ in range(4 * args.turns):
            if len(turns) >= args.turns:
                break
            fam = fams[int(rng.choice(len(fams), p=p))]
            q = G.question_about(rng, scene, fam)
            if q is not None and q[0] not in [t[0] for t in turns]:
                turns.append((q[0], q[1]))
                infos.append(q[2])
                tfams.append(fam)
        answer_pos: list[int] = []
        ids, tgt = enc.packed(turns, answer_pos)
        images.append(first.image)
        scenes.append(scene)
        seqs.append(ids)
        tgts.append(tgt)
        # Per question turn, for --attn-aux-weight: (answer-predicting position, answer-relevant patches)
        # in 'mass' mode, (answer-predicting position, per-head targets) in 'heads' mode.
        if args.attn_aux_weight <= 0:
            grounding.append([])
        elif args.grounding_mode in ("heads", "heads_colour"):
            by_colour = args.grounding_mode == "heads_colour"
            grounding.append([(pos, head_targets(scene, fam, info, a, q, by_colour))
                              for pos, info, fam, (q, a) in zip(answer_pos, infos, tfams, turns) if info is not None])
        else:
            grounding.append([(pos, G.relevant_patches(scene, info, (M.GRID, M.GRID)))
                              for pos, info, (_, a) in zip(answer_pos, infos, turns)
                              if info is not None and grounded(args, info, a)])
    return images, scenes, seqs, tgts, grounding


def grounded(args, info: dict, answer: str) -> bool:
    """Whether a turn gets the grounding loss. 'all': every turn with relevant patches. 'evidence':
    only turns whose relevant patches are evidence for the answer; POPE-style negatives ("is there a
    red circle ?" -> no, relevant = objects sharing colour or shape) and zero counts (relevant = every
    object) are skipped, as attending to near-misses is not how such a question is answered."""
    if args.grounding_targets == "all":
        return True
    return info.get("neg_type") is None and answer != "zero"


SINK = 0  # sequence index of the sink token of 'heads' grounding: the first token ("USER"), never pruned


def head_targets(
    scene: dict, family: str, info: dict, answer: str, question: str = "", exists_by_colour: bool = False
) -> list[tuple[int, list[int], bool]]:
    """Targets of the 'heads' grounding mode for one question turn: (head, patches, sink) triples, each
    asking that head of the grounding layer to spread its attention (from the answer-predicting
    position) uniformly over ``patches`` plus, if ``sink``, the sink token.

    Unlike the head-mean 'mass' mode, this also says what to do when the evidence is absent (POPE
    negatives, "zero" counts, an empty cell: everything on the sink, so attention to the image itself
    signals presence), counts through the sink share (count n: one centre patch per counted object plus
    the sink, so the sink receives 1/(n+1)), and gives the two objects of a relation one head each. Only
    heads 0 and 1 are constrained; the others stay free. With ``exists_by_colour`` ('heads_colour'
    mode, for a tower trained with --shapes-map) an existence question looks up every object of the
    named colour (the sink if there is none), whose patches say which shapes that colour has."""
    grid = (M.GRID, M.GRID)
    objs = list(info.get("relevant_objects", []))

    def patches(idx: list[int], digit: bool = False) -> list[int]:
        return G.relevant_patches(scene, {"relevant_objects": idx, "relevant_digit": digit}, grid)

    if family == "count":
        if answer == G.NUMBER_WORDS[0]:
            return [(0, [], True)]
        return [(0, patches(objs)[: len(objs)], True)]  # centre patches come first, one per object
    if family == "exists" and exists_by_colour:
        colour = question.split()[3]  # "is there a <colour> <shape> ?"
        same = [i for i, o in enumerate(scene["objects"]) if o["colour"] == colour]
        return [(0, patches(same), False)] if same else [(0, [], True)]
    if family in ("exists", "pos_occupied") and answer == "no":
        return [(0, [], True)]
    if family == "relation":
        return [(0, patches(objs[:1]), False), (1, patches(objs[1:2]), False)]
    if family in ("digit", "pos_digit"):
        return [(0, patches([], digit=True), False)]
    return [(0, patches(objs), False)]


def stage2_inputs(args, step: int, enc: Encoder, hv: torch.Tensor, scenes: list[dict], seqs, tgts):
    """Token-dropout curriculum: per image keep every foreground patch and a random
    ``bg_keep_fraction`` of the background ones, shrinking its placeholder run to match; kept patches
    keep their full-image position ids (text after the image too), so the LLM sees the same relative
    geometry as on full images. Returns (per image its [k_i, Dv] kept features, ids, mask, positions,
    targets, per image the kept patch indices)."""
    n = M.NUM_PATCHES
    keeps, compact = [], []
    for i, sc in enumerate(scenes):
        f = bg_keep_fraction(args, step)
        g = torch.Generator().manual_seed(int(args.seed * 1_000_003 + step * 101 + i))
        drop = args.bg_drop_prob > 0 and float(torch.rand((), generator=g)) < args.bg_drop_prob
        if drop:  # pruning-style augmentation: a random share of the background, compact positions
            f = 0.05 + 0.95 * float(torch.rand((), generator=g))
        compact.append(drop)
        if f >= 1.0:
            keeps.append(torch.arange(n))
            continue
        fg = torch.from_numpy(foreground_patches(sc))
        bg = (torch.rand(n, generator=g) < f) & ~fg
        keeps.append(torch.nonzero(fg | bg).squeeze(-1))
    rows, trows, prows = [], [], []
    for ids, tgt, keep, cp in zip(seqs, tgts, keeps, compact):
        a = ids.index(enc.image)  # first placeholder; the run is n long
        rows.append(ids[:a] + [enc.image] * len(keep) + ids[a + n:])
        trows.append(tgt[:a] + [-100] * len(keep) + tgt[a + n:])
        if cp:  # as pre-LLM pruning feeds the LLM: positions renumbered over the shrunk sequence
            prows.append(list(range(len(rows[-1]))))
        else:
            prows.append(list(range(a)) + (a + keep).tolist() + list(range(a + n, len(ids))))
    ids, am = pad_batch(rows, enc.pad, left=False)
    tg, _ = pad_batch(trows, -100, left=False)
    pos, _ = pad_batch(prows, 0, left=False)
    feats = [hv[i, k] for i, k in enumerate(keeps)]  # ragged [k_i, Dv]
    return feats, ids, am, pos, tg, keeps


def _grounding_rows(seqs, keeps, grounding, n_image: int):
    """Per batch row and turn: (row b, the turn's answer-predicting index in the shrunk sequence,
    patch -> shrunk sequence index of the kept patches, the turn's targets)."""
    for b, (ids, keep, turns) in enumerate(zip(seqs, keeps, grounding)):
        a = ids.index(M.SPECIAL_TOKENS.index(M.IMAGE_TOKEN))
        where = {int(p): a + r for r, p in enumerate(keep.tolist())}  # patch -> shrunk sequence index
        shift = n_image - len(keep)
        for pos, targets in turns:
            yield b, pos - shift, where, targets


def grounding_loss(attn: torch.Tensor, seqs, keeps, grounding, n_image: int = M.NUM_PATCHES) -> torch.Tensor:
    """Mean over question turns of -log(head-mean attention mass, from the turn's answer-predicting
    position, on its answer-relevant patches) at one LLM layer. attn: [B, H, L, L] (shrunk sequences)."""
    terms = []
    for b, q, where, rel in _grounding_rows(seqs, keeps, grounding, n_image):
        cols = [where[p] for p in rel if p in where]
        if cols:
            terms.append(-torch.log(attn[b, :, q, cols].sum(-1).mean() + 1e-6))
    return torch.stack(terms).mean() if terms else attn.new_zeros(())


def head_grounding_loss(attn: torch.Tensor, seqs, keeps, grounding, n_image: int = M.NUM_PATCHES) -> torch.Tensor:
    """Mean over (turn, head) targets of the cross-entropy between the uniform target distribution of
    `head_targets` and that head's attention row at the turn's answer-predicting position.
    attn: [B, H, L, L] (shrunk sequences). Targets with a dropped patch (token-dropout curriculum) are
    skipped: their uniform distribution would no longer mean the same count."""
    terms = []
    for b, q, where, targets in _grounding_rows(seqs, keeps, grounding, n_image):
        for head, rel, sink in targets:
            if any(p not in where for p in rel):
                continue
            cols = [where[p] for p in rel] + ([SINK] if sink else [])
            if cols:
                terms.append(-torch.log(attn[b, head, q, cols] + 1e-6).mean())
    return torch.stack(terms).mean() if terms else attn.new_zeros(())


@torch.no_grad()
def validate(model, enc: Encoder, samples, batch: int = 50) -> dict:
    """Single-turn greedy first-token accuracy per family on ``samples``."""
    model.eval()
    correct: dict[str, list[float]] = {}
    for b in range(0, len(samples), batch):
        chunk = samples[b: b + batch]
        feats = M.vision_features(model, M.pixel_values([s.image for s in chunk]))
        ids, am = pad_batch([enc.prompt(s.question) for s in chunk], enc.pad, left=True)
        pred = M.llm_logits(model, feats, ids, am)[:, -1].argmax(-1)
        for s, p in zip(chunk, pred.tolist()):
            correct.setdefault(s.family, []).append(float(enc.tok.convert_ids_to_tokens(p) == s.answer))
    res = {f: float(np.mean(v)) for f, v in sorted(correct.items())}
    res["overall"] = float(np.mean([x for v in correct.values() for x in v]))
    return res


GROW_ZERO_COLUMNS = ("o_proj.weight", "down_proj.weight")  # output maps of the added heads / MLP units


@torch.no_grad()
def grow_llm(model: torch.nn.Module, small: dict[str, torch.Tensor]) -> list[str]:
    """Load the state dict ``small`` of a LLaVA with fewer LLM heads or a narrower MLP into the larger
    ``model``, function-preserving (Net2Net-style): every old weight goes to the leading block of the
    new one; the added heads' q/k/v rows and the added MLP units' gate/up rows keep their fresh
    initialisation, and their columns in o_proj / down_proj are zero, so the grown model computes
    exactly what the small one did and the new capacity starts training from there. Returns the names
    of the grown parameters."""
    grown = []
    for name, p in model.state_dict().items():
        old = small[name]
        if old.shape == p.shape:
            p.copy_(old)
            continue
        if old.dim() != p.dim() or any(o > n for o, n in zip(old.shape, p.shape)):
            raise ValueError(f"cannot grow parameter {name!r} from {tuple(old.shape)} to {tuple(p.shape)}")
        if name.endswith(GROW_ZERO_COLUMNS):
            p.zero_()
        p[tuple(slice(0, o) for o in old.shape)] = old
        grown.append(name)
    return grown


def run_stage2(args, out: Path, s1: Stage1, curve) -> None:
    from benchmarks.tasks import get_task

    model, _ = M.build_llava(args.seed + 2, args.llm_heads, args.llm_mlp)
    if args.attn_aux_weight > 0:
        model.set_attn_implementation("eager")  # the grounding loss reads one layer's attention probabilities
    if args.s2_init == "fanin":
        # Llama's default init (std 0.02) makes attention scores x^T Wq^T Wk y and the value path Wo Wv x
        # products of two tiny matrices: each one's gradient is proportional to the other, a saddle that
        # kept content-addressed retrieval at the answer prior for thousands of steps. Start the
        # attention projections at std 1/sqrt(fan_in) instead (as for a plain linear layer).
        g = torch.Generator().manual_seed(args.seed + 3)
        with torch.no_grad():
            for name, p in model.model.language_model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    model.model.vision_tower.requires_grad_(False)
    trainable = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    opt = torch.optim.AdamW(trainable, lr=args.s2_lr, weight_decay=0.0, betas=(0.9, 0.98))
    enc = Encoder()
    keys = eval_keys()
    val = get_task("shapes").samples("val", n=args.val_n)
    step, best, since_best, elapsed0, warm_from = 0, -1.0, 0, 0.0, 0
    ck = out / "stage2.pt"
    if ck.exists() and not args.restart_stage2:
        st = torch.load(ck, weights_only=False)
        model.load_state_dict(st["model"])
        step, best, elapsed0 = st["step"], st["best"], st.get("elapsed", 0.0)
        if st.get("phase") == args.phase:
            opt.load_state_dict(st["opt"])
            since_best, warm_from = st["since_best"], st.get("warm_from", 0)
            log.info("resuming stage 2 from step %d (best %.4f, %.1f min done)", step, best, elapsed0 / 60)
        else:  # a new --phase continues the previous phase's weights with a fresh optimizer
            since_best, warm_from = 0, step
            log.info("phase %r starts at stage-2 step %d from the checkpoint of phase %r; fresh optimizer",
                     args.phase, step, st.get("phase"))
    elif args.grow_from:
        st = torch.load(args.grow_from, weights_only=False)
        grown = grow_llm(model, st["model"])
        step, elapsed0, warm_from = st["step"], st.get("elapsed", 0.0), st["step"]  # fresh optimizer: warm up again
        log.info("grew %d LLM parameters of %s (step %d) to %d heads, MLP %d; fresh optimizer",
                 len(grown), args.grow_from, step, args.llm_heads, args.llm_mlp)
    # The tower is the run's stage-1 tower, also on resume (a run whose stage 1 was continued with new
    # targets, e.g. --count-map, continues its LLM on the new tower).
    model.model.vision_tower.load_state_dict(s1.vision.state_dict())
    t0, agg, aux_agg = time.time(), [], []

    def state() -> dict:
        return {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "best": best,
                "since_best": since_best, "elapsed": elapsed0 + time.time() - t0, "warm_from": warm_from,
                "phase": args.phase}

    while step < args.stage2_steps:
        elapsed = elapsed0 + time.time() - t0
        if args.stage2_minutes and elapsed > 60 * args.stage2_minutes:
            log.info("stage 2 time budget of %.0f min reached at step %d", args.stage2_minutes, step)
            break
        model.train()
        model.model.vision_tower.eval()
        progress = elapsed / (60 * args.stage2_minutes) if args.stage2_minutes else None
        for gp in opt.param_groups:
            # A fresh optimizer (--grow-from, a new --phase) warms up again and its cosine runs from its own
            # first step to --stage2-steps.
            gp["lr"] = lr_at(step - warm_from, args.s2_lr, 300, args.stage2_steps - warm_from, progress=progress)
        images, scenes, seqs, tgts, grounding = stage2_batch(args, step, enc, keys)
        with torch.no_grad():
            hv = M.vision_hidden(model.model.vision_tower, M.pixel_values(images)).hidden_states[-2][:, 1:]  # [B, 144, Dv]
        kept, ids, am, pos, tg, keeps = stage2_inputs(args, step, enc, hv, scenes, seqs, tgts)
        feats = model.model.multi_modal_projector(torch.cat(kept))  # [sum k_i, D], row-major like the placeholders
        aux_w = args.attn_aux_weight if step < args.attn_aux_steps else 0.0
        lm_out = M.llm_forward(model, feats, ids, am, pos, output_attentions=aux_w > 0)
        loss = F.cross_entropy(lm_out.logits.flatten(0, 1), tg.flatten(), ignore_index=-100)  # logits [B, L, V]
        if aux_w > 0:
            g_fn = grounding_loss if args.grounding_mode == "mass" else head_grounding_loss
            g_loss = g_fn(lm_out.attentions[args.attn_aux_layer], seqs, keeps, grounding)
            aux_agg.append(g_loss.item())
            loss = loss + aux_w * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        agg.append(loss.item())
        if step % args.log_every == 0:
            rec = {"stage": 2, "step": step, "time_s": round(elapsed0 + time.time() - t0, 1), "loss": round(float(np.mean(agg)), 4),
                   "bg_keep": round(bg_keep_fraction(args, step), 3)}
            if aux_agg:
                rec["grounding_loss"] = round(float(np.mean(aux_agg)), 4)
            log.info(json.dumps(rec))
            curve.write(json.dumps(rec) + "\n")
            curve.flush()
            agg, aux_agg = [], []
        if step % args.eval_every == 0 or step == args.stage2_steps:
            res = validate(model, enc, val)
            score = min(v for k, v in res.items() if k != "overall") + res["overall"]
            rec = {"stage": 2, "step": step, "time_s": round(elapsed0 + time.time() - t0, 1), "val": res, "score": score}
            log.info(json.dumps(rec))
            curve.write(json.dumps(rec) + "\n")
            curve.flush()
            if score > best:
                best, since_best = score, 0
                M.export(model, s1.text, s1.visual_projection.weight, out / "best")
                (out / "best" / "train_state.json").write_text(json.dumps(rec) + "\n")
                log.info("exported new best (score %.4f) to %s", score, out / "best")
            else:
                since_best += 1
            torch.save(state(), ck)
            if args.patience and since_best >= args.patience:
                log.info("early stop: no val improvement in %d evaluations", since_best)
                break
        elif step % args.ckpt_every == 0:
            torch.save(state(), ck)
    torch.save(state(), ck)
    log.info("stage 2 stopped at step %d, best score %.4f", step, best)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


if __name__ == "__main__":
    main()
