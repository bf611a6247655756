"""`dyvte`: the router on hand-made states, weight loading (prunebench's format and the authors'), the
refusals (no weights, another model's, bad parameters), and the per-sample exit on the embedded model
with the shipped routers: batch = singles, determinism, cached generate = recompute with the prefill
exit replayed, the KV cache after the exit, remove(), keep-all and the budget's forced exit; then the
training script on a tiny setting (deterministic, writes a loadable folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mllm_adapters import apply_pruner
from pruners import dyvte as D
from pruners import get_pruner_class
from pruners.vte import vte_layer
from tests._adapter_helpers import greedy_recompute

SHIPPED = D.REPO_ROOT / D.SHIPPED_EMBEDDED
STEPS = 2  # the shapes task's max_new_tokens


# ---- the router on hand-made states (no model) -------------------------------------------------------------
def test_text_state_hand_made():
    h = torch.arange(2 * 7 * 2, dtype=torch.float32).view(2, 7, 2)
    # sample 0: text after the image at 4, 5, 6 -> mean of 4, 5; last 6. sample 1: only 6 after the image.
    pos = torch.tensor([[4, 5, 6], [6, -1, -1]])
    out = D.text_state(h, pos)
    torch.testing.assert_close(out[0], torch.cat([(h[0, 4] + h[0, 5]) / 2, h[0, 6]]))
    torch.testing.assert_close(out[1], torch.cat([h[1, 6], h[1, 6]]))  # no other text: the last is the mean
    # nothing after the image: the last real token for both halves
    out = D.text_state(h, torch.full((2, 0), -1, dtype=torch.long), torch.tensor([[1] * 6 + [0]] * 2).bool())
    torch.testing.assert_close(out, torch.cat([h[:, 5], h[:, 5]], -1))


def test_router_forward_hand_made():
    bank = D.RouterBank([3], in_dim=4, hidden=3)
    w1 = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 1]])
    w2 = torch.tensor([[1.0, 0, 0], [0, 1, 2]])
    with torch.no_grad():
        bank.routers["3"].w1.weight.copy_(w1)
        bank.routers["3"].w2.weight.copy_(w2)
    x = torch.tensor([[0.5, -1.0, 2.0, 3.0]])
    hid = F.gelu(torch.tensor([0.5, -1.0, 1.0]))
    want = torch.stack([hid[0], hid[1] + 2 * hid[2]])
    torch.testing.assert_close(bank(3, x)[0], want)
    torch.testing.assert_close(D.exit_probability(bank, 3, x), want.softmax(-1)[1:])


# ---- weights: formats, refusals -------------------------------------------------------------------------
def write_router(folder: Path, bank: D.RouterBank, meta_from: Path = SHIPPED, **model_over) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in bank.state_dict().items()}, str(folder / D.ROUTER_FILE))
    meta = json.loads((meta_from / D.ROUTER_JSON).read_text())
    meta["router"].update(layers=bank.layers, in_dim=bank.in_dim, hidden=bank.hidden)
    meta["model"].update(model_over)
    (folder / D.ROUTER_JSON).write_text(json.dumps(meta))
    return folder


def test_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    bank = D.RouterBank([1, 2, 5], in_dim=256, hidden=8)
    loaded = D.load_router(write_router(tmp_path / "r", bank))
    assert loaded.fmt == "prunebench" and loaded.bank.layers == [1, 2, 5] and loaded.threshold == 0.5
    for k, v in bank.state_dict().items():
        assert torch.equal(loaded.bank.state_dict()[k], v)
    x = torch.randn(3, 256)
    for k in bank.layers:
        assert torch.equal(loaded.bank(k, x), bank(k, x))


def test_weights_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="weights"):
        get_pruner_class("dyvte")(weights=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="weights"):
        D.load_router(tmp_path / "empty")
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(SHIPPED / D.ROUTER_JSON, half / D.ROUTER_JSON)
    with pytest.raises(ValueError, match=D.ROUTER_FILE):
        D.load_router(half)


def test_relative_weights_resolve_against_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not found here: the repository root's
    assert D.resolve_weights(D.SHIPPED_EMBEDDED) == SHIPPED.resolve()
    (tmp_path / D.SHIPPED_EMBEDDED).mkdir(parents=True)  # found here first
    assert D.resolve_weights(D.SHIPPED_EMBEDDED) == (tmp_path / D.SHIPPED_EMBEDDED).resolve()


def test_authors_format_mapping(tmp_path, embedded):
    """Their checkpoint: ``model.visual_gates_router.<i>.w1/w2.weight`` for every layer i (exit after layer
    i); ours: layer K = i + 1, the router after the last layer dropped, other tensors ignored."""
    lm, _ = embedded
    L, d = 8, 128
    g = torch.Generator().manual_seed(1)
    sd = {f"model.visual_gates_router.{i}.w1.weight": torch.randn(16, 2 * d, generator=g) for i in range(L)}
    sd.update({f"model.visual_gates_router.{i}.w2.weight": torch.randn(2, 16, generator=g) for i in range(L)})
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    r = D.load_router(tmp_path, n_layers=L)
    assert r.fmt == "authors" and r.bank.layers == list(range(1, L)) and r.threshold == 0.5
    for k in r.bank.layers:
        assert torch.equal(r.bank.routers[str(k)].w1.weight, sd[f"model.visual_gates_router.{k - 1}.w1.weight"])
        assert torch.equal(r.bank.routers[str(k)].w2.weight, sd[f"model.visual_gates_router.{k - 1}.w2.weight"])
    bank = D.bank_from_authors({k.replace("model.", "model.language_model.", 1): v for k, v in sd.items()}, L)
    assert bank.layers == list(range(1, L))  # any prefix before visual_gates_router
    with apply_pruner(lm.model, "dyvte", weights=str(tmp_path)) as h:  # attaches on a model of that width
        assert h.pruner.router.fmt == "authors" and h.pruner.llm_layers() == list(range(1, L))
    with pytest.raises(ValueError, match="visual_gates_router"):
        D.bank_from_authors({"model.norm.weight": torch.ones(2)})


def test_null_weights_refused(tiny, embedded):
    for model in (tiny[0], embedded[0].model):
        with pytest.raises(ValueError) as e:
            apply_pruner(model, "dyvte")
        msg = str(e.value)
        assert "dyvte" in msg and "weights" in msg and "train_dyvte" in msg and D.SHIPPED_EMBEDDED in msg
        assert getattr(model, "_prunebench_handle", None) is None or model._prunebench_handle.removed


def test_wrong_model_refused(tiny, embedded, tmp_path):
    with pytest.raises(ValueError, match="another model"):  # the tiny LLaVA: another width
        apply_pruner(tiny[0], "dyvte", weights=str(SHIPPED))
    lm, _ = embedded
    loaded = D.load_router(SHIPPED)
    for over in ({"config_sha256": "0" * 64}, {"llm_num_layers": 32}, {"family": "qwen2_vl"},
                 {"weights_sha256": {"model.safetensors": "0" * 64}}):
        folder = write_router(tmp_path / str(len(list(tmp_path.iterdir()))), loaded.bank, **over)
        with pytest.raises(ValueError, match="another model") as e:
            apply_pruner(lm.model, "dyvte", weights=str(folder))
        assert "weights" in str(e.value)


def test_bad_parameters():
    cls = get_pruner_class("dyvte")
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            cls(weights=str(SHIPPED), threshold=bad)
    with pytest.raises(ValueError, match="threshold"):
        cls(weights=str(SHIPPED), threshold="0.5")
    for bad in (3, ""):
        with pytest.raises(ValueError, match="weights"):
            cls(weights=bad)
    with pytest.raises(ValueError, match="nope"):
        cls(weights=str(SHIPPED), nope=1)
    p = cls(weights=str(SHIPPED))
    assert p.chooses_budget and not p.keeps_all
    assert not cls(budget=36, weights=str(SHIPPED)).chooses_budget


# ---- the exit on the embedded model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded():
    """(LoadedModel, samples): the embedded model and eval samples, the first two exiting at different
    layers with the shipped routers (alone)."""
    from benchmarks.models import load_model
    from benchmarks.tasks import get_task

    lm = load_model({"name": "embedded", "source": "embedded", "path": None, "dtype": "float32",
                     "attn_implementation": "eager", "prompt_template": None})
    samples = get_task("shapes").samples("eval", n=24)
    exits = []
    with apply_pruner(lm.model, "dyvte", weights=str(SHIPPED)) as h:
        for s in samples:
            with torch.no_grad():
                lm.model(**encode(lm, [s]))
            exits.append(D.exit_layers(h)[0])
    first = exits[0]
    other = next((i for i, e in enumerate(exits) if e != first), None)
    assert other is not None, f"the shipped routers exit every sample at the same layer: {exits}"
    exited = next(i for i, e in enumerate(exits) if e is not None)
    order = [0, other] + [i for i in range(len(samples)) if i not in (0, other)]
    lm.exits = [exits[i] for i in order]
    lm.exited = order.index(exited)
    return lm, [samples[i] for i in order]


def encode(lm, samples):
    return dict(lm.processor(images=[s.image.convert("RGB") for s in samples],
                             text=[lm.prompt(s.question) for s in samples], padding=True, return_tensors="pt"))


def run(model, inputs, **params):
    with apply_pruner(model, "dyvte", weights=str(SHIPPED), **params) as h:
        with torch.no_grad():
            out = model(**inputs).logits[:, -1]
        return out, D.exit_layers(h), [list(c.llm_visual) for c in h.token_counts]


def test_batch_of_two_equals_two_batches_of_one(embedded):
    lm, samples = embedded
    both, exits, counts = run(lm.model, encode(lm, samples[:2]))
    alone = [run(lm.model, encode(lm, [s])) for s in samples[:2]]
    torch.testing.assert_close(both, torch.cat([a[0] for a in alone]), rtol=1e-4, atol=1e-4)
    assert exits == [a[1][0] for a in alone] == lm.exits[:2] and exits[0] != exits[1]
    assert counts == [a[2][0] for a in alone]
    n, L = 144, 8
    for e, c in zip(exits, counts):  # N visual tokens before the exit, none from it on
        assert c == ([n] * L if e is None else [n] * e + [0] * (L - e))


def test_same_result_twice(embedded):
    lm, samples = embedded
    inputs = encode(lm, samples[:4])
    a, b = run(lm.model, inputs), run(lm.model, inputs)
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_cached_generate_equals_recompute_with_the_exit_replayed(embedded):
    """Batch of one: the recompute is `vte` at the prefill's exit layer (an independent exit); batch of
    two: dyvte's prefill decisions replayed at every recomputed step (as the conformance suite does)."""
    lm, samples = embedded
    model = lm.model
    s = samples[lm.exited]
    inputs = encode(lm, [s])
    with apply_pruner(model, "dyvte", weights=str(SHIPPED)) as h:
        gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        (k,) = D.exit_layers(h)
    assert k is not None
    ref = greedy_recompute(model, inputs, STEPS, "vte", {"layer": k})
    assert (torch.stack(gen.logits, 1) - ref).abs().max() <= 1e-4

    inputs = encode(lm, samples[:2])
    cls = get_pruner_class("dyvte")
    recorded, orig = [], cls.prune_llm

    def record(self, ctx):
        out = orig(self, ctx)
        recorded.append((out.clone(), None if ctx.fillers is None else ctx.fillers.clone()))
        return out

    cls.prune_llm = record
    try:
        with apply_pruner(model, "dyvte", weights=str(SHIPPED)):
            gen = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
    finally:
        cls.prune_llm = orig
    calls = [0]

    def replay(self, ctx):
        out, fill = recorded[calls[0] % len(recorded)]
        calls[0] += 1
        if fill is not None:
            ctx.fillers = fill.clone()
        return out.clone()

    cls.prune_llm = replay
    try:
        ref = greedy_recompute(model, inputs, STEPS, "dyvte", {"weights": str(SHIPPED)})
    finally:
        cls.prune_llm = orig
    assert calls[0] == STEPS * len(recorded)
    assert (torch.stack(gen.logits, 1) - ref).abs().max() <= 1e-4


