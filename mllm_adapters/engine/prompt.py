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

from mllm_adapters.engine.layout import ImageLayout, ImageRun
from mllm_adapters.engine.state import INERT


class PromptSurgery:
    """Placeholder runs, positions and decode bookkeeping."""

    def _image_runs(self, input_ids: torch.Tensor, layouts: list[ImageLayout]) -> list[ImageRun]:
        """Every image of the batch in order, with its sample and the start of its placeholder run.

        Images are assigned to samples in batch order (as the model scatters features): each sample's
        placeholders must be exactly the runs of its images, each run contiguous and as long as its
        layout's packed run. A sample may hold several images or none."""
        is_img = input_ids == self.spec.image_token_id  # [B, L]
        counts = is_img.sum(1).tolist()
        runs: list[ImageRun] = []
        j = 0
        for b, c in enumerate(counts):
            cols = is_img[b].nonzero()[:, 0].tolist()
            used = 0
            while used < c and j < len(layouts):
                n = layouts[j].n_packed
                span = cols[used : used + n]
                if len(span) < n or span[-1] - span[0] != n - 1:
                    raise ValueError(
                        f"sample {b}: image {j}'s {n} placeholder tokens are not one contiguous run "
                        f"(placeholders per sample {counts}, tokens per image {[lay.n_packed for lay in layouts]})"
                    )
                runs.append(ImageRun(b, span[0], layouts[j]))
                used, j = used + n, j + 1
            if used != c:
                break
        expected = [lay.n_packed for lay in layouts]
        if j != len(layouts) or sum(counts) != sum(expected) or sum(r.n_packed for r in runs) != sum(counts):
            raise ValueError(
                f"the prompts' image placeholder tokens do not match the images: placeholders per sample {counts}, "
                f"tokens per image (in batch order) {expected}"
            )
        return runs

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
        vis_pos = (image_start[:, None] + torch.arange(n_keep, device=input_ids.device)[None, :])  # [B, n]
        fw.visual_pos = vis_pos
        fw.visual_index = token_index
        fw.visual_scores = token_scores
        fw.key_mask = kwargs["attention_mask"].bool()
        fw.instruction_pos = self._instruction_positions(vis_pos, fw.key_mask)
        n_layers = self.info.llm_num_layers
        for b, c in enumerate(self.handle.token_counts):
            c.merged = int((token_index[b] < 0).sum())
            c.llm_visual = [n_keep] * n_layers
        self.handle.batch_counts.llm_visual_width = [n_keep] * n_layers

    # ---- ragged runs ---------------------------------------------------------------------------
    def _rewrite_prompt(
        self,
        kwargs: dict[str, Any],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        runs: list[ImageRun],
        per_image: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]],
    ) -> None:
        """Feed the assembled visual runs: shrink/pad each image run to a common width W (inert slots
        after the real tokens), re-pad the samples on the left, and set positions so that every real
        token keeps the position it has in its own unpruned prompt minus the image tokens dropped.

        A sample may hold several images, or none. With an in-LLM method every sample has V visual slots,
        V the most visual tokens any sample has: its images' tokens, each run where its placeholders were,
        then V minus their count inert slots after its last image (a sample without an image: V inert
        slots after its padding). A sample with several images has text between its runs, so its visual
        positions are not one span; the in-LLM stage ranks all of them together (one budget per image,
        summed over the sample's images)."""
        fw = self._fw
        dev = input_ids.device
        B, L = input_ids.shape
        n_real = [int(t[0].shape[0]) for t in per_image]
        for run, n in zip(runs, n_real):
            if n > run.n_packed:
                raise ValueError(f"method {self.pruner.name!r} produced {n} tokens for an image of {run.n_packed}")
        of_sample = [[j for j, r in enumerate(runs) if r.sample == b] for b in range(B)]
        llm_stage = "llm" in self.pruner.stages and not self.pruner.keeps_all and bool(self._llm_layers)
        W = max(n_real, default=0)  # without an in-LLM stage each image's run is padded to W
        total = [sum(n_real[j] for j in js) for js in of_sample]  # visual tokens per sample
        V = max(total, default=0)  # with one: each sample's visual slots (= W when each has one image)
        rows, run_at = [], []  # per sample: source columns (-1 = inert/pad), where its visual run starts
        image_at = [0] * len(runs)  # per image: where its run starts in its sample's row (before left padding)
        inert_at = [0] * B  # per sample (in-LLM stage): where its V - total inert slots start in its row
        for b in range(B):
            row: list[int] = []
            at = None
            cur = 0
            for j in of_sample[b]:
                r, n = runs[j], n_real[j]
                row += range(cur, r.start)
                at = image_at[j] = len(row)
                row += range(r.start, r.start + n)
                if not llm_stage:
                    row += [-1] * (W - n)
                cur = r.start + r.n_packed
            if llm_stage and of_sample[b]:  # the inert slots after the sample's last image
                inert_at[b] = len(row)
                row += [-1] * (V - total[b])
            row += range(cur, L)
            if at is None and llm_stage:  # no image: an inert run after the sample's padding
                first = int(attention_mask[b].nonzero()[0]) if bool(attention_mask[b].any()) else 0
                at = inert_at[b] = first
                row = row[:first] + [-1] * V + row[first:]
            rows.append(row)
            run_at.append(at)
        Lp = max(len(row) for row in rows)
        pad = [Lp - len(row) for row in rows]
        src = torch.tensor([[-1] * p + row for p, row in zip(pad, rows)], dtype=torch.long, device=dev)  # [B, L']
        real = src >= 0
        g = src.clamp(min=0)
        pad_id = self.spec.pad_token_id()
        new_ids = input_ids.gather(1, g).masked_fill(~real, pad_id)
        new_mask = attention_mask.gather(1, g) * real.to(attention_mask.dtype)
        removed = torch.zeros(B, dtype=torch.long, device=dev)
        for j, r in enumerate(runs):
            removed[r.sample] += r.n_packed - n_real[j]
        if self.spec.pre_llm_positions == "original":  # every kept token keeps its unpruned position
            pos = self.spec.prompt_positions(kwargs, input_ids, attention_mask)
            if pos is None:
                pos = torch.arange(L, device=dev).expand(B, L)
            # A kept unit takes the position of its own placeholder (run start + its index in the run); a
            # merged token (no index) the position of the placeholder in its slot of the run.
            at_pos = g.clone()
            for j, r in enumerate(runs):
                index = per_image[j][2]
                slot = pad[r.sample] + image_at[j] + torch.arange(index.shape[0], device=dev)
                at_pos[r.sample, slot] = torch.where(index >= 0, r.start + index, at_pos[r.sample, slot])
            rows_ = pos if pos.dim() == 3 else pos[None]  # [R, B, L]
            new_rows = torch.where(real, torch.stack([p.expand(B, L).gather(1, at_pos) for p in rows_]), 0)
            new_pos = new_rows if pos.dim() == 3 else new_rows[0]
        else:
            pos = kwargs.get("position_ids")
            if pos is not None and pos.dim() != 2:
                raise ValueError(f"position_ids must be [B, L] for pruning, got shape {tuple(pos.shape)}")
            base = pos.expand(B, L) if pos is not None else torch.arange(L, device=dev).expand(B, L)
            dropped_before = torch.zeros_like(g)  # dropped image columns before each column
            for j, r in enumerate(runs):
                n, N = n_real[j], r.n_packed
                dropped_before[r.sample] += (g[r.sample] - (r.start + n)).clamp(min=0).clamp(max=N - n)
            new_pos = torch.where(real, base.gather(1, g) - dropped_before, torch.zeros_like(g))
        kwargs["input_ids"] = new_ids
        kwargs["attention_mask"] = new_mask
        kwargs["position_ids"] = new_pos
        for name in self.spec.prompt_aligned_inputs:  # e.g. Qwen's mm_token_type_ids: inert slots are text
            extra = kwargs.get(name)
            if extra is not None:
                kwargs[name] = extra.gather(1, g).masked_fill(~real, 0)

        # Project and place extra slots; one [n_j, Dt] tensor per image for the model's own scatter.
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
            vis_index.append(index)
            if has_scores:
                vis_scores.append((scores if scores is not None else torch.zeros(x.shape[0], device=x.device)).float())
        # each token's index in its image's run (-1 merged): what per-token inputs beside the features follow
        self.spec.feed_kept_features(kwargs, feats_out, [t[2] for t in per_image])

        fw.orig_len = L
        fw.prompt_len = Lp
        fw.src_cols = src
        fw.advancing = real
        fw.removed = removed
        self.handle.kept_indices = [i[i >= 0] for i in vis_index]  # one entry per image
        n_layers = self.info.llm_num_layers
        for c, index, n in zip(self.handle.token_counts, vis_index, n_real):  # per image here
            c.merged = int((index == -1).sum())
            c.llm_visual = [n] * n_layers
            c.projector = n  # the extra slots of a whole run are projected too
        self.handle.batch_counts.llm_visual_width = [W] * n_layers
        fw.key_mask = new_mask.bool()
        if llm_stage:  # the LLM stage's view: per sample its V visual slots, images in order, then inert ones
            fw.image_samples = [r.sample for r in runs]
            pos_rows, index_rows, image_rows, score_rows = [], [], [], []
            for b in range(B):
                n_inert = V - total[b]
                js = of_sample[b]
                pos_rows.append(torch.cat([pad[b] + image_at[j] + torch.arange(n_real[j], device=dev) for j in js]
                                          + [pad[b] + inert_at[b] + torch.arange(n_inert, device=dev)]))
                index_rows.append(torch.cat([vis_index[j].to(dev) for j in js]
                                            + [torch.full((n_inert,), INERT, dtype=torch.long, device=dev)]))
                image_rows.append(torch.cat([torch.full((n_real[j],), j, dtype=torch.long, device=dev) for j in js]
                                            + [torch.full((n_inert,), -1, dtype=torch.long, device=dev)]))
                if has_scores:
                    score_rows.append(torch.cat([vis_scores[j].to(dev) for j in js]
                                                + [torch.full((n_inert,), float("-inf"), device=dev)]))
            fw.visual_pos = torch.stack(pos_rows)  # [B, V] (one span per sample with at most one image)
            fw.visual_index = torch.stack(index_rows)
            fw.visual_image = torch.stack(image_rows)  # [B, V] image of each slot (-1 inert)
            if has_scores:
                fw.visual_scores = torch.stack(score_rows)
            fw.instruction_pos = self._instruction_positions(fw.visual_pos, fw.key_mask)
        elif all(at is not None for at in run_at):  # every sample has an image: the view diagnostics read
            row_of = {runs[js[0]].sample: js[0] for js in of_sample if js}
            run_start = torch.tensor([pad[b] + run_at[b] for b in range(B)], device=dev)
            fw.visual_pos = run_start[:, None] + torch.arange(W, device=dev)[None]  # [B, W]
            fw.visual_index = torch.stack([torch.cat([vis_index[row_of[b]],
                                                      vis_index[row_of[b]].new_full((W - n_real[row_of[b]],), INERT)])
                                           for b in range(B)])
            if has_scores:
                fw.visual_scores = torch.stack([torch.cat([vis_scores[row_of[b]], vis_scores[row_of[b]].new_full(
                    (W - n_real[row_of[b]],), float("-inf"))]) for b in range(B)])
            fw.instruction_pos = self._instruction_positions(fw.visual_pos, fw.key_mask)

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
        for name in self.spec.prompt_aligned_inputs:
            extra = kwargs.get(name)
            if extra is not None and extra.dim() == 2 and extra.shape[1] >= fw.orig_len:
                head = extra[:, : fw.orig_len].gather(1, fw.src_cols.clamp(min=0)).masked_fill(~fw.advancing, 0)
                kwargs[name] = torch.cat([head, extra[:, fw.orig_len :]], dim=1)
        pos = kwargs.get("position_ids")
        if self.spec.pre_llm_positions == "original":  # generated tokens keep their unpruned positions
            if pos is None:
                raise ValueError(
                    f"cached decoding of a pruned {type(self.model).__name__} needs position_ids (generate() "
                    "passes them): the model cannot derive them from the shortened prompt"
                )
            return
        if pos is not None:
            kwargs["position_ids"] = pos - fw.removed[:, None]
            return
        # No positions given: the unpruned model would number new tokens from the cache length.
        dev = fw.src_cols.device
        orig_seen = seen - fw.prompt_len + fw.orig_len
        kwargs["position_ids"] = orig_seen + torch.arange(n_new, device=dev)[None] - fw.removed[:, None]
