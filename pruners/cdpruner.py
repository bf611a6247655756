"""`cdpruner` (CDPruner, "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs", Zhang et al., arXiv 2506.10967, NeurIPS'25): keep the visual tokens that maximise
the determinant of an instruction-conditioned similarity kernel.

Written from a reading of the authors' code (github.com/Theia-4869/CDPruner, the ``[CDPruner]``
parts of ``llava/model/llava_arch.py`` ``LlavaMetaForCausalLM.encode_images`` and of
``llava/model/multimodal_encoder/clip_encoder.py`` ``CLIPVisionTower.forward``); docs/methods/cdpruner.md
maps every step to it and lists the deviations. Pre-LLM, training-free, no [CLS] needed:

1. Similarity S: cosine between the projected visual tokens (``ctx.project(ctx.features)``, the
   tokens the LLM receives: after LLaVA's projector, after Qwen's PatchMerger), in fp32.
2. Relevance r: per token, the cosine between its feature through the vision tower's post-layernorm
   and the CLIP visual projection and the CLIP text embedding of the instruction
   (``ctx.text_patch_similarity``, the engine's text-tower service), negated as the authors' code
   does (``negate_relevance``), then min-max normalised per image: (r - min + 1e-6) / (max - min).
   Without a text tower (none given or beside the checkpoint, a family with no CLIP joint space such
   as Qwen, or no question text because no tokenizer was given) the fallback ``llm_embeddings`` is
   used: the mean cosine between each projected visual token and the LLM input embeddings of the
   prompt tokens after the image (not negated by default). ``PreLLMDecision.info`` records which.
3. Kernel L = diag(q) S diag(q) with q = r (the authors' released code), or q = exp(alpha r),
   alpha = theta / (2 (1 - theta)), when ``theta`` is given (their commented-out option).
4. Greedy MAP inference of the DPP with kernel L selects ``budget`` tokens (the ``greedy_dpp`` op,
   Chen et al.'s fast greedy with an incremental Cholesky factor, as their loop); the engine puts
   them in raster order, as their index mask does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pruners import ops
from pruners.base import PreLLMContext, PreLLMDecision, Pruner
from pruners.params import Param
from pruners.registry import register_pruner

FALLBACK = "llm_embeddings"
TOWER = "clip_text_tower"
#: the answer-format lines the authors' eval scripts remove from the question before the text tower
#: (llava/eval/model_vqa_loader.py, model_vqa_science.py; the Chinese one is MMBench-CN's)
FORMAT_LINES = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "请直接回答选项字母。",
)
#: chat-role markers: the question text handed to the pruner ends before the assistant turn
ROLE_MARKERS = ("ASSISTANT:", "ASSISTANT :", "Assistant:", "[/INST]", "<|im_end|>")
#: the authors' offset in the min-max normalisation of the relevance
REL_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# pure helpers (tested on hand-made tensors)
# ---------------------------------------------------------------------------------------------
def instruction_text(text: str) -> str:
    """The question the authors embed: the user turn's text after the image, without the chat
    template's assistant turn and without the answer-format instructions their scripts strip."""
    for marker in ROLE_MARKERS:
        if marker in text:
            text = text.split(marker)[0]
    for line in FORMAT_LINES:
        text = text.replace(line, "")
    return text.strip()


def normalise_relevance(similarity: torch.Tensor, negate: bool) -> torch.Tensor:
    """[B, N] relevance in (0, 1] from [B, N] token-instruction cosines: negated when ``negate``
    (the authors' ``-relevance``), then (r - min + 1e-6) / (max - min) per image. An image whose
    scores are all equal gets relevance 1 everywhere (their formula divides by zero there)."""
    r = -similarity.float() if negate else similarity.float()
    lo = r.min(dim=1, keepdim=True).values
    span = r.max(dim=1, keepdim=True).values - lo
    return torch.where(span > 0, (r - lo + REL_EPS) / span.clamp(min=torch.finfo(torch.float32).tiny), 1.0)


