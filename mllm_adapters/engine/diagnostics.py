"""Opt-in prefill diagnostics (``handle.record_diagnostics = True``): they observe, never change a token.

Two records per sample of each prefill, in ``handle.diagnostics`` (a `PrefillDiagnostics`):

- **modality attention share** (the Modality Dominance Index of Wu et al. 2025, "When Language
  Overrules: Revealing Text Dominance in Multimodal Large Language Models", arXiv:2508.10552): per
  decoder layer the head-mean attention the *last prompt token* pays to the keys it attends to in the
  layer's CURRENT sequence (after any in-LLM pruning; padding and inert filler slots excluded,
  softmax over every real key up to and including itself), split into the visual share (the visual
  tokens present, merged ones included) and the text share (every other real token), plus the two
  token counts the MDI needs. Computed after the layer's attention ran, from its own normed input and
  key projection (captured from ``k_proj``: nothing recomputed but the last query row) with RoPE
  through the family spec (`LLMStage._rope_qk`) and `pruners.ops.attention_rows` over the whole row:
  O(H x L) extra memory, no attention map.
- **sink statistics** (Kang et al., ICLR 2025, "See What You Are Told: Visual Attention Sink in Large
  Multimodal Models", code github.com/seilk/VisAttnSink ``DimProspector``): at the hidden state
  entering each decoder layer i >= 2 (the reference code's ``sink_select_layers``), the weight-free
  RMS-normalised activation ``|x / rms(x)|``; recorded sparsely: the dimensions where the first real
  prompt token (LLaMA's BOS; the first token where a tokenizer adds none) reaches ``sink_tau``, its
  largest value, and per visual token (its index in the sample's visual-token order, the index space
  of ``handle.kept_indices``) the dimensions where it reaches ``sink_tau``. The sink *dimensions* of a
  model and the sink *tokens* (phi(x) = max over the sink dimensions >= tau in some such layer) are
  derived from these by `benchmarks.run` on the unpruned reference cell.

Everything here runs only while recording, from hooks installed on the first recorded prefill (after
the engine's own, so they see the sequence the layer actually runs on) and removed with the others.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from mllm_adapters.engine.state import INERT
from pruners.ops import attention_rows

#: the sink paper's threshold on the RMS-normalised activation (VisAttnSink ``tau: 20``)
SINK_TAU = 20.0
#: the first decoder layer whose input hidden state is examined for sinks (VisAttnSink: layers 2..L-1)
SINK_FIRST_LAYER = 2
#: version of what the recorder measures: part of a benchmark cell's hashed config
DIAGNOSTICS_VERSION = 1

log = logging.getLogger(__name__)
_INSTALL_LOCK = threading.Lock()  # two threads starting their first recorded prefill install the hooks once


@dataclass
class SampleDiagnostics:
    """One sample's record of one prefill (lists indexed by decoder layer; None: layer not recorded)."""

    visual_share: list[float | None]
    text_share: list[float | None]
    n_visual: list[int | None]  # visual keys the last prompt token attends to in that layer
    n_text: list[int | None]  # other real keys it attends to (itself included)
    sink_layers: list[int] = field(default_factory=list)  # layers whose input was examined for sinks
    first_token_dims: set[int] = field(default_factory=set)  # dims where the first token reaches tau
    first_token_max: float = 0.0  # its largest |rms-normalised activation| over those layers
    first_token_argmax: int = -1  # the dimension of that largest value
    visual_hits: dict[int, set[int]] = field(default_factory=dict)  # visual token -> dims reaching tau
    visual_max: float = 0.0  # the largest |rms-normalised activation| of any visual token

    def mdi(self, layer: int) -> float | None:
        """Modality Dominance Index of one layer: (A_T / |T|) / (A_O / |O|) (None without visual attention)."""
        vs, ts, nv, nt = (self.visual_share[layer], self.text_share[layer], self.n_visual[layer],
                          self.n_text[layer])
        if vs is None or not nv or not nt or vs <= 0:
            return None
        return (ts / nt) / (vs / nv)


