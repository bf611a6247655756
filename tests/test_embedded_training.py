"""The embedded model's stage-2 training inputs (benchmarks.embedded.train): token-dropout sequences,
caption turns and grounding targets are built the way their docstrings say. Fresh untrained model,
a handful of samples: seconds on CPU, no training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.embedded import model as M
from benchmarks.embedded import train as T
from benchmarks.tasks.shapes import eval_keys
from benchmarks.tasks.shapes import generator as G


def _batch(argv: list[str], step: int = 3):
    args = T.parse_args(["--s2-batch", "4", *argv])
    enc = T.Encoder()
    images, scenes, seqs, tgts, grounding = T.stage2_batch(args, step, enc, eval_keys())
    return args, enc, images, scenes, seqs, tgts, grounding


def test_keep_all_inputs_equal_the_llava_path():
    args, enc, images, scenes, seqs, tgts, _ = _batch(["--bg-ramp-start", "10", "--bg-ramp-end", "20"])
    model, _ = M.build_llava(0)
    with torch.no_grad():
        hv = M.vision_hidden(model.model.vision_tower, M.pixel_values(images)).hidden_states[-2][:, 1:]
        kept, ids, am, pos, tg, keeps = T.stage2_inputs(args, 20, enc, hv, scenes, seqs, tgts)  # ramp done
        assert all(len(k) == M.NUM_PATCHES for k in keeps)
        ours = M.llm_forward(model, model.model.multi_modal_projector(torch.cat(kept)), ids, am, pos).logits
        ref = M.llm_logits(model, model.model.multi_modal_projector(hv), ids, am)
    real = am.bool()
    assert torch.equal(ours[real], ref[real])


def test_dropout_keeps_foreground_and_full_image_positions():
    args, enc, images, scenes, seqs, tgts, _ = _batch(["--bg-ramp-start", "10", "--bg-ramp-end", "20"])
    hv = torch.randn(len(images), M.NUM_PATCHES, 8)
    kept, ids, am, pos, tg, keeps = T.stage2_inputs(args, 0, enc, hv, scenes, seqs, tgts)  # foreground only
    for b, (sc, keep) in enumerate(zip(scenes, keeps)):
        fg = torch.from_numpy(T.foreground_patches(sc))
        assert torch.equal(keep, torch.nonzero(fg).squeeze(-1))
        assert torch.equal(kept[b], hv[b, keep])
        a = seqs[b].index(enc.image)
        n = int(am[b].sum())
        assert (ids[b, a: a + len(keep)] == enc.image).all()
        assert torch.equal(pos[b, a: a + len(keep)], a + keep)  # patch positions as in the full image
        # the text after the image keeps its full-image positions and its targets
        assert pos[b, n - 1] == len(seqs[b]) - 1
        assert ids[b, a + len(keep): n].tolist() == seqs[b][a + M.NUM_PATCHES:]
        assert tg[b, a + len(keep): n].tolist() == tgts[b][a + M.NUM_PATCHES:]
    half = T.bg_keep_fraction(args, 15)
    assert half == 0.5 and T.bg_keep_fraction(args, 25) == 1.0


def test_caption_turn_lists_every_object_with_its_cell():
    args, enc, _, scenes, seqs, _, _ = _batch(["--caption-prob", "1.0"])
    for sc, ids in zip(scenes, seqs):
        cap = T.llm_caption(sc)
        assert cap.count(",") == len(sc["objects"]) + (sc["digit"] is not None) - 1
        for o in sc["objects"]:
            assert f"{o['size']} {o['colour']} {o['shape']} at row {G.NUMBER_WORDS[o['row'] + 1]}" in cap
        assert " ".join(enc.tok.convert_ids_to_tokens(ids)).count(T.CAPTION_QUESTION) == 1
        enc.words(cap)  # every caption word is in the vocabulary


def test_grounding_targets_point_at_relevant_image_tokens():
    args, enc, images, scenes, seqs, tgts, grounding = _batch(["--attn-aux-weight", "0.5", "--caption-prob", "0.5"])
    colon = enc.tok.convert_tokens_to_ids(":")
    hv = torch.zeros(len(images), M.NUM_PATCHES, 4)
    *_, keeps = T.stage2_inputs(args, 0, enc, hv, scenes, seqs, tgts)
    n_turns = 0
    for b, turns in enumerate(grounding):
        a = seqs[b].index(enc.image)
        for pos, rel in turns:
            assert seqs[b][pos] == colon and tgts[b][pos] != -100  # the answer-predicting position
            assert all(0 <= p < M.NUM_PATCHES and seqs[b][a + p] == enc.image for p in rel)  # may be empty
            n_turns += bool(rel)
    assert n_turns > 0
    # 'evidence' drops POPE-style negatives and zero counts, 'all' keeps them
    ev = T.parse_args(["--grounding-targets", "evidence"])
    assert not T.grounded(ev, {"neg_type": "popular"}, "no") and not T.grounded(ev, {}, "zero")
    every = T.parse_args(["--grounding-targets", "all"])
    assert T.grounded(ev, {"neg_type": None}, "yes") and T.grounded(every, {"neg_type": "random"}, "no")


def test_grounding_loss_is_minus_log_relevant_mass():
    attn = torch.zeros(1, 2, 5, 5)
    attn[0, 0, 4] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    attn[0, 1, 4] = torch.tensor([0.5, 0.1, 0.1, 0.3, 0.0])
    seqs = [[1, M.SPECIAL_TOKENS.index(M.IMAGE_TOKEN), M.SPECIAL_TOKENS.index(M.IMAGE_TOKEN), 7, 8]]
    keeps = [torch.tensor([5, 9])]  # two of 10 patches kept, at sequence indices 1 and 2
    loss = T.grounding_loss(attn, seqs, keeps, [[(4 + 8, [9, 3])]], n_image=10)  # patch 3 was dropped
    assert torch.isclose(loss, -torch.log(torch.tensor((0.3 + 0.1) / 2 + 1e-6)))


def test_head_targets_count_through_the_sink_and_split_relations():
    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(200):
        fam = G.EVAL_FAMILIES[int(rng.integers(len(G.EVAL_FAMILIES)))]
        scene, _, ans, info = G.make_question(rng, fam)
        targets = T.head_targets(scene, fam, info, ans)
        if fam == "count":
            (head, rel, sink), = targets
            n = G.NUMBER_WORDS.index(ans)
            # one centre patch per counted object plus the sink: the sink's share is 1 / (n + 1)
            assert head == 0 and sink and len(set(rel)) == len(rel) == n
            for i in info["relevant_objects"] if n else []:
                o = scene["objects"][i]
                assert (o["cy"] // M.PATCH_SIZE) * M.GRID + o["cx"] // M.PATCH_SIZE in rel
        elif fam == "exists" and ans == "no":
            assert targets == [(0, [], True)]  # absent evidence: everything on the sink
        elif fam == "relation":
            assert [h for h, _, _ in targets] == [0, 1] and not any(s for _, _, s in targets)
            a, b = (G.relevant_patches(scene, {"relevant_objects": [i]}, (M.GRID, M.GRID))
                    for i in info["relevant_objects"])
            assert targets[0][1] == a and targets[1][1] == b
        else:
            (head, rel, sink), = targets
            assert head == 0 and not sink and rel == G.relevant_patches(scene, info, (M.GRID, M.GRID))
        seen.add((fam, ans == "no" or ans == "zero"))
    assert ("count", True) in seen and ("exists", True) in seen


def test_head_grounding_loss_is_cross_entropy_to_uniform_targets():
    attn = torch.zeros(1, 2, 5, 5)
    attn[0, 0, 4] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    attn[0, 1, 4] = torch.tensor([0.5, 0.1, 0.1, 0.3, 0.0])
    img = M.SPECIAL_TOKENS.index(M.IMAGE_TOKEN)
    seqs = [[1, img, img, 7, 8]]
    keeps = [torch.tensor([5, 9])]  # two of 10 patches kept, at sequence indices 1 and 2
    turns = [[(4 + 8, [(0, [9], True), (1, [5, 9], False), (1, [3], False)])]]  # patch 3 dropped: skipped
    loss = T.head_grounding_loss(attn, seqs, keeps, turns, n_image=10)
    want = (-(torch.log(torch.tensor(0.3 + 1e-6)) + torch.log(torch.tensor(0.1 + 1e-6))) / 2
            - (torch.log(torch.tensor(0.1 + 1e-6)) + torch.log(torch.tensor(0.1 + 1e-6))) / 2) / 2
    assert torch.isclose(loss, want)
    # the batch builder produces such targets at the answer-predicting positions
    args, enc, _, _, seqs, tgts, grounding = _batch(["--attn-aux-weight", "0.5", "--grounding-mode", "heads"])
    colon = enc.tok.convert_tokens_to_ids(":")
    assert any(turns for turns in grounding)
    for b, turns in enumerate(grounding):
        for pos, targets in turns:
            assert seqs[b][pos] == colon and tgts[b][pos] != -100
            assert all(h in (0, 1) for h, _, _ in targets)


def test_count_shapes_and_presence_maps_describe_the_objects():
    rng = np.random.default_rng(11)
    for _ in range(20):
        scene = G.random_scene(rng)
        t = T.patch_targets(scene)
        fg = t["colour"] > 0
        assert (t["colour_count"][~fg] == 0).all()
        for p in np.flatnonzero(fg):
            colour = G.COLOUR_NAMES[t["colour"][p] - 1]
            assert t["colour_count"][p] == sum(o["colour"] == colour for o in scene["objects"])
            shapes = {o["shape"] for o in scene["objects"] if o["colour"] == colour}
            assert t["colour_shapes"][p].tolist() == [float(s in shapes) for s in G.SHAPES]
            combos = {(o["colour"], o["shape"]) for o in scene["objects"]}
            assert t["presence_map"][p].tolist() == [float((c, s) in combos) for c in G.COLOUR_NAMES for s in G.SHAPES]
        assert (t["presence_map"][~fg] == 0).all()  # background and digit patches carry no presence map


def test_heads_colour_mode_looks_up_existence_by_colour():
    rng = np.random.default_rng(3)
    n = 0
    while n < 30:
        scene, q, ans, info = G.make_question(rng, "exists")
        colour = q.split()[3]
        same = [i for i, o in enumerate(scene["objects"]) if o["colour"] == colour]
        (head, rel, sink), = T.head_targets(scene, "exists", info, ans, q, exists_by_colour=True)
        want = G.relevant_patches(scene, {"relevant_objects": same}, (M.GRID, M.GRID)) if same else []
        assert head == 0 and rel == want and sink == (not same)
        n += 1


def test_grown_llm_computes_what_the_small_one_did():
    small, _ = M.build_llava(0)
    big, _ = M.build_llava(1, heads=8, mlp=512)
    grown = T.grow_llm(big, small.state_dict())
    assert any(n.endswith("q_proj.weight") for n in grown) and any(n.endswith("down_proj.weight") for n in grown)
    ids = torch.randint(10, 30, (2, 24))
    ids[:, 3:7] = big.config.image_token_id
    am = torch.ones_like(ids)
    am[1, :2] = 0  # left padding in the second row
    feats = torch.randn(2, 4, big.config.text_config.hidden_size)
    with torch.no_grad():
        ref = M.llm_logits(small, feats, ids, am)
        out = M.llm_logits(big, feats, ids, am)
    assert torch.allclose(out, ref, atol=1e-5)
    # the added heads / units are live: their input rows are not zero, only their output columns
    q = big.model.language_model.layers[0].self_attn.q_proj.weight  # [8 * 32, 128]
    assert q[4 * M.LLM_HEAD_DIM:].abs().sum() > 0
    o = big.model.language_model.layers[0].self_attn.o_proj.weight  # [128, 8 * 32]
    assert o[:, 4 * M.LLM_HEAD_DIM:].abs().sum() == 0


def test_grow_refuses_to_shrink():
    small, _ = M.build_llava(0)
    big, _ = M.build_llava(1, heads=8)
    with pytest.raises(ValueError, match="cannot grow parameter"):
        T.grow_llm(small, big.state_dict())
