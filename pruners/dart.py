"""`dart` (DART, EMNLP 2025): *Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More*, Wen et al., arXiv 2502.11494. Reference code: github.com/ZichenWen1/DART,
`llava/model/language_model/modeling_llama_self.py` (class ``DART``: ``forward`` and
``get_retained_image_token``). Written from a reading of that code; nothing is copied.
docs/methods/dart.md records the mapping, the count and the deviations.

Stage ``llm``, before decoder layer K (``layer``), from what layer K-1 produced: the image and text
tokens with the largest key L1 norms are *pivots* (image pivots kept, text pivots only steer); each
pivot in turn (the authors' set order) takes its share of the remaining image tokens *least*
cosine-similar to it on the final-RMSNorm hidden states (``ctx.final_norm``). Contract: ``budget``
tokens per image in all, image pivots included (the authors' "128" is ``budget=132``). Each sample
runs on its own real tokens and count; its selection order is a per-sample priority handed to
`LLMLayerContext.keep_top`, so filler slots follow its contract.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pruners.base import LLMLayerContext, ModelInfo, Pruner
from pruners.params import POSITIONS, Param, check_decoder_layer
from pruners.registry import register_pruner

#: ``key_norm`` choices: how a key's L1 norm is taken (`key_l1`)
KEY_NORMS = ("rope_invariant", "rotated")


def key_l1(k: torch.Tensor, how: str = "rope_invariant") -> torch.Tensor:
    """[B, L] L1 norm of every token's key over all heads, from RoPE'd keys ``k`` [B, H, L, hd].

    ``"rotated"``: the plain L1 of the rotated key (the authors' ``torch.norm(k, p=1, dim=-1)``); it
    depends on the absolute position each key was rotated to. ``"rope_invariant"``: each rotation pair
    (i, i + hd/2), which RoPE turns as one 2-D vector (HF's ``rotate_half``, Llama and Qwen2), counts
    with its length, so the norm is the same at every position (the L1 norm of the key seen as hd/2
    complex numbers; the authors' value is that times a phase factor in [1, sqrt 2] per pair)."""
    k = k.float()
    if how == "rotated":
        return k.abs().sum(dim=(1, 3))
    if how != "rope_invariant":
        raise ValueError(f"dart: key_norm={how!r}; accepted: one of {KEY_NORMS}")
    half = k.shape[-1] // 2
    return torch.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2).sum(dim=(1, 3))


def _desc(x: torch.Tensor) -> torch.Tensor:
    """Indices of ``x`` by descending value, ties to the lower index (deterministic, unlike topk)."""
    return torch.sort(x, descending=True, stable=True).indices


def pivot_visit_order(image_ids: list[int], text_ids: list[int]) -> list[int]:
    """The order in which the authors' loop visits the pivots: ``list(set(image_ids + text_ids))``.

    ``image_ids`` / ``text_ids`` are the pivots' positions in the sample's own (unpadded) sequence, each
    list by descending key norm, as the authors build them; the result is those positions in CPython's
    set iteration order (which depends on the values, not only on the insertion order)."""
    return list(set(image_ids + text_ids))


def dart_shares(count: int, n_image_pivots: int, n_pivots: int) -> list[int]:
    """Picks per pivot, in visit order: ``count - n_image_pivots`` split as evenly as possible over
    ``n_pivots`` pivots, the first ones taking one more."""
    share, extra = divmod(max(count - n_image_pivots, 0), n_pivots)
    return [share + (1 if r < extra else 0) for r in range(n_pivots)]


def dart_selection(
    image_norm: torch.Tensor,
    image_hidden: torch.Tensor,
    text_norm: torch.Tensor,
    text_hidden: torch.Tensor,
    count: int,
    pivot_image_tokens: int,
    pivot_text_tokens: int,
    image_ids: list[int] | None = None,
    text_ids: list[int] | None = None,
) -> list[int]:
    """DART's kept image tokens of one sample, in selection order: image pivots (by descending key
    norm), then each pivot's picks in visit order (each pivot's by ascending cosine similarity).

    image_norm [n], image_hidden [n, D]: the image tokens' key L1 norms and hidden states;
    text_norm [m], text_hidden [m, D]: the same for the tokens after the image;
    count: tokens to keep (all n when count >= n);
    image_ids [n], text_ids [m]: the tokens' positions in the sample's own sequence, which fix the
    pivots' visit order (`pivot_visit_order`); default: image tokens 0..n-1, then the text tokens.
    Returns ``count`` distinct indices into the n image tokens.
    """
    n, m = image_norm.numel(), text_norm.numel()
    if count >= n:
        return list(range(n))
    if count <= 0:
        return []
    image_ids = list(range(n)) if image_ids is None else [int(i) for i in image_ids]
    text_ids = list(range(n, n + m)) if text_ids is None else [int(i) for i in text_ids]
    img_piv = _desc(image_norm.float())[: min(pivot_image_tokens, count)].tolist()
    txt_piv = _desc(text_norm.float())[: min(pivot_text_tokens, m)].tolist()
    vector = {image_ids[j]: image_hidden[j] for j in img_piv}
    vector.update({text_ids[j]: text_hidden[j] for j in txt_piv})
    order = pivot_visit_order([image_ids[j] for j in img_piv], [text_ids[j] for j in txt_piv])
    hidden = image_hidden.float()
    available = torch.ones(n, dtype=torch.bool, device=hidden.device)
    available[img_piv] = False
    kept = list(img_piv)
    for key, q in zip(order, dart_shares(count, len(img_piv), len(order))):
        if q == 0:
            continue
        cos = F.cosine_similarity(vector[key].float()[None, :], hidden, dim=-1)  # [n]
        cos = cos.masked_fill(~available, float("inf"))
        chosen = torch.sort(cos, stable=True).indices[:q]  # least similar first, ties to the lower index
        available[chosen] = False
        kept += chosen.tolist()
    return kept


@register_pruner("dart")
class DART(Pruner):
    stages = ("llm",)
    #: 2: cosine on the final-norm hidden states, as the authors' code (1, never released: raw states)
    version = 2
    parameters = {
        "layer": Param(int, 2, doc="decoder layer K: pivots and similarities from layer K-1, layers K.. see "
                                   "only the kept tokens (1..L-1)"),
        "pivot_image_tokens": Param(int, 4, low=1, doc="image pivots: the image tokens with the largest L1 key "
                                                       "norm at layer K-1 (kept)"),
        "pivot_text_tokens": Param(int, 4, low=0, doc="text pivots: the tokens after the image with the largest "
                                                      "L1 key norm at layer K-1 (not kept: visual pruning only)"),
        "key_norm": Param(str, "rope_invariant", choices=KEY_NORMS,
                          doc="pivot score: 'rope_invariant' (L1 over RoPE's rotation pairs, each pair's "
                              "length: position-free) or 'rotated' (the authors' L1 of the RoPE'd key at the "
                              "model's own positions)"),
        "positions": Param(str, "original", choices=POSITIONS, doc="RoPE positions of the kept tokens"),
    }

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        check_decoder_layer("dart", self.params["layer"], info.llm_num_layers)

    def llm_layers(self) -> list[int]:
        return [self.params["layer"]]

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor:
        layer = self.params["layer"]
        _, k, _ = ctx.layer_qkv(layer - 1, "last")  # k [B, Hkv, Lc, hd], RoPE applied
        norm = key_l1(k, self.params["key_norm"])  # [B, Lc]
        hs = ctx.hidden_states if ctx.final_norm is None else ctx.final_norm(ctx.hidden_states)  # the authors' norm(h)
        B, nv = ctx.visual_pos.shape
        real = ctx.key_mask.gather(1, ctx.visual_pos)  # [B, Nv]
        own = ctx.key_mask.long().cumsum(1) - 1  # [B, Lc] position in the sample's own sequence
        count = self.llm_keep_count(layer)
        counts = ctx.keep_counts.tolist() if ctx.keep_counts is not None else [count] * B
        priority = torch.full((B, nv), -1.0, device=hs.device)  # real tokens not picked rank below every pick
        for b in range(B):
            slots = real[b].nonzero().flatten()
            c = min(int(counts[b]), slots.numel())
            if c == 0:
                continue
            vpos = ctx.visual_pos[b, slots]
            tpos = ctx.instruction_pos[b]
            tpos = tpos[tpos >= 0]
            picked = dart_selection(norm[b, vpos], hs[b, vpos], norm[b, tpos], hs[b, tpos], c,
                                    self.params["pivot_image_tokens"], self.params["pivot_text_tokens"],
                                    own[b, vpos].tolist(), own[b, tpos].tolist())
            rank = torch.arange(len(picked), 0, -1, dtype=priority.dtype, device=hs.device)
            priority[b, slots[picked]] = rank
        return ctx.keep_top(priority, count)
