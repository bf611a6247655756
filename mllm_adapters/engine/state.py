"""Per-call state of one forward pass (and the decode steps of its generate()), and a gather helper.

The engine keeps one `Forward` per thread (`Engine._fw`), so two threads sharing one pruned model
never see each other's masks, positions or kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

#: ``visual_index`` of an inert slot (a padding slot aligning ragged visual runs in a batch); merged
#: tokens, which have no grid index, are -1.
INERT = -2


def gather_seq(x: torch.Tensor, cols: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather positions ``cols`` [B, n] along sequence dim ``dim`` of x ([B or 1, ..., L, ...])."""
    if x.shape[0] != cols.shape[0]:
        x = x.expand(cols.shape[0], *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = cols.shape
    idx = cols.view(shape).expand(*[cols.shape[0] if d == 0 else (cols.shape[1] if d == dim else s)
                                    for d, s in enumerate(x.shape)])
    return x.gather(dim, idx)


@dataclass
class Forward:
    """Per-prefill state, reused by the decode steps that follow it."""

    phase: str = "prefill"
    prompt_len: int = 0  # sequence length entering the LLM at prefill
    orig_len: int = 0  # prompt length the caller passed (before prompt surgery)
    # prompt surgery of a uniform batch (every image one view of the same size): columns kept
    keep_cols_pre: torch.Tensor | None = None  # [B, L'] columns of the original prompt kept
    removed_pre: int = 0
    # prompt surgery of ragged runs (several views, extra slots, different sizes)
    src_cols: torch.Tensor | None = None  # [B, L'] original column of each LLM-prompt column (-1 = inert/pad)
    advancing: torch.Tensor | None = None  # [B, L'] True for columns that advance positions (= src_cols >= 0)
    removed: torch.Tensor | None = None  # [B] image tokens dropped before the LLM, per sample
    # LLM-stage state
    key_mask: torch.Tensor | None = None  # [B, L] real tokens in the LLM prompt
    visual_pos: torch.Tensor | None = None  # [B, Nv] positions of visual tokens in the current sequence
    visual_index: torch.Tensor | None = None  # [B, Nv] grid index (-1 merged, INERT for inert slots)
    visual_scores: torch.Tensor | None = None  # [B, Nv] scores the pre-LLM stage attached, if any
    instruction_pos: torch.Tensor | None = None  # [B, Ni] (-1 padded)
    visual_image: torch.Tensor | None = None  # [B, Nv] image (batch order) of each visual slot, -1 none
    image_samples: list[int] | None = None  # the sample of each image, in batch order (None: one per sample)
    cur_cols: torch.Tensor | None = None  # [B, Lc] prompt columns in the current sequence (None = all)
    layer_cols: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> prompt cols it caches
    full_kwargs: dict[str, Any] = field(default_factory=dict)  # mask/positions/RoPE of the full prompt
    cur_kwargs: dict[str, Any] | None = None  # the same sliced to cur_cols (None = not computed yet)
    attn_inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    attn_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its k_proj output [B, L, Hkv*hd]
    attn_caches: dict[int, Any] = field(default_factory=dict)  # layer -> the KV cache it writes (None: no cache)
    attn_values: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its v_proj output [B, L, Hkv*hd]
    captures: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    pruner_state: dict[str, Any] = field(default_factory=dict)
    vision_qkv: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # ViT layer -> its own q, k, v
    generators: list[torch.Generator] = field(default_factory=list)
    sample_runs: list[list[int]] | None = None  # per sample the token count of each of its images' runs
    # prompt columns the LLM stage turned into inert slots (fillers of samples keeping fewer tokens):
    hidden_cols: torch.Tensor | None = None  # [B, L] True = masked as keys from the layer it happened on
    layer_hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> hidden_cols on its cols
    # tokens an in-LLM stage inserted (`pruners.base.LLMDecision.merged`) get *virtual* columns appended to
    # the prompt's column space (prompt_len, prompt_len + 1, ...): key_mask and hidden_cols grow with them
    col_host: torch.Tensor | None = None  # [B, L + M] the prompt column standing in for each column's
    # mask row/column and original position (itself for prompt columns; None until a token is merged)
    # opt-in diagnostics (`engine/diagnostics.py`; only while ``handle.record_diagnostics``)
    diag: Any = None  # this prefill's `PrefillDiagnostics`
    diag_visual: torch.Tensor | None = None  # [B, L] visual columns of the LLM prompt
    diag_real: torch.Tensor | None = None  # [B, L] its real tokens (the forward's attention mask)
    diag_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its k_proj output, until used
