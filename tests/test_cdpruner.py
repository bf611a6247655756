"""`cdpruner` (CDPruner): the conditional kernel and the DPP selection on hand-made tensors against an
independent re-derivation of the authors' ``encode_images`` procedure (Theia-4869/CDPruner,
llava/model/llava_arch.py), the instruction text, and the method on the tiny models: the CLIP
text-tower path on the tiny LLaVA with a tower built offline (explicit folder and auto-detected
``<checkpoint>/text_tower``) and per view on the tiny LLaVA-NeXT, the LLM-embedding fallback (no tower, no tokenizer, forced, and on the
tiny Qwen families), each recorded in ``handle.info``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mllm_adapters import apply_pruner
from mllm_adapters.tiny import TINY_QWEN_IMAGE
from pruners import get_pruner_class, ops
from pruners.cdpruner import (
    CDPruner,
    conditional_kernel,
    instruction_text,
    normalise_relevance,
)
from tests.conftest import PROMPTS, random_images, single

BUDGET = 12
QUESTIONS = ["what is the colour of the circle ?", "how many ?"]  # PROMPTS' questions, as the authors embed them


# ---------------------------------------------------------------------------------------------
# an independent re-derivation of the authors' procedure (their B = the views of ONE image)
# ---------------------------------------------------------------------------------------------
def authors_select(tokens: torch.Tensor, image_embeds: torch.Tensor | None, text_embeds: torch.Tensor | None,
                   T: int, relevance: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] selection order of CDPruner's encode_images on one image's views.

    tokens [B, N, D] projected visual tokens; image_embeds [B, N, C] CLIP-space patch embeddings and
    text_embeds [M, C] the instruction's segment embeddings (relevance = minus the mean cosine over
    the segments, min-max normalised over the whole tensor); or ``relevance`` [B, N] given directly.
    Then kernel = r_i s_ij r_j and the greedy loop with cis / di2s as in their code (no guards)."""
    xn = tokens.float() / tokens.float().norm(dim=-1, keepdim=True)
    sim = torch.matmul(xn, xn.transpose(1, 2))
    if relevance is None:
        ie = image_embeds.float() / image_embeds.float().norm(dim=-1, keepdim=True)
        te = text_embeds.float() / text_embeds.float().norm(dim=-1, keepdim=True)
        relevance = (-(ie @ te.t())).mean(dim=-1)
        relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kern = relevance[:, :, None] * sim * relevance[:, None, :]
    B, N, _ = kern.shape
    rows = torch.arange(B)
    cis = torch.zeros(T, B, N)
    di2s = torch.diagonal(kern, dim1=1, dim2=2).clone()
    picks = torch.empty(T, B, dtype=torch.long)
    for i in range(T):
        j = di2s.argmax(dim=-1)
        picks[i] = j
        prev = (cis[:i, rows, j][:, :, None] * cis[:i]).sum(0)  # sum_t c_t[j] c_t
        e = (kern[rows, j] - prev) / di2s[rows, j].sqrt()[:, None]
        cis[i] = e
        di2s = di2s - e * e
        di2s[rows, j] = float("-inf")
    return picks.t()


def minmax(r: torch.Tensor) -> torch.Tensor:
    """Their normalisation of one image's [1, N] scores."""
    return (r - r.min() + 1e-6) / (r.max() - r.min())


def _tensors(seed, B=1, N=30, D=48, C=16, M=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, D, generator=g), torch.randn(B, N, C, generator=g), torch.randn(M, C, generator=g))


# ---- hand-made tensors ----------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("seed,N,T", [(0, 30, 8), (1, 36, 12), (2, 20, 20)])
def test_kernel_and_selection_match_the_authors_procedure(seed, N, T, M):
    tokens, img, txt = _tensors(seed, N=N, M=M)
    want = authors_select(tokens, img, txt, T)
    cos = (F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()).mean(-1)  # [1, N] mean over segments
    kern = conditional_kernel(tokens, normalise_relevance(cos, negate=True))
    got = ops.greedy_dpp(kern, T, impl="reference")
    assert torch.equal(got, want)  # the same tokens in the same selection order
    assert got[0].unique().numel() == T


