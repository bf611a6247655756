"""Stage-2 grounding losses on one LLM layer's attention (the mass on the relevant image tokens, or
per-head targets through the sink token)."""

from __future__ import annotations

import torch

from benchmarks.embedded import model as M
from benchmarks.embedded.train.data import SINK


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
