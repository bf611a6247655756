"""The LLM stage: pre-hooks on decoder layers >= K slice hidden states, position ids, RoPE cos/sin
and the 4D mask (query and key dims) to the visual tokens an in-LLM pruner keeps, so the KV cache
of those layers holds only kept tokens; in decoding the key dim of the mask is gathered to match each
layer's cache. Attention rows for pruners are computed from the layer's own q/k projections.

Kept tokens keep their original positions by default (``positions="original"``, as FastV does) or are
renumbered contiguously (``positions="compact"``). Part of `Engine` (a mixin).
"""

from __future__ import annotations

from typing import Any

import torch

from mllm_adapters.engine.state import INERT, gather_seq
from pruners.base import LLMDecision, LLMLayerContext
from pruners.ops import attention_rows_at


class LLMStage:
    """Decoder-layer hooks and attention rows."""

    # ---- LLM stage --------------------------------------------------------------------------
    def _make_attn_capture(self, i: int):
        def hook(module, args, kwargs):
            if self._fw.phase == "prefill":
                hs = kwargs.get("hidden_states", args[0] if args else None)
                self._fw.attn_inputs[i] = (hs, kwargs["position_embeddings"])
                # the KV cache the layer is about to write its rotated keys into (`_cached_keys`)
                self._fw.attn_caches[i] = kwargs.get("past_key_values")

        return hook

    def _make_key_capture(self, i: int, values: bool = False):
        """Keep layer i's own key (or value) projection [B, L, Hkv*hd] (pre-RoPE) so scoring does not
        recompute it."""

        def hook(module, args, output):
            if self._fw.phase == "prefill":
                (self._fw.attn_values if values else self._fw.attn_keys)[i] = output

        return hook

    def _install_sublayer_capture(self, i: int) -> None:
        """Capture (input, output) of layer i's attention and MLP sub-layers at prefill (for TTV)."""
        attn_module, mlp = self.spec.text_attention(i).module, self.spec.text_mlp(i)

        def attn_hook(module, args, kwargs, output):
            if self._fw.phase == "prefill":
                cap = self._fw.captures.setdefault(i, {})
                cap["attn_in"] = kwargs.get("hidden_states", args[0] if args else None)
                cap["attn_out"] = output[0]

        def mlp_hook(module, args, output):
            if self._fw.phase == "prefill":
                cap = self._fw.captures.setdefault(i, {})
                cap["mlp_in"], cap["mlp_out"] = args[0], output

        def layer_hook(module, args, kwargs):
            if self._fw.phase == "prefill":
                self._fw.captures.setdefault(i, {})["layer_in"] = args[0] if args else kwargs.get("hidden_states")

        self._hooks.append(attn_module.register_forward_hook(attn_hook, with_kwargs=True))
        self._hooks.append(mlp.register_forward_hook(mlp_hook))
        self._hooks.append(self.spec.decoder_layers()[i].register_forward_pre_hook(layer_hook, with_kwargs=True))

    def _attn_input(self, layer_idx: int, hidden_states: torch.Tensor):
        """(x, (cos, sin)) captured at layer ``layer_idx``'s attention: its normed input [B, Lc, D] and RoPE
        tables; a ValueError unless the pruner declared the layer in ``llm_attention_layers()``."""
        fw = self._fw
        if layer_idx not in fw.attn_inputs:
            raise ValueError(
                f"method {self.pruner.name!r} asked for the attention of LLM layer {layer_idx} but declared "
                f"llm_attention_layers()={sorted(self.pruner.llm_attention_layers())}"
            )
        x, rope = fw.attn_inputs[layer_idx]
        if x.shape[1] != hidden_states.shape[1]:
            raise ValueError(f"attention inputs of layer {layer_idx} are from a different sequence length")
        return x, rope

    def _llm_attention_rows(self, layer_idx: int, queries: str, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, Nv] head-mean attention of layer ``layer_idx`` from the chosen query rows to the visual tokens."""
        x, (cos, sin) = self._attn_input(layer_idx, hidden_states)
        return self._rows_from(layer_idx, x, cos, sin, queries, self._fw.attn_keys.get(layer_idx),
                               self._fw.attn_caches.get(layer_idx))

    def _llm_qkv(self, layer_idx: int, queries: str, hidden_states: torch.Tensor):
        """(q [B, Hq, Nq, hd] of the chosen query rows, k and v [B, Hkv, Lc, hd] of every current token)
        of already-run layer ``layer_idx``, q and k with its RoPE (`LLMLayerContext.layer_qkv`)."""
        fw = self._fw
        x, (cos, sin) = self._attn_input(layer_idx, hidden_states)
        qpos, _ = self._query_rows(x, queries)
        q, k = self._rope_qk(layer_idx, x, cos, sin, qpos, fw.attn_keys.get(layer_idx), fw.attn_caches.get(layer_idx))
        attn = self.spec.text_attention(layer_idx)
        v_raw = fw.attn_values.get(layer_idx)
        if v_raw is None or v_raw.shape[:2] != x.shape[:2]:
            v_raw = attn.v(x)
        B, Lc, _ = x.shape
        v = v_raw.view(B, Lc, -1, attn.head_dim).transpose(1, 2)  # [B, Hkv, Lc, hd]
        return q, k, v

    def _query_rows(self, x: torch.Tensor, queries: str) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, Nq] query positions in the current sequence, [B, Nq] which are real) for ``queries``."""
        B, Lc, _ = x.shape
        key_mask = self._current(self._fw.key_mask)
        if queries == "last":
            qpos = (torch.arange(Lc, device=x.device) * key_mask).argmax(1, keepdim=True)  # [B, 1]
            return qpos, torch.ones_like(qpos, dtype=torch.bool)
        if queries == "instruction":
            qpos = self._current_positions(self._fw.instruction_pos)
            return qpos.clamp(min=0), qpos >= 0
        raise ValueError(f"queries must be 'last' or 'instruction', got {queries!r}")

    def _rope_qk(self, layer_idx: int, x, cos, sin, qpos: torch.Tensor, k_raw: torch.Tensor | None,
                 cache: Any = None):
        """(q [B, Hq, Nq, hd] at ``qpos``, k [B, Hkv, Lc, hd]) of layer ``layer_idx`` from its normed input
        ``x``, RoPE applied. The lean scoring path (docs/engine.md "Scoring"): q is projected and rotated
        for the query rows only; k is the layer's own rotated keys from the KV cache it wrote in this
        prefill (``cache``: no projection, no RoPE, nothing allocated), else its key projection ``k_raw``
        (captured, or recomputed) rotated once (`_rotate_keys`: one [B, Hkv, Lc, hd] tensor)."""
        attn = self.spec.text_attention(layer_idx)
        B, Lc, _ = x.shape
        hd = attn.head_dim
        xq = gather_seq(x, qpos)  # [B, Nq, D]
        q = attn.q(xq).view(B, qpos.shape[1], -1, hd).transpose(1, 2)  # [B, Hq, Nq, hd]
        cos_b, sin_b = cos.expand(B, *cos.shape[1:]), sin.expand(B, *sin.shape[1:])  # [B, Lc, hd]
        q = self.spec.rotate(q, gather_seq(cos_b, qpos), gather_seq(sin_b, qpos))
        k = self._cached_keys(cache, layer_idx, B, Lc)
        if k is None:
            if k_raw is None or k_raw.shape[:2] != x.shape[:2]:
                k_raw = attn.k(x)
            k = self._rotate_keys(k_raw.view(B, Lc, -1, hd).transpose(1, 2), cos_b, sin_b)  # [B, Hkv, Lc, hd]
        return q, k

    @staticmethod
    def _cached_keys(cache: Any, layer_idx: int, B: int, Lc: int) -> torch.Tensor | None:
        """Layer ``layer_idx``'s rotated keys [B, Hkv, Lc, hd] from a transformers cache that holds exactly
        this prefill's Lc positions for it (a longer entry holds earlier turns, a shorter one a sliding
        window: None, as for no cache, a cache of another kind, or a layer that has not run yet)."""
        layers = getattr(cache, "layers", None)
        if layers is None or layer_idx >= len(layers):
            return None
        keys = getattr(layers[layer_idx], "keys", None)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.shape[0] != B or keys.shape[2] != Lc:
            return None
        return keys

    #: keys rotated per chunk of this many positions (bounds the temporaries of RoPE to a chunk)
    ROPE_CHUNK = 16

    def _rotate_keys(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on keys ``k`` [B, Hkv, Lc, hd] with tables [B, Lc, hd], written chunk by chunk into one
        output tensor: one extra [B, Hkv, Lc, hd] alive, the formula's temporaries only per chunk."""
        Lc = k.shape[2]
        if Lc <= self.ROPE_CHUNK:
            return self.spec.rotate(k, cos, sin)
        out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        for s in range(0, Lc, self.ROPE_CHUNK):
            e = min(s + self.ROPE_CHUNK, Lc)
            out[:, :, s:e] = self.spec.rotate(k[:, :, s:e], cos[:, s:e], sin[:, s:e])
        return out

    def _rows_from(self, layer_idx: int, x, cos, sin, queries: str, k_raw: torch.Tensor | None = None,
                   cache: Any = None) -> torch.Tensor:
        """[B, Nv] head-mean attention rows from layer input ``x`` (after its norm); ``k_raw`` is the
        layer's own key projection of ``x`` when it was captured (else recomputed), ``cache`` the KV
        cache holding its rotated keys once it ran (`_rope_qk`)."""
        fw = self._fw
        attn = self.spec.text_attention(layer_idx)
        key_mask = self._current(fw.key_mask)
        qpos, qvalid = self._query_rows(x, queries)
        q, k = self._rope_qk(layer_idx, x, cos, sin, qpos, k_raw, cache)
        rows = attention_rows_at(q, k, fw.visual_pos, key_mask=key_mask, query_pos=qpos, scale=attn.scale)  # [B, Nq, Nv]
        w = qvalid.float()
        return (rows * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)

    def _current(self, t: torch.Tensor) -> torch.Tensor:
        """Restrict a [B, L] prompt tensor to the current (pruned) sequence."""
        cols = self._fw.cur_cols
        return t if cols is None else t.gather(1, cols)

    def _current_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Map prompt positions [B, n] (-1 = none) to positions in the current sequence."""
        cols = self._fw.cur_cols
        if cols is None:
            return pos
        B, L = self._fw.key_mask.shape
        inv = torch.full((B, L), -1, dtype=torch.long, device=pos.device)
        inv.scatter_(1, cols, torch.arange(cols.shape[1], device=pos.device).expand(B, -1))
        return torch.where(pos >= 0, inv.gather(1, pos.clamp(min=0)), pos)

    def _make_layer_hook(self, i: int):
        def hook(module, args, kwargs):
            fw = self._fw
            if fw.visual_pos is None or (fw.visual_pos.shape[1] == 0 and fw.cur_cols is None and not fw.layer_cols):
                return None  # no visual token ever (a batch without images); after an exit keep slicing
            hs = args[0] if args else kwargs.pop("hidden_states")
            rest = args[1:] if args else ()
            if fw.phase == "prefill":
                hs = self._prefill_layer(i, hs, kwargs)
            else:
                self._decode_layer(i, kwargs, hs.shape[1])
            return (hs, *rest), kwargs

        return hook

    def _prefill_layer(self, i: int, hs: torch.Tensor, kwargs: dict) -> torch.Tensor:
        fw = self._fw
        pruner = self.pruner
        if fw.key_mask is None:  # no image went through the top-level hook
            return hs
        if i == self._llm_layers[0] and not fw.full_kwargs:
            fw.full_kwargs = {"attention_mask": kwargs.get("attention_mask"),
                         "position_ids": kwargs.get("position_ids"),
                         "position_embeddings": kwargs.get("position_embeddings")}
        if i in self._llm_layers and not pruner.keeps_all and fw.visual_pos.shape[1] > 0:
            ctx = LLMLayerContext(
                layer=i,
                hidden_states=hs,
                visual_pos=fw.visual_pos,
                visual_index=fw.visual_index,
                key_mask=self._current(fw.key_mask),
                instruction_pos=self._current_positions(fw.instruction_pos),
                info=self.info,
                state=fw.pruner_state,
                attention_rows=lambda layer, queries="last", h=hs: self._llm_attention_rows(layer, queries, h),
                generators=fw.generators,
                layer_rows=lambda queries="last", h=hs, i=i: self._rows_next(i, h, queries),
                layer_qkv=lambda layer, queries="last", h=hs: self._llm_qkv(layer, queries, h),
                final_norm=self.spec.final_norm(),
                captures=fw.captures,
                token_scores=fw.visual_scores,
                keep_counts=self._keep_counts(i),
            )
            out = self._call_pruner(pruner.prune_llm, ctx)
            merged = counts = None
            if isinstance(out, LLMDecision):
                out, merged, counts = out.keep, out.merged, out.merged_counts
            keep = out.sort(dim=1).values  # [B, k] into visual tokens
            fill = ctx.fillers.gather(1, keep) if ctx.fillers is not None else None  # [B, k] filler slots
            B, Lc = hs.shape[:2]
            vis = fw.visual_pos
            nv, k = vis.shape[1], keep.shape[1]
            ar = torch.arange(Lc, device=hs.device).expand(B, Lc)
            drop = torch.ones(B, nv, dtype=torch.bool, device=hs.device)
            drop.scatter_(1, keep, False)
            drop_full = torch.zeros(B, Lc, dtype=torch.bool, device=hs.device)
            drop_full.scatter_(1, vis, drop)
            local = ar[~drop_full].view(B, Lc - (nv - k))  # [B, Lc'] positions kept in the current sequence
            hs = gather_seq(hs, local)
            base = fw.cur_cols if fw.cur_cols is not None else torch.arange(fw.prompt_len, device=hs.device).expand(B, -1)
            fw.cur_cols = base.gather(1, local)
            fw.visual_index = fw.visual_index.gather(1, keep)
            if fw.visual_scores is not None:
                fw.visual_scores = fw.visual_scores.gather(1, keep)
            if fw.visual_image is not None:
                fw.visual_image = fw.visual_image.gather(1, keep)
            kept_at = vis.gather(1, keep)  # [B, k] their positions before the drop
            fw.visual_pos = kept_at - drop_full.long().cumsum(1).gather(1, kept_at)  # minus the drops before them
            if merged is not None and merged.shape[1] > 0:  # real visual tokens before this layer's fillers
                live = fw.key_mask.gather(1, base.gather(1, vis))
            if fill is not None and bool(fill.any()):
                self._hide_fillers(fill)
            if merged is not None and merged.shape[1] > 0:
                hs = self._insert_merged(hs, vis, base, live, merged, counts)
                k = fw.visual_pos.shape[1]
            fw.cur_kwargs = None
            idx = fw.visual_index
            if fw.image_samples is None:  # one image per sample
                self.handle.kept_indices = [idx[b][idx[b] >= 0] for b in range(B)]
            else:  # one entry per image, in batch order
                img = fw.visual_image
                self.handle.kept_indices = [idx[b][(idx[b] >= 0) & (img[b] == j)]
                                            for j, b in enumerate(fw.image_samples)]
            self.handle.kept_by_layer[i] = list(self.handle.kept_indices)
            # inert slots are not tokens: each sample counts its real ones
            real = [int((row != INERT).sum()) for row in idx]
            width = self.handle.batch_counts.llm_visual_width
            for c, n in zip(self.handle.token_counts, real):
                for j in range(i, self.info.llm_num_layers):
                    c.llm_visual[j] = n
            for j in range(i, self.info.llm_num_layers):
                width[j] = k
        if fw.cur_cols is not None:
            fw.layer_cols[i] = fw.cur_cols
            if fw.hidden_cols is not None:
                fw.layer_hidden[i] = fw.hidden_cols.gather(1, fw.cur_cols)  # [B, Lc]
            if fw.cur_kwargs is None:
                fw.cur_kwargs = self._slice_prefill_kwargs()
            kwargs.update(fw.cur_kwargs)
        return hs

    def _insert_merged(self, hs: torch.Tensor, vis_before: torch.Tensor, cols_before: torch.Tensor,
                       live: torch.Tensor, merged: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        """Insert the merged tokens ``merged`` [B, m, D] (``counts`` [B] real ones each, None = all) right
        after the kept visual tokens of the current sequence ``hs``. Each gets a virtual column (appended
        to the prompt's column space) whose host, the last real visual prompt column before this
        layer's drop, stands in for its mask row/column and original position; padding slots become
        inert. ``vis_before`` [B, Nv] are the visual positions in ``cols_before`` [B, Lc0], the sequence
        before the drop, and ``live`` [B, Nv] which of them were real tokens then (before this layer's
        fillers were hidden, so the host does not depend on the batch). Returns the new hs."""
        fw = self._fw
        B, Lc, _ = hs.shape
        m = merged.shape[1]
        dev = hs.device
        real = torch.ones(B, m, dtype=torch.bool, device=dev) if counts is None else (
            torch.arange(m, device=dev)[None, :] < counts.to(dev)[:, None])
        width = fw.key_mask.shape[1]  # columns so far (prompt + earlier virtual ones)
        host = fw.col_host if fw.col_host is not None else torch.arange(width, device=dev).expand(B, -1)
        # the host: the last visual slot before the drop that is a real token (else the slot before the run)
        prev_cols = cols_before.gather(1, vis_before)  # [B, Nv] columns of the visual slots before the drop
        nv = vis_before.shape[1]
        last = torch.where(live, torch.arange(nv, device=dev)[None, :], -1).max(1).values  # [B]
        before = cols_before.gather(1, (vis_before[:, 0] - 1).clamp(min=0)[:, None])[:, 0]
        host_col = torch.where(last >= 0, prev_cols.gather(1, last.clamp(min=0)[:, None])[:, 0], before)
        host_col = host.gather(1, host_col[:, None])  # [B, 1] a prompt column
        virt = width + torch.arange(m, device=dev)  # [m]
        # the new sequence: ..., kept visual slots, merged slots, the rest
        k = fw.visual_pos.shape[1]
        # [B, 1] where the merged slots go: right after the last kept visual slot (else where the run began)
        ins = fw.visual_pos[:, -1:] + 1 if k else vis_before[:, :1]
        s = torch.arange(Lc + m, device=dev)[None, :]
        src = torch.where(s < ins, s, torch.where(s < ins + m, Lc + s - ins, s - m))  # [B, Lc + m]
        hs = gather_seq(torch.cat([hs, merged.to(hs.dtype)], 1), src)
        fw.cur_cols = torch.cat([fw.cur_cols, virt.expand(B, m)], 1).gather(1, src)
        fw.col_host = torch.cat([host, host_col.expand(B, m)], 1)
        fw.key_mask = torch.cat([fw.key_mask, real], 1)
        hidden = fw.hidden_cols if fw.hidden_cols is not None else torch.zeros_like(fw.key_mask[:, :width])
        fw.hidden_cols = torch.cat([hidden, ~real], 1)
        fw.visual_index = torch.cat([fw.visual_index, torch.where(real, -1, INERT)], 1)
        if fw.visual_scores is not None:
            fw.visual_scores = torch.cat([fw.visual_scores, torch.zeros_like(real, dtype=fw.visual_scores.dtype)
                                          .masked_fill(~real, float("-inf"))], 1)
        if fw.visual_image is not None:
            fw.visual_image = torch.cat([fw.visual_image, torch.full_like(real, -1, dtype=torch.long)], 1)
        fw.visual_pos = torch.cat([fw.visual_pos, ins + torch.arange(m, device=dev)[None, :]], 1)
        return hs

    def _keep_counts(self, layer: int) -> torch.Tensor | None:
        """[B] visual tokens each sample keeps from ``layer`` on: the sum over its images of
        `_image_keep_count`, at most its current real ones (None without the top hook's runs)."""
        fw = self._fw
        if fw.sample_runs is None:
            return None
        per = torch.tensor([sum(self._image_keep_count(n, layer) for n in ns) for ns in fw.sample_runs],
                           device=fw.visual_index.device)
        return torch.minimum(per, (fw.visual_index != INERT).sum(1))

    def _hide_fillers(self, fill: torch.Tensor) -> None:
        """Turn the kept filler slots ``fill`` [B, k] (over the new visual tokens) into inert slots: no
        longer tokens of their sample, masked as keys from this layer on (prefill and decoding)."""
        fw = self._fw
        fw.visual_index = fw.visual_index.masked_fill(fill, INERT)
        if fw.visual_scores is not None:
            fw.visual_scores = fw.visual_scores.masked_fill(fill, float("-inf"))
        cols = fw.cur_cols.gather(1, fw.visual_pos)  # [B, k] prompt columns of the visual tokens
        hidden = fw.hidden_cols if fw.hidden_cols is not None else torch.zeros_like(fw.key_mask, dtype=torch.bool)
        fw.hidden_cols = hidden.scatter(1, cols, hidden.gather(1, cols) | fill)
        fw.key_mask = fw.key_mask.scatter(1, cols, fw.key_mask.gather(1, cols) & ~fill)

    @staticmethod
    def _hide_keys(mask: torch.Tensor | None, hidden: torch.Tensor, q_len: int) -> torch.Tensor:
        """The 4D attention mask with keys ``hidden`` [B, Lk] masked (None: SDPA's skipped causal mask,
        built here)."""
        B, Lk = hidden.shape
        if mask is None:
            causal = torch.ones(q_len, Lk, dtype=torch.bool, device=hidden.device).tril(diagonal=Lk - q_len)
            return causal[None, None] & ~hidden[:, None, None, :]
        if mask.dim() != 4:
            raise ValueError("an in-LLM method whose samples keep different token counts needs a 4D attention mask "
                             "(attn_implementation 'sdpa' or 'eager')")
        if mask.dtype == torch.bool:
            return mask & ~hidden[:, None, None, :]
        return mask.masked_fill(hidden[:, None, None, :], torch.finfo(mask.dtype).min)

    def _rows_next(self, i: int, hs: torch.Tensor, queries: str) -> torch.Tensor:
        """Attention rows of layer i itself, computed from its input (its norm, q/k projections, RoPE)."""
        x = self.spec.text_attention(i).norm(hs)
        fw = self._fw
        # cur_kwargs is always computed by the time a later layer runs with cur_cols set
        current = fw.cur_kwargs if fw.cur_cols is not None else fw.full_kwargs
        cos, sin = current["position_embeddings"]
        return self._rows_from(i, x, cos, sin, queries)

    def _compact_positions(self, cols: torch.Tensor, orig_pos: torch.Tensor) -> torch.Tensor:
        """Renumber kept prompt columns contiguously: original position minus dropped columns before it."""
        B, L = self._fw.key_mask.shape
        kept = torch.zeros(B, L, dtype=torch.long, device=cols.device)
        kept.scatter_(1, cols, 1)
        dropped = 1 - kept  # [B, L]
        if self._fw.hidden_cols is not None:  # inert fillers count as dropped
            dropped = dropped | self._fw.hidden_cols.long()
        adv = self._advancing()
        if adv is not None:
            dropped = dropped * adv.long()
        dropped_before = dropped.cumsum(1)
        return orig_pos.expand(B, -1).gather(1, cols) - dropped_before.gather(1, cols)

    def _slice_prefill_kwargs(self) -> dict:
        fw, cols = self._fw, self._fw.cur_cols
        if fw.col_host is not None:
            return self._slice_merged_kwargs()
        src = fw.full_kwargs
        out: dict[str, Any] = {}
        mask = src.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            out["attention_mask"] = gather_seq(gather_seq(mask, cols, dim=2), cols, dim=3)
        if fw.hidden_cols is not None:
            out["attention_mask"] = self._hide_keys(out.get("attention_mask", mask), fw.hidden_cols.gather(1, cols),
                                                    cols.shape[1])
        self._slice_positions(out, cols, cols, self._compact_positions)
        return out

    def _slice_positions(self, out: dict, cols: torch.Tensor, src_cols: torch.Tensor, compact) -> None:
        """Position ids and RoPE tables of the current columns ``cols`` into ``out``: renumbered by
        ``compact(cols, positions)`` for compact positions, else the full prompt's read at ``src_cols``
        (the columns themselves, or the hosts of merged tokens)."""
        fw, src = self._fw, self._fw.full_kwargs
        pos = src.get("position_ids")
        if pos is None:
            pos = torch.arange(fw.prompt_len, device=cols.device)[None, :]
        if self.positions == "compact":
            new_pos = compact(cols, pos)
            out["position_ids"] = new_pos
            out["position_embeddings"] = self.spec.rotary(src["position_embeddings"][0], new_pos)
        else:
            out["position_ids"] = gather_seq(pos, src_cols)
            cos, sin = src["position_embeddings"]
            out["position_embeddings"] = (gather_seq(cos, src_cols), gather_seq(sin, src_cols))

    def _slice_merged_kwargs(self) -> dict:
        """`_slice_prefill_kwargs` once merged tokens exist: every column is read through its host
        (`Forward.col_host`) for the mask and original positions, and the mask is made causal over the
        current sequence (which orders a merged token after its host and before the tokens after it)."""
        fw, cols = self._fw, self._fw.cur_cols
        hcols = fw.col_host.gather(1, cols)  # [B, Lc] prompt columns
        src = fw.full_kwargs
        Lc = cols.shape[1]
        out: dict[str, Any] = {}
        mask = src.get("attention_mask")
        causal = torch.ones(Lc, Lc, dtype=torch.bool, device=cols.device).tril()
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            m = gather_seq(gather_seq(mask, hcols, dim=2), hcols, dim=3)
            if m.dtype == torch.bool:
                m = m & causal
            else:
                m = m.masked_fill(~causal, torch.finfo(m.dtype).min)
            out["attention_mask"] = m
        out["attention_mask"] = self._hide_keys(out.get("attention_mask", mask), fw.hidden_cols.gather(1, cols), Lc)
        self._slice_positions(out, cols, hcols, self._compact_positions_merged)
        return out

    def _compact_positions_merged(self, cols: torch.Tensor, orig_pos: torch.Tensor) -> torch.Tensor:
        """Compact positions with merged tokens: a prompt column's `_compact_positions` value plus the real
        merged tokens before it in the current sequence; a merged token its host's value plus the real
        merged tokens up to it (so the first comes right after the last kept visual token)."""
        fw = self._fw
        P = fw.prompt_len
        B = cols.shape[0]
        is_prompt = cols < P
        kept = torch.zeros(B, P + 1, dtype=torch.long, device=cols.device)
        kept.scatter_(1, cols.clamp(max=P), 1)  # every virtual column marks the spare column P
        dropped = 1 - kept[:, :P]
        dropped = dropped | fw.hidden_cols[:, :P].long()
        adv = self._advancing()
        if adv is not None:
            dropped = dropped * adv.long()
        hcols = fw.col_host.gather(1, cols)
        base = orig_pos.expand(B, -1).gather(1, hcols) - dropped.cumsum(1).gather(1, hcols)
        merged_real = (~is_prompt & ~fw.hidden_cols.gather(1, cols)).long()  # [B, Lc]
        return base + merged_real.cumsum(1)

    def _decode_layer(self, i: int, kwargs: dict, q_len: int) -> None:
        fw = self._fw
        cols = fw.layer_cols.get(i)
        if cols is None:
            return
        mask = kwargs.get("attention_mask")
        hidden = fw.layer_hidden.get(i)  # [B, len(cols)] inert fillers among this layer's cached columns
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            total = mask.shape[-1]
            B = cols.shape[0]
            new = torch.arange(fw.prompt_len, total, device=mask.device).expand(B, -1)
            host = cols if fw.col_host is None else fw.col_host.gather(1, cols)  # merged tokens: their host's
            key_cols = torch.cat([host, new], dim=1)
            kwargs["attention_mask"] = mask = gather_seq(mask, key_cols, dim=3)
        if hidden is not None:
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                steps = mask.shape[-1] - cols.shape[1]
            else:  # no 4D mask: the layer's cache holds its prompt columns and the tokens decoded so far
                cache = kwargs.get("past_key_values")
                steps = (cache.get_seq_length(i) if cache is not None else cols.shape[1]) - cols.shape[1] + q_len
            keys = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], steps)], dim=1)  # [B, Lk]
            kwargs["attention_mask"] = self._hide_keys(mask, keys, q_len)
        if self.positions == "compact":
            if fw.col_host is not None:
                shift = self._merged_decode_shift(cols, hidden)
            else:
                adv = self._advancing()
                if adv is None:
                    shift = fw.prompt_len - cols.shape[1]
                else:  # [B, 1] dropped columns that advanced the position count
                    shift = (adv.sum(1) - adv.gather(1, cols).sum(1))[:, None]
                if hidden is not None:  # inert fillers count as dropped
                    counted = hidden if adv is None else hidden & adv.gather(1, cols)
                    shift = shift + counted.sum(1, keepdim=True)
            pos = kwargs.get("position_ids")
            if pos is None:
                raise ValueError("positions='compact' needs position_ids during decoding")
            new_pos = pos - shift
            kwargs["position_ids"] = new_pos
            kwargs["position_embeddings"] = self.spec.rotary(kwargs["position_embeddings"][0], new_pos)

    def _merged_decode_shift(self, cols: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """[B, 1] compact-position shift of a layer caching ``cols`` (with merged tokens): the prompt's
        advancing columns minus the real ones it caches, kept or merged."""
        fw = self._fw
        P = fw.prompt_len
        is_prompt = cols < P
        live = ~hidden if hidden is not None else torch.ones_like(is_prompt)
        adv = self._advancing()
        if adv is None:
            total = torch.full((cols.shape[0],), P, dtype=torch.long, device=cols.device)
            kept_adv = (is_prompt & live).sum(1)
        else:
            total = adv.long().sum(1)
            kept_adv = (adv.gather(1, cols.clamp(max=P - 1)) & is_prompt & live).sum(1)
        merged_real = (~is_prompt & live).sum(1)
        return (total - kept_adv - merged_real)[:, None]