def test_per_image_normalisation_equals_each_image_alone():
    """A batch of images is each image on its own (the authors normalise over the views of one image)."""
    tokens, img, txt = _tensors(3, B=3, N=25)
    cos = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1)[0]  # [3, N]
    got = ops.greedy_dpp(conditional_kernel(tokens, normalise_relevance(cos, True)), 7)
    for b in range(3):
        assert torch.equal(got[b], authors_select(tokens[b:b + 1], img[b:b + 1], txt, 7)[0])


def test_normalise_relevance():
    s = torch.tensor([[0.2, -0.1, 0.5, 0.0], [0.3, 0.3, 0.3, 0.3]])
    r = normalise_relevance(s, negate=True)
    torch.testing.assert_close(r[0], minmax(-s[0:1])[0])
    assert r[0].argmax() == 1 and r[0].argmin() == 2  # negated: the least similar is the most relevant
    torch.testing.assert_close(r[0].min(), torch.tensor(1e-6 / 0.6))
    assert torch.equal(r[1], torch.ones(4))  # constant scores: their formula divides by 0; here q = 1
    torch.testing.assert_close(normalise_relevance(s, negate=False)[0], minmax(s[0:1])[0])


def test_theta_option_and_plain_similarity():
    tokens, _, _ = _tensors(4, N=16)
    r = torch.rand(1, 16, generator=torch.Generator().manual_seed(0))
    sim = F.normalize(tokens, dim=-1) @ F.normalize(tokens, dim=-1).transpose(1, 2)
    torch.testing.assert_close(conditional_kernel(tokens, r), r[:, :, None] * sim * r[:, None, :])
    theta = 0.5
    q = torch.exp(theta / (2 * (1 - theta)) * r)  # their commented-out option: alpha = 0.5 at theta = 0.5
    torch.testing.assert_close(conditional_kernel(tokens, r, theta), q[:, :, None] * sim * q[:, None, :])
    torch.testing.assert_close(conditional_kernel(tokens, r, 0.0), sim)  # theta = 0: diversity only


def test_duplicates_and_relevance_steer_the_selection():
    """Conditional diversity on a hand-made case: an exact duplicate is never taken while a new direction
    remains, and among equally diverse tokens the more relevant one goes first."""
    x = torch.eye(4)[None].repeat(1, 1, 1)
    x = torch.cat([x, x[:, :1]], dim=1)  # token 4 duplicates token 0
    r = torch.tensor([[0.5, 0.6, 0.9, 0.7, 0.5]])
    order = ops.greedy_dpp(conditional_kernel(x, r), 5)[0].tolist()
    assert order[:4] == [2, 3, 1, 0] and order[4] == 4  # by relevance; the duplicate (gain 0) last
    assert order == authors_select(x, None, None, 4, relevance=r)[0].tolist() + [4]


def test_instruction_text():
    assert instruction_text("what is the colour of the circle ? ASSISTANT:") == QUESTIONS[0]
    assert instruction_text("What is shown?\nAnswer the question using a single word or phrase. ASSISTANT:") == \
        "What is shown?"
    q = "Hint text\nWhich one?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly."
    assert instruction_text(q + " ASSISTANT:") == "Hint text\nWhich one?\nA. cat\nB. dog"  # lines kept
    assert instruction_text("Is it red? Please answer yes or no. [/INST]") == "Is it red? Please answer yes or no."
    assert [instruction_text(p.split("<image>")[1]) for p in PROMPTS] == QUESTIONS  # the shared prompts
    assert instruction_text("how many ? ASSISTANT :") == QUESTIONS[1]  # as the tiny tokenizer decodes it


