"""Prefill diagnostics (`mllm_adapters/engine/diagnostics.py`, docs/benchmarks.md "Diagnostics"): the last
prompt token's visual/text attention shares equal the model's own eager attention weights, recording
changes no output, sinks are found as the sink paper finds them, and the runner writes the fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import leaderboard as lb
from benchmarks import run as runner
from benchmarks import store
from benchmarks.metrics import attention_summary, diagnostics_row, find_sinks, sink_shares
from mllm_adapters import apply_pruner
from mllm_adapters.registry import get_family

PROMPTS = ["USER: <image> what is the colour of the circle ? ASSISTANT:", "USER: <image> how many ? ASSISTANT:"]
SIZES = [(40, 60), (30, 80)]
_MODELS: dict[str, tuple] = {}

# (family, method, params): unpruned, in-LLM (one layer; progressive), pre-LLM
CASES = [
    ("llava", "none", {}), ("llava", "fastv", {"budget": 9}), ("llava", "pdrop", {"budget": 9}),
    ("llava", "random", {"budget": 9}),
    ("qwen2_vl", "none", {}), ("qwen2_vl", "fastv", {"budget": 4}), ("qwen2_vl", "random", {"budget": 4}),
]


def _family(name: str):
    if name not in _MODELS:
        torch.manual_seed(0)
        spec = get_family(name)
        model, proc = spec.build_tiny(seed=0, attn_implementation="eager")
        images = [Image.fromarray(np.random.RandomState(i).randint(0, 255, (h, w, 3), dtype=np.uint8))
                  for i, (h, w) in enumerate(SIZES)]
        prompts = [p.replace("<image>", spec.prompt_image) for p in PROMPTS]
        _MODELS[name] = (model, proc, images, prompts)
    return _MODELS[name]


def _inputs(name: str, idx: list[int]):
    model, proc, images, prompts = _family(name)
    return proc(images=[images[i] for i in idx], text=[prompts[i] for i in idx], return_tensors="pt", padding=True)


def _recorded(model, method, params, enc, **forward):
    """(handle diagnostics, the LLM prompt's ids and mask as the engine rewrote them, model outputs, counts)."""
    seen = {}
    with apply_pruner(model, method, **params) as h:
        h.record_diagnostics = True
        hook = model.register_forward_pre_hook(  # after the engine's: sees the LLM prompt
            lambda m, a, kw: seen.update(ids=kw["input_ids"], mask=kw["attention_mask"]), with_kwargs=True)
        try:
            with torch.no_grad():
                out = model(**enc, **forward)
        finally:
            hook.remove()
        return h.diagnostics, seen, out, list(h.token_counts), list(h.batch_counts.llm_visual_width or [])


def _check_against_eager(model, method, params, enc):
    """The recorded shares and counts of every layer and sample against the eager attention weights."""
    diag, seen, out, counts, widths = _recorded(model, method, params, enc, output_attentions=True)
    ids, image_id = seen["ids"], model.config.image_token_id
    for i, att in enumerate(out.attentions):
        row = att[:, :, -1].float().mean(1)  # [B, Lc] the last prompt token's head-mean attention
        Lc = row.shape[1]
        for b, s in enumerate(diag.samples):
            if Lc == ids.shape[1]:  # the LLM prompt as it was fed
                vis = (ids[b] == image_id) & seen["mask"][b].bool()
            else:  # pruned inside the LLM: the visual tokens (merged ones last) stay one run where the image started
                start = int((ids[b] == image_id).nonzero()[0])
                vis = torch.zeros(Lc, dtype=torch.bool)
                vis[start:start + widths[i]] = True
            assert s.visual_share[i] == pytest.approx(float(row[b, vis].sum()), abs=1e-5)
            assert s.text_share[i] == pytest.approx(float(row[b, ~vis].sum()), abs=1e-5)
            assert s.visual_share[i] + s.text_share[i] == pytest.approx(1.0, abs=1e-5)
            assert s.n_visual[i] == (counts[b].llm_visual[i] if counts[b].llm_visual else int(vis.sum()))
            assert s.n_text[i] == int(((row[b] > 0) & ~vis).sum())  # real keys only: padding gets no weight
            if s.n_visual[i]:
                mdi = s.mdi(i)
                assert mdi == pytest.approx((s.text_share[i] / s.n_text[i]) / (s.visual_share[i] / s.n_visual[i]))
    return diag


@pytest.mark.parametrize("family,method,params", CASES, ids=[f"{f}-{m}" for f, m, _ in CASES])
def test_shares_equal_the_eager_attention_weights(family, method, params):
    _check_against_eager(_family(family)[0], method, params, _inputs(family, [0, 1]))


FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
# merged tokens before the LLM (pooling), merged tokens inside it (sparsevlm), plain in-LLM pruning (fastv)
MERGING = [("pooling", {"budget": 4}), ("sparsevlm", {"budget": 4}), ("fastv", {"budget": 4})]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,params", MERGING, ids=[m for m, _ in MERGING])
def test_every_family_and_merged_tokens(family, method, params):
    diag = _check_against_eager(_family(family)[0], method, params, _inputs(family, [0, 1]))
    assert all(s.n_visual[-1] > 0 for s in diag.samples)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("method,params", [("none", {}), ("random", {"budget": 4})], ids=["none", "random"])
def test_several_images_and_an_image_less_sample(family, method, params):
    model, proc, images, prompts = _family(family)
    spec = get_family(family)
    two = f"USER: {spec.prompt_image} and {spec.prompt_image} what is the colour ? ASSISTANT:"
    enc = proc(images=images, text=[two, "USER: how many ? ASSISTANT:"], return_tensors="pt", padding=True)
    diag = _check_against_eager(model, method, params, enc)
    assert diag.samples[1].n_visual == [0] * 4 and diag.samples[0].n_visual[0] > 0


@pytest.mark.parametrize("family,method,params", [("llava", "fastv", {"budget": 9}), ("qwen2_vl", "fastv", {"budget": 4}),
                                                  ("qwen2_vl", "none", {})])
def test_a_batch_of_two_equals_each_alone(family, method, params):
    model = _family(family)[0]
    both = _recorded(model, method, params, _inputs(family, [0, 1]))[0].samples
    for b in range(2):
        alone = _recorded(model, method, params, _inputs(family, [b]))[0].samples[0]
        assert alone.n_visual == both[b].n_visual and alone.n_text == both[b].n_text
        np.testing.assert_allclose(alone.visual_share, both[b].visual_share, atol=1e-5)
        np.testing.assert_allclose(alone.text_share, both[b].text_share, atol=1e-5)


def test_image_less_sample_records_text_only():
    model, proc, images, prompts = _family("llava")
    enc = proc(text=["USER: what is the colour ? ASSISTANT:"], return_tensors="pt")
    diag = _recorded(model, "fastv", {"budget": 9}, enc)[0]
    s = diag.samples[0]
    assert s.n_visual == [0] * 4 and s.visual_share == pytest.approx([0.0] * 4)
    assert s.text_share == pytest.approx([1.0] * 4) and s.mdi(0) is None


@pytest.mark.parametrize("family,method,params", [("llava", "none", {}), ("llava", "fastv", {"budget": 9}),
                                                  ("llava", "random", {"budget": 9}),
                                                  ("qwen2_vl", "fastv", {"budget": 4})])
def test_recording_changes_no_output(family, method, params):
    model = _family(family)[0]
    enc = _inputs(family, [0, 1])
    outs = []
    for record in (False, True):
        with apply_pruner(model, method, **params) as h:
            h.record_diagnostics = record
            with torch.no_grad():
                logits = model(**enc).logits
                gen = model.generate(**enc, max_new_tokens=3, do_sample=False)
            assert (h.diagnostics is not None) == record
        outs.append((logits, gen))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ---- sinks -------------------------------------------------------------------------------------------
DIM, SINKS = 5, [3, 7]


def _sink_rows(massive_first: bool, massive_visual: bool, tau: float):
    """Reference rows of the tiny LLaVA with hidden dim DIM made massive for the first prompt token (its
    embedding) and/or visual tokens SINKS (the projector's output), as the sink paper's models have it."""
    model, proc, images, prompts = _family("llava")
    enc = _inputs("llava", [0, 1])
    emb = model.get_input_embeddings().weight
    first = enc["input_ids"][0, -int(enc["attention_mask"][0].sum())]  # the first real token ("USER")
    saved = emb.data.clone()

    def boost(module, args, output):
        if output.shape[1] == 36:
            output = output.clone()
            output[:, SINKS, DIM] = 1000.0
        return output

    hook = model.model.multi_modal_projector.register_forward_hook(boost) if massive_visual else None
    try:
        if massive_first:
            emb.data[first, DIM] = 1000.0
        with apply_pruner(model, "none") as h:
            h.record_diagnostics, h.sink_tau = True, tau
            with torch.no_grad():
                model(**enc)
            diag = h.diagnostics
    finally:
        emb.data.copy_(saved)
        if hook is not None:
            hook.remove()
    return [diagnostics_row(s, with_sinks=True) for s in diag.samples]


def test_sinks_found_as_the_paper_does():
    rows = _sink_rows(True, True, tau=6.0)  # hidden size 64: |rms-normalised| at most 8
    assert rows[0]["sink_stats"]["layers"] == [2, 3]
    dims, sinks, reason = find_sinks(rows, 6.0, 64)
    assert dims == [DIM] and reason is None
    assert sinks == [SINKS, SINKS]
    # a method keeping tokens 0..8 (plus one merged token reaching the LLM) keeps both sinks
    assert sink_shares(list(range(9)), 10, SINKS) == (pytest.approx(2 / 10), 1.0)
    assert sink_shares([0, 1, 3, 20], 4, SINKS) == (0.25, 0.5)
    assert sink_shares(None, None, []) == (None, None)


def test_sinks_empty_with_the_reason():
    dims, sinks, reason = find_sinks(_sink_rows(False, False, tau=20.0), 20.0, 64)
    assert dims == [] and sinks == [[], []]
    assert reason.startswith("no sink dimension: max |rms-normalised activation| of the first prompt token over "
                             "layers 2-3 is")
    assert "< tau 20" in reason and "sqrt(hidden_size) = 8" in reason
    dims, sinks, reason = find_sinks(_sink_rows(True, False, tau=6.0), 6.0, 64)
    assert dims == [DIM] and sinks == [[], []] and reason.startswith("no visual sink token")


def test_attention_summary_is_a_ratio_of_means():
    rows = [{"attn_visual_share": [0.5, 0.2], "attn_text_share": [0.5, 0.8], "attn_n_visual": [10, 10],
             "attn_n_text": [10, 10], "mdi": [1.0, 4.0]},
            {"attn_visual_share": [0.0, 0.0], "attn_text_share": [1.0, 1.0], "attn_n_visual": [0, 0],
             "attn_n_text": [5, 5], "mdi": [None, None]}]  # an image-less sample: left out
    s = attention_summary(rows, 2)
    assert s["attn_visual_share_per_layer"] == [0.5, 0.2] and s["attn_visual_share"] == pytest.approx(0.35)
    assert s["mdi_per_layer"] == pytest.approx([1.0, 4.0]) and s["mdi"] == pytest.approx(2.0)


# ---- the runner ----------------------------------------------------------------------------------------
def test_runner_writes_diagnostics_and_leaderboard_columns(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(runner.Path(runner.__file__).resolve().parent.parent / "conf"),
                               version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=embedded", "task=shapes", "method=fastv", "budgets=[null,36]", "n_samples=4", "batch_size=2",
            "latency.n_samples=1", "latency.warmup=0", "latency.decode_tokens=2", "progress=false",
            f"results_dir={tmp_path}"])
    assert cfg.diagnostics is True  # on by default
    ref, cell = runner.run(cfg)
    m_ref, m = store.read_metrics(ref), store.read_metrics(cell)
    assert yaml_diag(ref) == {"version": 1, "sink_tau": 20.0}
    n_layers = 8
    for mm in (m_ref, m):
        assert len(mm["attn_visual_share_per_layer"]) == n_layers and len(mm["mdi_per_layer"]) == n_layers
        assert 0 < mm["attn_visual_share"] < 1 and mm["mdi"] > 0
        assert mm["attn_visual_share_before"] == m_ref["attn_visual_share"]
        assert mm["attn_visual_share_per_layer_before"] == m_ref["attn_visual_share_per_layer"]
        # the embedded model (hidden size 128) cannot reach tau 20 after RMS normalisation: no sink dimension
        assert mm["sink_share_of_kept"] is None and mm["sinks_kept"] is None and mm["sink_dims"] == []
        assert mm["sink_reason"].startswith("no sink dimension") and "sqrt(hidden_size) = 11.3" in mm["sink_reason"]
    # FastV at layer 2: the layers before it see the same sequence as the reference
    assert m["attn_visual_share_per_layer"][:2] == pytest.approx(m_ref["attn_visual_share_per_layer"][:2], abs=1e-6)
    rows = [json.loads(x) for x in (cell / store.PREDICTIONS).read_text().splitlines()]
    assert all(len(r["attn_visual_share"]) == n_layers and r["attn_n_visual"][-1] == 36 for r in rows)
    assert all(r["sink_share_of_kept"] is None for r in rows) and "sink_stats" not in rows[0]
    ref_rows = [json.loads(x) for x in (ref / store.PREDICTIONS).read_text().splitlines()]
    assert all(r["sink_stats"]["layers"] == list(range(2, 8)) and r["sinks"] == [] for r in ref_rows)
    board = lb.tables(tmp_path).board
    for col in [*lb.DIAGNOSTIC_COLUMNS, "sink_reason"]:
        assert col in board.columns
    pruned = board[board["method"] == "fastv"].iloc[0]
    assert pruned["attn_visual_share"] == pytest.approx(m["attn_visual_share"])
    assert pruned["attn_visual_share_before"] == pytest.approx(m_ref["attn_visual_share"])
    assert pruned["sink_reason"] == m["sink_reason"]


def yaml_diag(cell):
    import yaml

    return yaml.safe_load((cell / store.CONFIG).read_text())["diagnostics"]


def test_diagnostics_setting_is_checked_and_hashed():
    from hydra import compose, initialize_config_dir

    from benchmarks.settings import check_settings

    conf = str(runner.Path(runner.__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        on = compose(config_name="config", overrides=["model=tiny"])
        off = compose(config_name="config", overrides=["model=tiny", "diagnostics=false"])
        bad = compose(config_name="config", overrides=["model=tiny", "diagnostics=maybe"])
    assert check_settings(on).diagnostics is True and check_settings(off).diagnostics is False
    with pytest.raises(ValueError, match="diagnostics='maybe'"):
        check_settings(bad)
    a, b = runner.cell_config(on, 9, "fastv", {}), runner.cell_config(off, 9, "fastv", {})
    assert a["diagnostics"] == {"version": 1, "sink_tau": 20.0} and b["diagnostics"] is False
    assert store.config_hash(a) != store.config_hash(b)