def test_kv_cache_after_the_exit_holds_no_visual_token(embedded):
    lm, samples = embedded
    inputs = encode(lm, [samples[lm.exited]])
    n_prompt = inputs["input_ids"].shape[1]
    with apply_pruner(lm.model, "dyvte", weights=str(SHIPPED)) as h:
        with torch.no_grad():
            cache = lm.model(**inputs, use_cache=True).past_key_values
        (k,) = D.exit_layers(h)
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert lengths == [n_prompt] * k + [n_prompt - 144] * (len(lengths) - k), (k, lengths)


def test_remove_restores_and_keep_all(embedded):
    lm, samples = embedded
    model, inputs = lm.model, encode(lm, samples[:2])
    with torch.no_grad():
        ref = model(**inputs).logits
    h = apply_pruner(model, "dyvte", weights=str(SHIPPED))
    with torch.no_grad():
        pruned = model(**inputs).logits
    h.remove()
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(after, ref)
    assert pruned.shape != ref.shape or not torch.equal(pruned, ref)  # (an exit returns the text columns)
    with apply_pruner(model, "dyvte", weights=str(SHIPPED), budget=144) as h:  # budget >= N: keep all
        assert h.pruner.keeps_all and h.pruner.llm_layers() == []
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref)


def test_budget_forces_the_exit(embedded):
    lm, samples = embedded
    inputs = encode(lm, samples[:4])
    for budget in (36, 18):
        kb = vte_layer(144, 8, budget)
        _, exits, _ = run(lm.model, inputs, budget=budget)
        free = [e for e in lm.exits[:4]]
        assert exits == [kb if e is None or e > kb else e for e in free], (budget, exits, free)
    with apply_pruner(lm.model, "dyvte", weights=str(SHIPPED), budget=36) as h:
        assert h.pruner.forced_exit_layer == 2 and h.pruner.llm_layers() == [1, 2]