def test_declared_parameters():
    cls = get_pruner_class("cdpruner")
    assert cls is CDPruner and cls.stages == ("pre_llm",) and not cls.requires_cls
    assert cls.defaults == {"text_tower": None, "theta": None, "negate_relevance": None}
    with pytest.raises(ValueError, match="theta"):
        CDPruner(budget=4, theta=1.0)


# ---------------------------------------------------------------------------------------------
# the tiny LLaVA: CLIP text tower and fallback
# ---------------------------------------------------------------------------------------------
def _save_text_tower(folder, tokenizer, vision_hidden: int) -> None:
    """A tiny CLIPTextModelWithProjection + tokenizer + visual projection, the embedded model's layout."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=32, projection_dim=16,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    CLIPTextModelWithProjection(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_file({"weight": torch.randn(16, vision_hidden)}, str(folder / "visual_projection.safetensors"))


@pytest.fixture(scope="module")
def tower(tiny, tmp_path_factory):
    """(checkpoint folder holding text_tower/, the text tower folder)."""
    model, processor = tiny
    ckpt = tmp_path_factory.mktemp("ckpt")
    _save_text_tower(ckpt / "text_tower", processor.tokenizer, model.config.vision_config.hidden_size)
    return ckpt, ckpt / "text_tower"


def _authors_text_embeds(folder, question: str) -> torch.Tensor:
    """[M, P] their text embeddings: the tokenised question (ending in EOS) zero-padded to a multiple of
    the tower's context, cut into segments, each through the text tower with its projection."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    tok = AutoTokenizer.from_pretrained(folder)
    tt = CLIPTextModelWithProjection.from_pretrained(folder).eval()
    ids = tok(question)["input_ids"]
    if ids[-1] != tok.eos_token_id:
        ids = ids + [tok.eos_token_id]  # a CLIP tokenizer ends every text with EOS
    ctx_len = tt.config.max_position_embeddings
    n_seg = (len(ids) - 1) // ctx_len + 1
    pad = ctx_len * n_seg - len(ids)
    input_ids = torch.tensor(ids + [0] * pad).view(n_seg, ctx_len)
    mask = torch.tensor([1] * len(ids) + [0] * pad).view(n_seg, ctx_len)
    with torch.no_grad():
        return tt(input_ids=input_ids, attention_mask=mask).text_embeds


def _vision(model, pixel_values):
    """(patch features at the feature layer [B, N, Dv], projected tokens [B, N, Dt]) from HF's own modules."""
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_hidden_states=True)
        feats = out.hidden_states[model.config.vision_feature_layer][:, 1:]
        return feats, model.model.multi_modal_projector(feats)


def _run(model, inputs, **kw):
    with apply_pruner(model, "cdpruner", budget=BUDGET, **kw) as h:
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1]
        return logits, [k.tolist() for k in h.kept_indices], dict(h.info)


def test_text_tower_path_matches_the_authors_procedure(tiny, batch, tower):
    from safetensors.torch import load_file

    model, processor = tiny
    _, folder = tower
    _, kept, info = _run(model, batch, text_tower=str(folder), tokenizer=processor.tokenizer)
    assert info == {"cdpruner_relevance": "clip_text_tower", "text_tower": str(folder),
                    "cdpruner_negated_relevance": True}
    feats, tokens = _vision(model, batch["pixel_values"])
    proj = load_file(str(folder / "visual_projection.safetensors"))["weight"]
    with torch.no_grad():
        image_embeds = model.model.vision_tower.post_layernorm(feats) @ proj.T  # CLIP joint space
    for b, q in enumerate(QUESTIONS):
        want = authors_select(tokens[b:b + 1], image_embeds[b:b + 1], _authors_text_embeds(folder, q), BUDGET)
        assert kept[b] == sorted(want[0].tolist())