def conditional_kernel(tokens: torch.Tensor, relevance: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """[B, N, N] kernel q_i * cos(x_i, x_j) * q_j of tokens [B, N, D] (fp32) and relevance [B, N]:
    q = relevance, or exp(alpha * relevance) with alpha = theta / (2 (1 - theta)) when theta is given."""
    x = F.normalize(tokens.float(), dim=-1)  # [B, N, D]
    sim = x @ x.transpose(1, 2)  # [B, N, N]
    q = relevance.float()
    if theta is not None:
        q = torch.exp(theta / (2.0 * (1.0 - theta)) * q)
    return q[:, :, None] * sim * q[:, None, :]


def llm_instruction_similarity(ctx: PreLLMContext, tokens: torch.Tensor) -> torch.Tensor:
    """[B, N] mean cosine between each projected visual token (``tokens`` [B, N, Dt]) and the LLM input
    embeddings of the sample's real prompt tokens after the image run (other images' placeholders
    excluded)."""
    emb = ctx.text_embeddings().float()  # [B, L, Dt]
    ids = ctx.input_ids
    B, L = ids.shape
    n = ctx.info.num_visual_tokens
    start = ctx.image_start.to(ids.device).long()  # [B]
    ar = torch.arange(L, device=ids.device)[None]
    placeholder = ids.gather(1, start[:, None])  # [B, 1] the image token id
    after = (ar >= (start[:, None] + n)) & ctx.attention_mask.bool() & (ids != placeholder)  # [B, L]
    w = after.float().to(emb.device)
    text = (F.normalize(emb, dim=-1) * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)  # [B, Dt]
    vis = F.normalize(tokens.float(), dim=-1)  # [B, N, Dt]
    return (vis * text[:, None]).sum(-1)  # = mean over the text tokens of the cosines


# ---------------------------------------------------------------------------------------------
@register_pruner("cdpruner")
class CDPruner(Pruner):
    """Conditional-DPP selection of ``budget`` visual tokens (instruction relevance x similarity)."""

    stages = ("pre_llm",)
    parameters = {
        "text_tower": Param(str, None, doc=f"CLIP text tower folder, {FALLBACK!r} (always the fallback), or null "
                                           f"(auto: <model>/text_tower, else the fallback)"),
        "theta": Param(float, None, low=0, high=1, high_inclusive=False, search=("float", 0.0, 0.9),
                       doc="relevance weight of the kernel, q = exp(theta / (2 (1 - theta)) r); null: q = r "
                           "(the authors' released default)"),
        "negate_relevance": Param(bool, None, doc="negate the token-instruction cosine before normalising; null: "
                                                  "true with the CLIP text tower (the authors' code), false for "
                                                  "the fallback"),
    }

    # ---- signals -----------------------------------------------------------------------------
    def instruction_similarity(self, ctx: PreLLMContext, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """([B, N] cosine between each token and the instruction, info naming the encoder used);
        ``tokens`` [B, N, Dt] are the projected visual tokens (the fallback compares them)."""
        tt = self.params["text_tower"]
        found = None
        if tt != FALLBACK:
            if ctx.text_patch_similarity is not None:  # the engine's CLIP text tower service
                found = ctx.text_patch_similarity(tt, instruction_text)
            elif tt is not None:
                raise ValueError(
                    f"cdpruner: text_tower={tt!r} was given, but this model's adapter offers no CLIP text tower "
                    f"service (PreLLMContext.text_patch_similarity; e.g. Qwen's vision tower has no CLIP joint "
                    f"space); use text_tower=null or {FALLBACK!r} for the LLM-embedding relevance")
        if found is not None and found.similarity is not None:
            return found.similarity, {"cdpruner_relevance": TOWER, "text_tower": found.folder}
        info: dict[str, Any] = {"cdpruner_relevance": FALLBACK}
        if found is not None:
            info["cdpruner_relevance_note"] = ("a text tower was found but no tokenizer was given to apply_pruner, "
                                               "so the question text was unavailable")
        return llm_instruction_similarity(ctx, tokens), info

    # ---- pruning -----------------------------------------------------------------------------
    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        p = self.params
        tokens = ctx.project(ctx.features)  # [B, N, Dt] what the LLM receives
        sim, info = self.instruction_similarity(ctx, tokens)  # [B, N]
        negate = p["negate_relevance"]
        if negate is None:
            negate = info["cdpruner_relevance"] == TOWER
        relevance = normalise_relevance(sim, negate)  # [B, N]
        kernel = conditional_kernel(tokens, relevance, p["theta"])  # [B, N, N]
        k = min(self.budget, ctx.features.shape[1])
        keep = ops.greedy_dpp(kernel, k)  # [B, k] selection order; the engine sorts it into raster order
        info["cdpruner_negated_relevance"] = bool(negate)
        return PreLLMDecision(keep=keep, info=info)