def test_threshold_changes_the_exit(embedded):
    lm, samples = embedded
    inputs = encode(lm, samples[:4])
    _, late, _ = run(lm.model, inputs, threshold=0.999999)
    _, early, _ = run(lm.model, inputs, threshold=1e-6)
    for e, d, lt in zip(early, lm.exits[:4], late):  # a lower threshold exits no later (None: never)
        assert (e or 9) <= (d or 9) <= (lt or 9)
    assert early != late


# ---- the training script ------------------------------------------------------------------------------
def test_training_script_tiny_is_deterministic(tmp_path, embedded):
    from benchmarks.embedded import train_dyvte as T

    lm, samples = embedded
    metas = []
    for name in ("a", "b"):
        args = T.parse_args(["--out", str(tmp_path / name), "--n-train", "3", "--n-val", "2", "--epochs", "2",
                             "--hidden", "8", "--batch", "2", "--model-batch", "3"])
        metas.append(T.run(args, lm, (samples[2:5], samples[5:7])))  # eval samples: no training-stream set-up
    a, b = (tmp_path / "a" / D.ROUTER_FILE).read_bytes(), (tmp_path / "b" / D.ROUTER_FILE).read_bytes()
    assert a == b
    assert metas[0]["metrics"] == metas[1]["metrics"]
    assert metas[0]["training"]["loss_curve"] == metas[1]["training"]["loss_curve"]
    assert (tmp_path / "a" / "README.md").is_file()
    r = D.load_router(tmp_path / "a")
    assert r.bank.layers == list(range(1, 8)) and r.bank.hidden == 8
    with apply_pruner(lm.model, "dyvte", weights=str(tmp_path / "a")) as h:
        with torch.no_grad():
            lm.model(**encode(lm, samples[:1]))
        assert len(D.exit_layers(h)) == 1