def test_text_tower_batch_equals_singles_and_auto_detection(tiny, batch, tower):
    model, processor = tiny
    ckpt, folder = tower
    both, kept, _ = _run(model, batch, text_tower=str(folder), tokenizer=processor.tokenizer)
    for i in range(2):
        one, kept_one, _ = _run(model, single(processor, i), text_tower=str(folder), tokenizer=processor.tokenizer)
        assert (one[0] - both[i]).abs().max() <= 1e-4 and kept_one == [kept[i]]
    old = model.name_or_path
    model.name_or_path = str(ckpt)  # what from_pretrained(folder) sets: <folder>/text_tower is found
    try:
        _, kept_auto, info = _run(model, batch, tokenizer=processor.tokenizer)
        assert info["cdpruner_relevance"] == "clip_text_tower" and info["text_tower"] == str(folder)
        assert kept_auto == kept
        _, _, info = _run(model, batch)  # a tower, but no tokenizer: no question text -> the fallback, said why
        assert info["cdpruner_relevance"] == "llm_embeddings" and "tokenizer" in info["cdpruner_relevance_note"]
        _, kept_forced, info = _run(model, batch, text_tower="llm_embeddings", tokenizer=processor.tokenizer)
        assert info == {"cdpruner_relevance": "llm_embeddings", "cdpruner_negated_relevance": False}
    finally:
        model.name_or_path = old
    _, kept_fb, _ = _run(model, batch, tokenizer=processor.tokenizer)
    assert kept_forced == kept_fb  # forcing the fallback = having no tower


def _fallback_relevance(model, input_ids, attention_mask, tokens, n_vis, negate=False):
    """Per sample [1, N]: mean cosine of each projected token to the LLM embeddings of the real prompt
    tokens after its image run (placeholders excluded), negated or not, then their min-max."""
    img_id = model.config.image_token_id
    out = []
    with torch.no_grad():
        emb = model.get_input_embeddings()(input_ids)
    for b in range(input_ids.shape[0]):
        start = int((input_ids[b] == img_id).nonzero()[0])
        pos = [p for p in range(start + n_vis, input_ids.shape[1])
               if attention_mask[b, p] and input_ids[b, p] != img_id]
        cos = F.normalize(tokens[b], dim=-1) @ F.normalize(emb[b, pos], dim=-1).T  # [N, n_text]
        s = cos.mean(-1)[None]
        out.append(minmax(-s if negate else s))
    return out


@pytest.mark.parametrize("negate", [None, True])
def test_fallback_matches_the_procedure_with_llm_embeddings(tiny, batch, negate):
    model, processor = tiny
    kw = {} if negate is None else {"negate_relevance": negate}
    _, kept, info = _run(model, batch, tokenizer=processor.tokenizer, **kw)  # no tower beside the tiny model
    assert info == {"cdpruner_relevance": "llm_embeddings", "cdpruner_negated_relevance": bool(negate)}
    _, tokens = _vision(model, batch["pixel_values"])
    rel = _fallback_relevance(model, batch["input_ids"], batch["attention_mask"], tokens, tokens.shape[1],
                              negate=bool(negate))
    for b in range(2):
        want = authors_select(tokens[b:b + 1], None, None, BUDGET, relevance=rel[b])
        assert kept[b] == sorted(want[0].tolist())


def test_theta_changes_the_kernel_through_apply_pruner(tiny, batch):
    model, processor = tiny
    _, kept, _ = _run(model, batch, theta=0.0)
    _, tokens = _vision(model, batch["pixel_values"])
    for b in range(2):  # theta = 0: q = 1, a pure similarity DPP
        sim = F.normalize(tokens[b:b + 1], dim=-1) @ F.normalize(tokens[b:b + 1], dim=-1).transpose(1, 2)
        assert kept[b] == sorted(ops.greedy_dpp(sim, BUDGET)[0].tolist())


def test_bad_text_tower_folder_names_the_parameter(tiny, batch):
    model, processor = tiny
    with pytest.raises(ValueError) as exc:
        _run(model, batch, text_tower="/nonexistent", tokenizer=processor.tokenizer)
    assert "text_tower" in str(exc.value) and "/nonexistent" in str(exc.value)
    assert not model._forward_pre_hooks


