"""Prompt surgery: the run of image placeholders shrunk (or padded with inert slots) to the tokens kept,
positions renumbered, and generate()'s decode-step bookkeeping translated to the shorter prompt.

Two shapes of batch:
- *uniform* (every image one full view of the same size, LLaVA-1.5): each run keeps its first n
  placeholders; positions are compact (as if the image had n tokens).
- *ragged* (several views, extra slots, or images of different sizes, LLaVA-NeXT): each image run
  is rewritten to a common width W, real tokens first then *inert slots* (masked out as keys
  everywhere, not advancing RoPE positions, scoring 0 in attention rows and TTV and -inf in carried
  scores, so a method ranks them last); the samples are re-padded on the left. W is at least the
  largest count an in-LLM method keeps at any layer, so an image with fewer tokens keeps them all.
  Every real token keeps the position it has in its own unpruned prompt minus the image tokens
  dropped before it: a batch of two equals two batches of one.

Part of `Engine` (a mixin).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mllm_adapters.engine.layout import ImageLayout
from mllm_adapters.engine.state import INERT
from pruners._schedule import ProgressiveSchedule


class PromptSurgery:
    """Placeholder runs, positions and decode bookkeeping."""

    def _image_runs(self, input_ids: torch.Tensor, layouts: list[ImageLayout]) -> torch.Tensor:
        """[B] start of each sample's image run; checks one contiguous run of its layout's length per sample."""
        is_img = input_ids == self.spec.image_token_id
        counts = is_img.sum(1).tolist()
        expected = [lay.n_packed for lay in layouts]
        if len(expected) != input_ids.shape[0] or counts != expected:
            raise ValueError(
                f"each sample must hold exactly one image whose run of placeholder tokens matches its visual-token "
                f"count: expected {expected}, got {counts}"
            )
        starts = is_img.float().argmax(1)
        for b, n in enumerate(expected):
            s = int(starts[b])
            if not bool(is_img[b, s : s + n].all()):
                raise ValueError(f"sample {b}: the {n} image placeholders are not one contiguous run")
        return starts

    @staticmethod
    def _instruction_positions(vis_pos: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """[B, Ni] positions of real tokens after the image run (-1 padded on the right)."""
        B, L = key_mask.shape
        ar = torch.arange(L, device=key_mask.device).expand(B, L)
        after = key_mask & (ar > vis_pos[:, -1:])
        n = int(after.sum(1).max()) if B else 0
        out = torch.full((B, n), -1, dtype=torch.long, device=key_mask.device)
        for b in range(B):
            p = ar[b][after[b]]
            out[b, : p.numel()] = p
        return out

    def _question_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        after: Sequence[int] | torch.Tensor) -> list[str] | None:
        """Per sample, the decoded prompt text after column ``after[b]`` (the question), or None without a tokenizer."""
        if self.tokenizer is None:
            return None
        out = []
        for b in range(input_ids.shape[0]):
            a = int(after[b])
            ids = input_ids[b, a:][attention_mask[b, a:].bool()]
            out.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return out

    def _advancing(self) -> torch.Tensor | None:
        """[B, L] True for LLM-prompt columns that advance the RoPE position count; None when all do
        (only a ragged rewrite inserts inert slots, which must never shift the tokens after them)."""
        return self._fw.advancing

    # ---- uniform batch -------------------------------------------------------------------------
    def _shrink_uniform(self, kwargs: dict[str, Any], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        image_start: torch.Tensor, tokens: torch.Tensor, token_index: torch.Tensor,
                        token_scores: torch.Tensor | None) -> None:
        """Keep the first n placeholders of each run (n = kept tokens, the same for every sample), feed
        the projected tokens, and set up the LLM-stage bookkeeping."""
        image_features = self.spec.project(tokens)  # [B, n, Dt]
        n_keep = tokens.shape[1]
        n_all = self.info.num_visual_tokens
        B, L = input_ids.shape
        ar = torch.arange(L, device=input_ids.device).expand(B, L)
        in_drop = (ar >= (image_start + n_keep)[:, None]) & (ar < (image_start + n_all)[:, None])
        keep_cols = ar[~in_drop].view(B, L - (n_all - n_keep))  # [B, L']
        kwargs["input_ids"] = input_ids.gather(1, keep_cols)
        kwargs["attention_mask"] = attention_mask.gather(1, keep_cols)
        if kwargs.get("position_ids") is not None:
            pos = kwargs["position_ids"]
            shift = in_drop.long().cumsum(1)  # dropped columns up to each column
            kwargs["position_ids"] = (pos - shift).gather(1, keep_cols) if pos.dim() == 2 else pos
        self.spec.feed_features(kwargs, list(image_features))
        fw = self._fw
        fw.orig_len = L
        fw.removed_pre = n_all - n_keep
        fw.keep_cols_pre = keep_cols if n_keep < n_all else None
        fw.prompt_len = keep_cols.shape[1]
        self.handle.kept_indices = [token_index[b][token_index[b] >= 0] for b in range(B)]
        self.handle.token_counts["merged"] = int((token_index[0] < 0).sum())
        vis_pos = (image_start[:, None] + torch.arange(n_keep, device=input_ids.device)[None, :])  # [B, n]
        fw.visual_pos = vis_pos
        fw.visual_index = token_index
        fw.visual_scores = token_scores
        fw.key_mask = kwargs["attention_mask"].bool()
        fw.instruction_pos = self._instruction_positions(vis_pos, fw.key_mask)
        self.handle.token_counts["llm_visual"] = [n_keep] * self.info.llm_num_layers

    # ---- ragged runs ---------------------------------------------------------------------------
    def _llm_width_floor(self) -> int:
        """Largest visual-token count the in-LLM method keeps at any pruning layer (0 without one)."""
        p = self.pruner
        if "llm" not in p.stages or p.keeps_all or not self._llm_layers:
            return 0
        if isinstance(p, ProgressiveSchedule):
            return max(int(p.count_at(k)) for k in p.llm_layers())
        return int(p.budget or 0)

    def _rewrite_prompt(
        self,
        kwargs: dict[str, Any],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        starts: torch.Tensor,
        layouts: list[ImageLayout],
        per_image: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]],
    ) -> None:
        """Feed the assembled visual runs: shrink/pad each image run to a common width W (inert slots
        after the real tokens), re-pad the samples on the left, and set positions so that every real
        token keeps the position it has in its own unpruned prompt minus the image tokens dropped."""
        fw = self._fw
        dev = input_ids.device
        B, L = input_ids.shape
        n_real = [int(t[0].shape[0]) for t in per_image]
        W = max(max(n_real), self._llm_width_floor())
        lens = [L - lay.n_packed + W for lay in layouts]
        Lp = max(lens)
        src_rows = []
        for b, lay in enumerate(layouts):
            s, N, n = int(starts[b]), lay.n_packed, n_real[b]
            if n > N:
                raise ValueError(f"method {self.pruner.name!r} produced {n} tokens for an image of {N}")
            row = ([-1] * (Lp - lens[b]) + list(range(s)) + list(range(s, s + n)) + [-1] * (W - n)
                   + list(range(s + N, L)))
            src_rows.append(row)
        src = torch.tensor(src_rows, dtype=torch.long, device=dev)  # [B, L']
        real = src >= 0
        g = src.clamp(min=0)
        pad_id = self.spec.pad_token_id()
        new_ids = input_ids.gather(1, g).masked_fill(~real, pad_id)
        new_mask = attention_mask.gather(1, g) * real.to(attention_mask.dtype)
        pos = kwargs.get("position_ids")
        if pos is not None and pos.dim() != 2:
            raise ValueError(f"position_ids must be [B, L] for pruning, got shape {tuple(pos.shape)}")
        base = pos.expand(B, L) if pos is not None else torch.arange(L, device=dev).expand(B, L)
        s_t = starts.to(dev)[:, None]
        n_t = torch.tensor(n_real, device=dev)[:, None]
        N_t = torch.tensor([lay.n_packed for lay in layouts], device=dev)[:, None]
        dropped_before = (g - (s_t + n_t)).clamp(min=0).minimum(N_t - n_t)  # dropped image columns before each
        new_pos = torch.where(real, base.gather(1, g) - dropped_before, torch.zeros_like(g))
        kwargs["input_ids"] = new_ids
        kwargs["attention_mask"] = new_mask
        kwargs["position_ids"] = new_pos

        # Project and place newlines; one [n_b, Dt] tensor per image for the model's own scatter.
        feats_out, vis_index, vis_scores = [], [], []
        # A method with both stages may read the pre-LLM scores in the LLM (VFlowOpt): an image that
        # reached the LLM whole carries zeros (it keeps every token there: each count >= budget >= its run).
        has_scores = any(t[3] is not None for t in per_image) or {"pre_llm", "llm"} <= set(self.pruner.stages)
        extra = self.spec.extra_slot_embedding()
        for tok, is_nl, index, scores in per_image:
            x = self.spec.project(tok[None])[0]  # [n, Dt]
            if bool(is_nl.any()):
                x = torch.where(is_nl[:, None], extra.to(x.dtype).expand_as(x), x)
            feats_out.append(x)
            n = x.shape[0]
            vis_index.append(torch.cat([index, index.new_full((W - n,), INERT)]))
            if has_scores:
                sc = scores if scores is not None else torch.zeros(n, device=x.device)
                vis_scores.append(torch.cat([sc.float(), sc.new_full((W - n,), float("-inf"))]))
        self.spec.feed_features(kwargs, feats_out)

        fw.orig_len = L
        fw.prompt_len = Lp
        fw.src_cols = src
        fw.advancing = real
        fw.removed = (N_t - n_t)[:, 0]
        run_start = torch.tensor([Lp - lens[b] + int(starts[b]) for b in range(B)], device=dev)
        fw.visual_pos = run_start[:, None] + torch.arange(W, device=dev)[None]  # [B, W]
        fw.visual_index = torch.stack(vis_index)
        fw.visual_scores = torch.stack(vis_scores) if has_scores else None
        fw.key_mask = new_mask.bool()
        fw.instruction_pos = self._instruction_positions(fw.visual_pos, fw.key_mask)
        self.handle.kept_indices = [i[i >= 0] for i in fw.visual_index]
        n_layers = self.info.llm_num_layers
        counts = self.handle.token_counts
        counts["merged"] = max(int((i == -1).sum()) for i in fw.visual_index)
        counts["llm_visual"] = [max(n_real)] * n_layers
        counts["llm_visual_per_sample"] = [[n] * n_layers for n in n_real]
        counts["llm_visual_width"] = [W] * n_layers
        counts["projector_per_sample"] = list(n_real)  # newline slots of a whole run are projected too


    # ---- decode steps ----------------------------------------------------------------------------
    def _decode_step_inputs(self, kwargs: dict[str, Any]) -> None:
        """Translate generate()'s full-length bookkeeping (original prompt length) to the rewritten prompt."""
        fw = self._fw
        if fw.src_cols is not None:
            self._decode_step_ragged(kwargs)
        elif fw.keep_cols_pre is not None:
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() == 2 and mask.shape[1] >= fw.orig_len:
                kwargs["attention_mask"] = torch.cat(
                    [mask[:, : fw.orig_len].gather(1, fw.keep_cols_pre), mask[:, fw.orig_len :]], dim=1
                )
            pos = kwargs.get("position_ids")
            if pos is not None:
                kwargs["position_ids"] = pos - fw.removed_pre

    def _decode_step_ragged(self, kwargs: dict[str, Any]) -> None:
        fw = self._fw
        ids = kwargs.get("input_ids")
        n_new = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        seen = kwargs["past_key_values"].get_seq_length()  # layer 0 caches the whole rewritten prompt
        mask = kwargs.get("attention_mask")
        if mask is None:
            # generate() drops an all-ones mask; the inert slots and added pads must stay masked.
            if not bool(fw.advancing.all()):
                B = fw.src_cols.shape[0]
                new = torch.ones(B, seen - fw.prompt_len + n_new, dtype=torch.long, device=fw.src_cols.device)
                kwargs["attention_mask"] = torch.cat([fw.advancing.long(), new], dim=1)
        elif mask.dim() == 2 and mask.shape[1] >= fw.orig_len:
            head = mask[:, : fw.orig_len].gather(1, fw.src_cols.clamp(min=0)) * fw.advancing.to(mask.dtype)
            kwargs["attention_mask"] = torch.cat([head, mask[:, fw.orig_len :]], dim=1)
        pos = kwargs.get("position_ids")
        if pos is not None:
            kwargs["position_ids"] = pos - fw.removed[:, None]
            return
        # No positions given: the unpruned model would number new tokens from the cache length.
        dev = fw.src_cols.device
        orig_seen = seen - fw.prompt_len + fw.orig_len
        kwargs["position_ids"] = orig_seen + torch.arange(n_new, device=dev)[None] - fw.removed[:, None]
