"""Stage-2 inputs: token ids identical to the LLaVA processor's, packed question/answer turns, caption
turns, the token-dropout curriculum and the grounding targets."""

from __future__ import annotations

import json

import numpy as np
import torch

from benchmarks.embedded import model as M
from benchmarks.embedded.train.common import BRIDGE_WEIGHTS, MIXED_WEIGHTS
from benchmarks.tasks.shapes import generator as G
from benchmarks.tasks.shapes import sample_from_rng


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