def test_llava_next_views_use_the_tower_and_batch_equals_singles(tmp_path):
    """LLaVA-NeXT: every view is pruned with the tower's relevance (the service on each view's patches);
    a batch of two images of different sizes equals each alone."""

    from mllm_adapters.tiny import build_tiny_llava_next

    model, processor = build_tiny_llava_next(seed=0, attn_implementation="eager")
    _save_text_tower(tmp_path / "tt", processor.tokenizer, model.config.vision_config.hidden_size)
    images = random_images([(40, 60), (30, 80)], 0)

    def inputs(idx):
        return processor(images=[images[i] for i in idx], text=[PROMPTS[i] for i in idx], return_tensors="pt",
                         padding=True)

    kw = dict(text_tower=str(tmp_path / "tt"), tokenizer=processor.tokenizer)
    both, kept, info = _run(model, inputs([0, 1]), **kw)
    assert info["cdpruner_relevance"] == "clip_text_tower" and info["cdpruner_negated_relevance"]
    assert [len(k) for k in kept] == [BUDGET, BUDGET]
    for i in range(2):
        one, kept_one, _ = _run(model, inputs([i]), **kw)
        assert (one[0] - both[i]).abs().max() <= 1e-4 and kept_one == [kept[i]]


# ---------------------------------------------------------------------------------------------
# the tiny Qwen2-VL / Qwen2.5-VL: merged units, the merger as the projector, the fallback relevance
# ---------------------------------------------------------------------------------------------
QWEN_PROMPTS = [f"USER: {TINY_QWEN_IMAGE} what is the colour of the circle ? ASSISTANT:",
                f"USER: {TINY_QWEN_IMAGE} how many ? ASSISTANT:"]


def test_qwen_runs_on_merged_units_with_the_fallback(qwen, monkeypatch):
    model, processor, images = qwen
    x = processor(images=images, text=QWEN_PROMPTS, return_tensors="pt", padding=True)
    seen = []
    orig = CDPruner.prune_pre_llm

    def spy(self, ctx):
        tokens = ctx.project(ctx.features)  # the PatchMerger's output: what the LLM receives
        seen.append((ctx.input_ids.clone(), ctx.attention_mask.clone(), tokens.detach().clone(), self.budget))
        return orig(self, ctx)

    monkeypatch.setattr(CDPruner, "prune_pre_llm", spy)
    with apply_pruner(model, "cdpruner", budget=5, tokenizer=processor.tokenizer) as h:
        with torch.no_grad():
            model(**x)
        kept = [k.tolist() for k in h.kept_indices]
        assert h.info["cdpruner_relevance"] == "llm_embeddings" and not h.info["cdpruner_negated_relevance"]
    assert len(seen) == 2 and [len(k) for k in kept] == [5, 5]
    for (ids, mask, tokens, budget), k in zip(seen, kept):
        rel = _fallback_relevance(model, ids, mask, tokens, tokens.shape[1])[0]
        assert k == sorted(authors_select(tokens, None, None, budget, relevance=rel)[0].tolist())


def test_qwen_refuses_a_text_tower_naming_the_method(qwen, tmp_path):
    model, processor, images = qwen
    x = processor(images=images[:1], text=QWEN_PROMPTS[:1], return_tensors="pt")
    with pytest.raises(ValueError) as exc:
        with apply_pruner(model, "cdpruner", budget=5, text_tower=str(tmp_path), tokenizer=processor.tokenizer):
            with torch.no_grad():
                model(**x)
    assert "cdpruner" in str(exc.value) and "text_tower" in str(exc.value)
    assert not model._forward_pre_hooks


def test_reference_op_is_the_default_on_cpu():
    """On CPU tensors the pruner's selection goes through the op's reference (the dispatch rule)."""
    tokens, _, _ = _tensors(5, N=12)
    r = torch.rand(1, 12, generator=torch.Generator().manual_seed(1))
    k = conditional_kernel(tokens, r)
    assert torch.equal(ops.greedy_dpp(k, 6), ops.greedy_dpp(k, 6, impl="reference"))