@dataclass
class PrefillDiagnostics:
    """What one recorded prefill measured: one `SampleDiagnostics` per sample (batch order)."""

    tau: float
    hidden_size: int
    samples: list[SampleDiagnostics]


def rms_normalised(hs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """|x / rms(x)| per token, without the norm's weight (VisAttnSink ``DimProspector.rmsnorm``), fp32."""
    h = hs.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).abs()


class Diagnostics:
    """Engine mixin: the recorder's hooks (see the module docstring)."""

    def _diag_begin(self, kwargs: dict) -> None:
        """Start a recorded prefill: install the hooks once, note the LLM prompt's visual columns and
        real tokens (after prompt surgery), and open this prefill's `PrefillDiagnostics`."""
        with _INSTALL_LOCK:
            if not getattr(self, "_diag_installed", False):
                self._diag_install()
        fw = self._fw
        ids = kwargs.get("input_ids")
        if ids is None:
            fw.diag = None
            return
        mask = kwargs.get("attention_mask")
        fw.diag_visual = ids == self.spec.image_token_id  # [B, L] the LLM prompt's visual columns
        fw.diag_real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        n_layers = self.info.llm_num_layers
        text_cfg = getattr(self.spec.config, "text_config", self.spec.config)
        fw.diag = PrefillDiagnostics(
            tau=float(getattr(self.handle, "sink_tau", SINK_TAU)), hidden_size=int(getattr(text_cfg, "hidden_size", 0)),
            samples=[SampleDiagnostics([None] * n_layers, [None] * n_layers, [None] * n_layers, [None] * n_layers)
                     for _ in range(ids.shape[0])])
        self.handle.diagnostics = fw.diag

    def _diag_install(self) -> None:
        layers = self.spec.decoder_layers()
        for i in range(len(layers)):
            attn = self.spec.text_attention(i)
            self._hooks.append(attn.k.register_forward_hook(self._diag_key_hook(i)))
            self._hooks.append(attn.module.register_forward_hook(self._diag_attn_hook(i), with_kwargs=True))
            if i >= SINK_FIRST_LAYER:
                self._hooks.append(layers[i].register_forward_pre_hook(self._diag_layer_hook(i), with_kwargs=True))
        self._diag_installed = True

    def _diag_active(self) -> bool:
        fw = self._fw
        return fw.phase == "prefill" and fw.diag is not None and bool(getattr(self.handle, "record_diagnostics", False))

    # ---- current-sequence views --------------------------------------------------------------------
    def _diag_current(self, Lc: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """([B, Lc] real tokens, [B, Lc] visual tokens) of the sequence a layer runs on; None (the layer
        is not recorded, with a warning) if it is not the sequence the engine tracks."""
        fw = self._fw
        vis, real = fw.diag_visual, fw.diag_real
        if fw.key_mask is not None:
            real = fw.key_mask  # padding and inert fillers masked (virtual columns of merged tokens too)
            extra = real.shape[1] - vis.shape[1]
            if extra > 0:  # merged tokens' virtual columns are visual
                vis = torch.cat([vis, vis.new_ones(vis.shape[0], extra)], 1)
        if fw.cur_cols is not None:
            real, vis = real.gather(1, fw.cur_cols), vis.gather(1, fw.cur_cols)
        if real.shape[1] != Lc:
            return None
        return real, vis & real

    def _diag_token_index(self, vis: torch.Tensor) -> torch.Tensor:
        """[B, Lc] each current visual column's index in its sample's visual-token order (-1 elsewhere):
        the engine's grid index where it tracks one, else the column's rank among the visual columns."""
        fw = self._fw
        if fw.visual_pos is not None and fw.visual_index is not None and fw.visual_pos.shape[1] > 0:
            out = torch.full(vis.shape, -1, dtype=torch.long, device=vis.device)
            idx = fw.visual_index.masked_fill(fw.visual_index == INERT, -1)
            return out.scatter(1, fw.visual_pos, idx)
        return torch.where(vis, vis.long().cumsum(1) - 1, -1)

    # ---- hooks ---------------------------------------------------------------------------------------
    def _diag_key_hook(self, i: int):
        def hook(module, args, output):
            if self._diag_active():
                self._fw.diag_keys[i] = output

        return hook

    def _diag_attn_hook(self, i: int):
        def hook(module, args, kwargs, output):
            if not self._diag_active():
                return None
            fw = self._fw
            x = kwargs.get("hidden_states", args[0] if args else None)
            k_raw = fw.diag_keys.pop(i, None)
            with torch.no_grad():
                self._diag_shares(i, x, kwargs["position_embeddings"], k_raw, kwargs.get("past_key_values"))
            return None

        return hook

    def _diag_shares(self, i: int, x: torch.Tensor, rope, k_raw: torch.Tensor | None, cache: Any = None) -> None:
        B, Lc, _ = x.shape
        current = self._diag_current(Lc)
        if current is None:
            log.warning("diagnostics: layer %d runs on %d tokens, not the sequence the engine tracks: not recorded",
                        i, Lc)
            return
        real, vis = current
        ar = torch.arange(Lc, device=x.device)
        qpos = (ar * real).argmax(1, keepdim=True)  # [B, 1] the last real token
        cos, sin = rope
        q, k = self._rope_qk(i, x, cos, sin, qpos, k_raw, cache)  # the layer just wrote its keys to cache
        row = attention_rows(q, k, key_mask=real, query_pos=qpos,
                             scale=self.spec.text_attention(i).scale)[:, 0]  # [B, Lc]
        allowed = real & (ar[None, :] <= qpos)
        text = allowed & ~vis
        vs = (row * vis).sum(1).tolist()
        ts = (row * text).sum(1).tolist()
        nv, nt = (vis & allowed).sum(1).tolist(), text.sum(1).tolist()
        for b, s in enumerate(self._fw.diag.samples):
            s.visual_share[i], s.text_share[i], s.n_visual[i], s.n_text[i] = vs[b], ts[b], int(nv[b]), int(nt[b])

    def _diag_layer_hook(self, i: int):
        def hook(module, args, kwargs):
            if not self._diag_active() or not getattr(self.handle, "diagnostics_sinks", True):
                return None
            hs = args[0] if args else kwargs.get("hidden_states")
            with torch.no_grad():
                self._diag_sinks(i, hs)
            return None

        return hook

    def _diag_sinks(self, i: int, hs: torch.Tensor) -> None:
        fw = self._fw
        tau = fw.diag.tau
        fw.diag.hidden_size = int(hs.shape[-1])
        B, Lc, _ = hs.shape
        current = self._diag_current(Lc)
        if current is None:
            return
        real, vis = current
        r = rms_normalised(hs)  # [B, Lc, D]
        first = real.long().argmax(1)  # [B] the first real token
        r_first = r.gather(1, first[:, None, None].expand(B, 1, r.shape[-1]))[:, 0]  # [B, D]
        fmax, farg = r_first.max(-1)
        first_hits = (r_first >= tau).nonzero().tolist()
        index = self._diag_token_index(vis)
        r_vis = r.masked_fill(~vis[..., None], 0.0)
        vmax = r_vis.flatten(1).max(1).values.tolist() if Lc else [0.0] * B
        hits = (r_vis >= tau).nonzero().tolist()  # (b, column, dim)
        fmax, farg = fmax.tolist(), farg.tolist()
        idx = index.tolist() if hits else None
        for b, s in enumerate(fw.diag.samples):
            s.sink_layers.append(i)
            if fmax[b] > s.first_token_max:
                s.first_token_max, s.first_token_argmax = fmax[b], farg[b]
            s.visual_max = max(s.visual_max, vmax[b])
        for b, d in first_hits:
            fw.diag.samples[b].first_token_dims.add(int(d))
        for b, c, d in hits:
            t = idx[b][c]
            if t >= 0:
                fw.diag.samples[b].visual_hits.setdefault(int(t), set()).add(int(d))
