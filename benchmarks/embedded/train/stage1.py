"""Stage 1, the vision stage: the CLIP ViT alone with dense per-patch targets, CLS heads and a
contrastive loss against a CLIP text tower (see the package docstring)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionModel

from benchmarks.embedded import model as M
from benchmarks.embedded.train.common import MAX_CLS_COUNT, N_COMBOS, log, lr_at
from benchmarks.tasks.shapes import eval_keys
from benchmarks.tasks.shapes import generator as G


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