def test_training_features_are_the_routers_inputs(embedded):
    """The script's features (HF hidden states of an unpruned forward) equal what the router reads from
    ``ctx.hidden_states`` inside the engine, at every layer it is called."""
    from benchmarks.embedded import train_dyvte as T

    lm, samples = embedded
    want = T.label_batch(lm.model, lm, samples[:1], list(range(1, 8)))["features"][0]  # [7, 256]
    cls, orig, seen = get_pruner_class("dyvte"), get_pruner_class("dyvte").prune_llm, {}

    def spy(self, ctx):
        seen[ctx.layer] = D.text_state(ctx.hidden_states, ctx.instruction_pos, ctx.key_mask)[0]
        return orig(self, ctx)

    cls.prune_llm = spy
    try:
        run(lm.model, encode(lm, samples[:1]), threshold=0.999999)
    finally:
        cls.prune_llm = orig
    assert seen
    for k, f in seen.items():
        torch.testing.assert_close(f, want[k - 1], rtol=1e-5, atol=1e-5)


def test_flops_match_the_flop_counter(embedded):
    """The analytic count from the handle's per-sample counts (N visual tokens before the exit, none after)
    plus the routers' own FLOPs equals FlopCounterMode, for a sample that exits and one that does not
    (tests/test_flops.py checks every other method on the tiny models, which dyvte refuses)."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.flops import prefill_flops

    lm, samples = embedded
    image_token = int(lm.model.config.image_token_id)
    for i in sorted({0, lm.exited}):
        inputs = encode(lm, [samples[i]])
        with apply_pruner(lm.model, "dyvte", weights=str(SHIPPED)) as h:
            h.count_overhead_flops = True
            with FlopCounterMode(display=False) as counter, torch.inference_mode():
                lm.model(**inputs, logits_to_keep=1)
            (counts,) = h.token_counts
            overhead = h.overhead_flops
        n_text = int(inputs["attention_mask"][0].sum()) - int((inputs["input_ids"][0] == image_token).sum())
        f = prefill_flops(lm.model.config, n_text, counts, overhead=overhead)
        measured = counter.get_total_flops()
        assert abs(f.total - measured) / measured < 0.01, (i, f.as_dict(), measured, counts)
        assert overhead > 0  # the routers ran


def test_cell_identity_covers_the_router_files(tmp_path):
    """Retrained routers under the same path get new result cells: the cell hash covers the files."""
    import shutil

    from benchmarks.run import code_identity

    folder = tmp_path / "routers"
    shutil.copytree(SHIPPED, folder)
    before = code_identity("dyvte", {"weights": str(folder), "threshold": None})
    assert before["files"]["weights"] == D.DyVTE(weights=str(SHIPPED)).content_identity()["weights"]
    (folder / "README.md").write_text("a card does not change what the routers compute")
    assert code_identity("dyvte", {"weights": str(folder), "threshold": None}) == before
    data = bytearray((folder / D.ROUTER_FILE).read_bytes())
    data[-1] ^= 1
    (folder / D.ROUTER_FILE).write_bytes(bytes(data))
    assert code_identity("dyvte", {"weights": str(folder), "threshold": None})["files"] != before["files"]
    assert "files" not in code_identity("fastv", {"layer": 2, "positions": "original"})
