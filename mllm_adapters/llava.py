"""Adapter for transformers' LlavaForConditionalGeneration (LLaVA-1.5 style: CLIP tower + projector + Llama).

It owns every hook; pruners only see the contexts of `pruners.base`. Three stages:

- ``vision`` and ``pre_llm``: a forward pre-hook on the top-level model runs the vision tower itself
  (layer by layer, up to the feature layer LLaVA reads), lets the pruner shrink the ViT sequence
  between layers and/or pick the features that reach the LLM, projects them, shrinks the run of
  image placeholders in ``input_ids``/``attention_mask`` to the kept count and hands the features to
  the model through ``mm_encoder_outputs``. Positions are compact (as if the image had fewer tokens).
  During cached decoding the same hook drops the removed columns from the 2D attention mask and
  shifts ``position_ids`` so generation continues the compact numbering.
- ``llm``: forward pre-hooks on decoder layers >= K slice hidden states, position ids, RoPE
  cos/sin and the 4D mask (query and key dims); the KV cache of those layers therefore holds only
  kept tokens. In decoding, the key dim of the mask is gathered to match each layer's cache.
  Kept tokens keep their original positions by default (``positions="original"``, as FastV does)
  or are renumbered contiguously (``positions="compact"``).

Facts about transformers 5 this relies on are in ``shared/notes/transformers5.md``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mllm_adapters.handle import PruningHandle
from mllm_adapters.registry import register_family
from pruners.base import (
    LLMLayerContext,
    ModelInfo,
    PreLLMContext,
    Pruner,
    VisionLayerContext,
    sample_generators,
)
from pruners.ops import attention_rows


def _gather_seq(x: torch.Tensor, cols: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather positions ``cols`` [B, n] along sequence dim ``dim`` of x ([B or 1, ..., L, ...])."""
    if x.shape[0] != cols.shape[0]:
        x = x.expand(cols.shape[0], *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = cols.shape
    idx = cols.view(shape).expand(*[cols.shape[0] if d == 0 else (cols.shape[1] if d == dim else s)
                                    for d, s in enumerate(x.shape)])
    return x.gather(dim, idx)


@dataclass
class _Forward:
    """Per-prefill state, reused by the decode steps that follow it."""

    phase: str = "prefill"
    prompt_len: int = 0  # sequence length entering the LLM at prefill
    # pre-LLM shrink (None when the LLM sees the full prompt)
    orig_len: int = 0
    keep_cols_pre: torch.Tensor | None = None  # [B, L'] columns of the original prompt kept
    removed_pre: int = 0
    # LLM-stage state
    key_mask: torch.Tensor | None = None  # [B, L] real tokens in the LLM prompt
    visual_pos: torch.Tensor | None = None  # [B, Nv] positions of visual tokens in the current sequence
    visual_index: torch.Tensor | None = None  # [B, Nv] grid index (-1 for merged tokens)
    visual_scores: torch.Tensor | None = None  # [B, Nv] scores the pre-LLM stage attached, if any
    instruction_pos: torch.Tensor | None = None  # [B, Ni] (-1 padded)
    cur_cols: torch.Tensor | None = None  # [B, Lc] prompt columns in the current sequence (None = all)
    layer_cols: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> prompt cols it caches
    full_kwargs: dict[str, Any] = field(default_factory=dict)  # mask/positions/RoPE of the full prompt
    cur_kwargs: dict[str, Any] | None = None  # the same sliced to cur_cols (None = not computed yet)
    attn_inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    attn_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its k_proj output [B, L, Hkv*hd]
    captures: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    pruner_state: dict[str, Any] = field(default_factory=dict)
    vision_qkv: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # ViT layer -> its own q, k, v
    generators: list[torch.Generator] = field(default_factory=list)


@register_family("llava")
class LlavaAdapter:
    """Attach one pruner to a LlavaForConditionalGeneration through hooks (see module docstring)."""

    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    #: `mllm_adapters.tiny` functions building this family's tiny model and its config (no download)
    tiny_builders = ("build_tiny_llava", "tiny_llava_config")

    @classmethod
    def build_tiny(cls, **kwargs: Any) -> tuple[Any, Any]:
        """A tiny random model of this family built from config, and its processor (`mllm_adapters.tiny`)."""
        from mllm_adapters import tiny

        return getattr(tiny, cls.tiny_builders[0])(**kwargs)

    @classmethod
    def tiny_config(cls, **kwargs: Any) -> Any:
        """The config `build_tiny` builds (same keyword arguments but seed/attention), without weights."""
        from mllm_adapters import tiny

        return getattr(tiny, cls.tiny_builders[1])(tiny.TINY_VOCAB, **kwargs)

    def __init__(self, model: nn.Module, pruner: Pruner, handle: PruningHandle) -> None:
        self.model = model
        self.pruner = pruner
        self.handle = handle
        core = model.model
        self.vision_tower = core.vision_tower
        self.projector = core.multi_modal_projector
        self.lm = core.language_model
        self.config = model.config
        self._hooks: list[Any] = []
        self._local = threading.local()  # per-call state: one forward state per thread (`_fw`)
        self.tokenizer = None
        self.info = self._model_info()
        pruner.attach(self.info)
        self.positions = pruner.params.get("positions", "original")
        if self.positions not in ("original", "compact"):
            raise ValueError(f"positions must be 'original' or 'compact', got {self.positions!r}")
        self._llm_layers = sorted(set(pruner.llm_layers())) if "llm" in pruner.stages else []
        for k in self._llm_layers:
            if not 1 <= k < self.info.llm_num_layers:
                raise ValueError(
                    f"layer K={k} for method {pruner.name!r} is outside this model's decoder layers; "
                    f"accepted: 1..{self.info.llm_num_layers - 1} (layers before K see every token)"
                )
        self._vision_layers = sorted(set(pruner.vision_layers())) if "vision" in pruner.stages else []
        for k in self._vision_layers:
            if not 0 <= k <= self.info.vision_feature_layer:
                raise ValueError(
                    f"vision layer {k} for method {pruner.name!r} is outside 0..{self.info.vision_feature_layer} "
                    "(the ViT layers up to the one LLaVA feeds to the LLM)"
                )
        self._install()

    # ------------------------------------------------------------------------------------------
    def _model_info(self) -> ModelInfo:
        vcfg, tcfg = self.config.vision_config, self.config.text_config
        if not hasattr(self.vision_tower, "encoder") or not hasattr(self.vision_tower, "embeddings"):
            raise TypeError(
                f"the llava adapter supports CLIP-style vision towers (embeddings + encoder.layers); "
                f"got {type(self.vision_tower).__name__}"
            )
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer must be a single int for pruning, got {layer!r}")
        strategy = self.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported; accepted: 'default'")
        n_layers = vcfg.num_hidden_layers
        hs_index = layer % (n_layers + 1)  # index into hidden_states (0 = embeddings)
        if hs_index == 0:
            raise ValueError("vision_feature_layer selects the embeddings; no ViT layer to prune")
        side = vcfg.image_size // vcfg.patch_size
        has_cls = type(self.vision_tower.embeddings).__name__.startswith("CLIP")
        return ModelInfo(
            family="llava",
            num_visual_tokens=side * side,
            grid_hw=(side, side),
            has_cls=has_cls,
            vision_num_layers=n_layers,
            vision_feature_layer=hs_index - 1,
            vision_num_heads=vcfg.num_attention_heads,
            llm_num_layers=tcfg.num_hidden_layers,
            llm_hidden_size=tcfg.hidden_size,
            checkpoint_dir=(getattr(self.model, "name_or_path", None)
                            or getattr(self.config, "_name_or_path", None) or None),
        )

    def _install(self) -> None:
        self._hooks.append(self.model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True))
        # generate() would run the vision tower itself before the first forward (mm_encoder_outputs);
        # while attached, let the pixels reach the forward pass so the adapter's vision path runs once.
        self.model._supports_mm_encoder_outputs = lambda: False
        if self._llm_layers:
            first = self._llm_layers[0]
            for i, layer in enumerate(self.lm.layers):
                if i >= first:
                    self._hooks.append(layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))
            for i in set(self.pruner.llm_attention_layers()):
                attn = self.lm.layers[i].self_attn
                self._hooks.append(attn.register_forward_pre_hook(self._make_attn_capture(i), with_kwargs=True))
                self._hooks.append(attn.k_proj.register_forward_hook(self._make_key_capture(i)))
            for i in set(self.pruner.llm_capture_layers()):
                self._install_sublayer_capture(i)

    def remove(self) -> None:
        self.model.__dict__.pop("_supports_mm_encoder_outputs", None)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._fw = _Forward()

    # ---- pruner calls (optionally FLOP-counted) -----------------------------------------------
    def _call_pruner(self, fn, *args):
        if not self.handle.count_overhead_flops:
            return fn(*args)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            out = fn(*args)
        self.handle.overhead_flops += counter.get_total_flops()
        return out

    # ---- top-level hook: vision / pre-LLM stages and decode bookkeeping ------------------------
    # positional order of the model class's forward (for a hook that receives args)
    _FORWARD_ARGS: tuple[str, ...] = ("input_ids", "pixel_values", "attention_mask", "position_ids", "past_key_values")

    @property
    def _fw(self) -> _Forward:
        """This thread's forward state (prefill bookkeeping, then decode steps of its generate()).

        Kept per thread so two threads sharing one pruned model never see each other's positions,
        masks or kept tokens: each gets exactly its single-threaded result."""
        fw = getattr(self._local, "fw", None)
        if fw is None:
            fw = self._local.fw = self._new_forward()
        return fw

    @_fw.setter
    def _fw(self, value: _Forward) -> None:
        self._local.fw = value

    def _new_forward(self) -> _Forward:
        """Fresh per-forward state (a subclass may return its own `_Forward` subclass)."""
        return _Forward()

    def _start_forward(self, args: tuple, kwargs: dict) -> bool:
        """Common start of the top-level hook: positional ``args`` moved into ``kwargs``; in cached
        decoding the decode bookkeeping is done and False returned; on prefill a fresh forward state
        and cleared handle info, and True."""
        for name, value in zip(self._FORWARD_ARGS, args):
            kwargs[name] = value
        past = kwargs.get("past_key_values")
        if past is not None and past.get_seq_length() > 0:
            if kwargs.get("pixel_values") is not None:
                raise NotImplementedError("pruning an image into a non-empty KV cache is not supported")
            self._fw.phase = "decode"
            self._decode_step_inputs(kwargs)
            return False
        self._fw = self._new_forward()
        self.handle.overhead_flops = 0
        self.handle.kept_by_layer = {}
        self.handle.info = {}
        return True

    def _top_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, prefill = (), self._start_forward(args, kwargs)
        if not prefill:
            return args, kwargs
        pixel_values = kwargs.get("pixel_values")
        input_ids = kwargs.get("input_ids")
        if pixel_values is None or kwargs.get("mm_encoder_outputs") is not None:
            self.handle.kept_indices = []
            self._fw.prompt_len = input_ids.shape[1] if input_ids is not None else 0
            return args, kwargs
        if input_ids is None:
            raise ValueError("pruning needs input_ids (with image placeholder tokens), not inputs_embeds")
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_start = self._image_starts(input_ids)
        self._fw.generators = sample_generators(self.pruner.seed, pixel_values)
        features, patch_index, merged, anchor, scores = self._vision_and_pre_llm(
            pixel_values, input_ids, attention_mask, image_start
        )
        # [B, n, Dv] tokens for the LLM, in raster order (merged tokens interleaved by anchor or appended)
        tokens, token_index, token_scores = self._assemble(features, patch_index, merged, anchor, scores)
        image_features = self.projector(tokens)  # [B, n, Dt]
        n_keep = tokens.shape[1]
        n_all = self.info.num_visual_tokens
        B, L = input_ids.shape
        # Keep the first n_keep placeholders of each image run, drop the rest.
        ar = torch.arange(L, device=input_ids.device).expand(B, L)
        in_drop = (ar >= (image_start + n_keep)[:, None]) & (ar < (image_start + n_all)[:, None])
        keep_cols = ar[~in_drop].view(B, L - (n_all - n_keep))  # [B, L']
        kwargs["input_ids"] = input_ids.gather(1, keep_cols)
        kwargs["attention_mask"] = attention_mask.gather(1, keep_cols)
        if kwargs.get("position_ids") is not None:
            pos = kwargs["position_ids"]
            shift = in_drop.long().cumsum(1)  # dropped columns up to each column
            kwargs["position_ids"] = (pos - shift).gather(1, keep_cols) if pos.dim() == 2 else pos
        kwargs["pixel_values"] = None
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(image_features))}
        fw = self._fw
        fw.orig_len = L
        fw.removed_pre = n_all - n_keep
        fw.keep_cols_pre = keep_cols if n_keep < n_all else None
        fw.prompt_len = keep_cols.shape[1]
        kept = [token_index[b][token_index[b] >= 0] for b in range(B)]
        self.handle.kept_indices = kept
        self.handle.token_counts["merged"] = int((token_index[0] < 0).sum())
        # LLM-stage bookkeeping on the prompt the LLM will see
        vis_pos = (image_start[:, None] + torch.arange(n_keep, device=input_ids.device)[None, :])  # [B, n]
        fw.visual_pos = vis_pos
        fw.visual_index = token_index
        fw.visual_scores = token_scores
        fw.key_mask = kwargs["attention_mask"].bool()
        fw.instruction_pos = self._instruction_positions(vis_pos, fw.key_mask)
        self.handle.token_counts["llm_visual"] = [n_keep] * self.info.llm_num_layers
        return args, kwargs

    def _image_starts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B] index of the first image placeholder; checks one run of N placeholders per sample."""
        is_img = input_ids == self.config.image_token_id
        counts = is_img.sum(1)
        n = self.info.num_visual_tokens
        if not bool((counts == n).all()):
            raise ValueError(
                f"each sample must hold exactly one image of {n} placeholder tokens; got counts {counts.tolist()}"
            )
        return is_img.float().argmax(1)

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

    def _vision_and_pre_llm(self, pixel_values, input_ids, attention_mask, image_start):
        """Run the ViT up to the feature layer (vision-stage pruning between layers), then the pre-LLM pruner.

        Returns (features [B, n, Dv], patch_index [B, n], merged [B, m, Dv] | None, anchor [B, m] | None,
        scores [B, n + m] | None).
        """
        vt, info, pruner = self.vision_tower, self.info, self.pruner
        dtype = vt.embeddings.patch_embedding.weight.dtype
        hs = vt.embeddings(pixel_values.to(dtype))
        if hasattr(vt, "pre_layrnorm"):
            hs = vt.pre_layrnorm(hs)
        B, T, _ = hs.shape
        n_cls = T - info.num_visual_tokens
        patch_index = torch.arange(info.num_visual_tokens, device=hs.device).expand(B, -1)
        probe = set(pruner.vision_probe_layers()) if pruner.stages else set()
        layer_in: dict[int, torch.Tensor] = {}
        layer_out: dict[int, torch.Tensor] = {}
        vision_counts = []
        per_sample: list[list[int]] | None = None  # per-sample counts once a vision pruner goes ragged
        patch_mask: torch.Tensor | None = None  # [B, N] True = real patch (None: all real)
        layer_mask: dict[int, torch.Tensor | None] = {}
        prune_vision = "vision" in pruner.stages and not pruner.keeps_all
        capture = probe | (set(self._vision_layers) if prune_vision else set())
        for i in range(info.vision_feature_layer + 1):
            vision_counts.append(hs.shape[1])
            if per_sample is not None:
                real = (n_cls + patch_mask.sum(1)).tolist() if patch_mask is not None else [hs.shape[1]] * B
                for b in range(B):
                    per_sample[b].append(int(real[b]))
            h_in = hs
            key_mask = None if patch_mask is None else torch.cat(
                [torch.ones(B, n_cls, dtype=torch.bool, device=hs.device), patch_mask], dim=1)  # [B, T]
            hs = self._run_vision_layer(i, hs, self._vision_additive_mask(key_mask, hs.dtype), i in capture)
            if i in probe:
                layer_in[i], layer_out[i], layer_mask[i] = h_in, hs, key_mask
            if prune_vision and i in self._vision_layers:
                ctx = VisionLayerContext(
                    layer=i,
                    hidden_states=hs,
                    patch_index=patch_index,
                    info=info,
                    state=self._fw.pruner_state,
                    cls_attention=(lambda i=i, h=h_in, m=key_mask: self._cls_attention(i, h, m)),
                    qkv=(lambda i=i, h=h_in: self._vision_qkv(i, h)),
                    generators=self._fw.generators,
                    patch_mask=patch_mask,
                )
                keep = self._call_pruner(pruner.prune_vision, ctx)
                if i not in probe:
                    self._fw.vision_qkv.pop(i, None)
                if keep is not None:
                    # Raster order; -1 entries (a sample keeping fewer tokens) sort last and become padding.
                    valid = keep >= 0
                    order = torch.where(valid, keep, keep.new_full((), hs.shape[1]) + 1).argsort(dim=1, stable=True)
                    keep, valid = keep.gather(1, order).clamp(min=0), valid.gather(1, order)
                    hs = torch.cat([hs[:, :n_cls], _gather_seq(hs[:, n_cls:], keep)], dim=1)
                    patch_index = patch_index.gather(1, keep)
                    patch_mask = None if bool(valid.all()) else valid
                    if patch_mask is not None and per_sample is None:
                        per_sample = [list(vision_counts) for _ in range(B)]
        self.handle.token_counts = {"visual_in": info.num_visual_tokens, "vision": vision_counts}
        if per_sample is not None:  # "vision" holds the padded lengths actually computed
            self.handle.token_counts["vision_per_sample"] = per_sample
        if patch_mask is not None:
            raise ValueError(
                f"vision-stage method {pruner.name!r} left samples with different patch counts at the feature "
                f"layer ({patch_mask.sum(1).tolist()}); every sample must reach the same count"
            )
        features = hs[:, n_cls:]
        merged = anchor = scores = None
        if "pre_llm" in pruner.stages and not pruner.keeps_all:

            def need(i: int) -> int:
                return self._probed_layer(i, layer_in, probe)

            ctx = PreLLMContext(
                features=features,
                patch_index=patch_index,
                info=info,
                pixel_values=pixel_values,
                input_ids=input_ids,
                attention_mask=attention_mask,
                image_start=image_start,
                cls_attention=lambda i: self._cls_attention(need(i), layer_in[need(i)], layer_mask[need(i)]),
                vision_hidden=lambda i: layer_out[need(i)],
                vision_qkv=lambda i: self._vision_qkv(need(i), layer_in[need(i)]),
                project=self.projector,
                text_embeddings=lambda: self.lm.embed_tokens(input_ids),
                question_texts=lambda: self._question_texts(input_ids, attention_mask, image_start),
                generators=self._fw.generators,
                state=self._fw.pruner_state,
                vision_post_norm=getattr(self.vision_tower, "post_layernorm", None),
            )
            decision = self._call_pruner(pruner.prune_pre_llm, ctx)
            keep, order = decision.keep.sort(dim=1)
            if decision.scores is not None:
                k = keep.shape[1]
                scores = torch.cat([decision.scores[:, :k].gather(1, order), decision.scores[:, k:]], dim=1)
            if decision.merged_anchor is not None:
                anchor = patch_index.gather(1, decision.merged_anchor)
            features, patch_index = _gather_seq(features, keep), patch_index.gather(1, keep)
            merged = decision.merged
            self.handle.info.update(decision.info)
        self._fw.vision_qkv.clear()  # do not hold ViT q/k/v through decoding
        return features, patch_index, merged, anchor, scores

    @staticmethod
    def _assemble(features, patch_index, merged, anchor, scores):
        """Tokens for the LLM, their grid index (-1 for merged tokens) and scores, in raster order."""
        if merged is None or merged.shape[1] == 0:
            return features, patch_index, scores
        fill = torch.full(merged.shape[:2], -1, dtype=torch.long, device=merged.device)
        tokens = torch.cat([features, merged.to(features.dtype)], dim=1)
        index = torch.cat([patch_index, fill], dim=1)
        if anchor is not None:
            # Sort by (grid position, merged-after-kept): a recycled token sits at its anchor.
            key = torch.cat([patch_index * 2, anchor * 2 + 1], dim=1)
            order = key.argsort(dim=1, stable=True)
            tokens, index = _gather_seq(tokens, order), index.gather(1, order)
            scores = scores.gather(1, order) if scores is not None else None
        return tokens, index, scores

    def _probed_layer(self, i: int, layer_in: dict, probe) -> int:
        """ViT layer ``i`` (negative counts from the end) if the pruner declared it in
        ``vision_probe_layers()``; a ValueError naming the method otherwise."""
        i = i % self.info.vision_num_layers
        if i not in layer_in:
            raise ValueError(
                f"method {self.pruner.name!r} asked for ViT layer {i} but declared vision_probe_layers()="
                f"{sorted(probe)}; declare every layer it reads"
            )
        return i

    def _run_vision_layer(self, i: int, hs: torch.Tensor, mask: torch.Tensor | None, capture: bool) -> torch.Tensor:
        """Run ViT layer i; with ``capture``, keep the q/k/v its own attention computed (forward hooks on
        the projections), so pruners read them without recomputing three projections per layer."""
        layer = self.vision_tower.encoder.layers[i]
        if not capture:
            return layer(hs, mask)
        attn, out = layer.self_attn, {}
        names = ("q_proj", "k_proj", "v_proj")
        me = threading.get_ident()  # the modules are shared: keep only this thread's projections

        def grab(name: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                if threading.get_ident() == me:
                    out[name] = output
            return hook

        hooks = [getattr(attn, n).register_forward_hook(grab(n)) for n in names]
        try:
            hs_out = layer(hs, mask)
        finally:
            for h in hooks:
                h.remove()
        B, T, _ = hs.shape
        self._fw.vision_qkv[i] = tuple(out[n].view(B, T, -1, attn.head_dim).transpose(1, 2) for n in names)
        return hs_out

    def _vision_qkv(self, i: int, h_in: torch.Tensor):
        """(q, k, v) [B, H, T, Dh] of ViT layer i (captured during its forward, else recomputed from its input)."""
        cached = self._fw.vision_qkv.get(i)
        if cached is not None and cached[0].shape[2] == h_in.shape[1]:
            return cached
        layer = self.vision_tower.encoder.layers[i]
        x = layer.layer_norm1(h_in)
        attn = layer.self_attn
        B, T, _ = x.shape
        shape = (B, T, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        return q, k, v

    def _cls_attention(self, i: int, h_in: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N] head-mean softmax attention of the CLS query over all (real) keys, patch columns only."""
        if not self.info.has_cls:
            raise ValueError("this model's vision encoder has no [CLS] token")
        q, k, _ = self._vision_qkv(i, h_in)
        attn = self.vision_tower.encoder.layers[i].self_attn
        rows = attention_rows(q[:, :, :1], k, key_mask=key_mask, scale=attn.scale)  # [B, 1, T]
        return rows[:, 0, 1:]

    @staticmethod
    def _vision_additive_mask(key_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """[B, 1, 1, T] additive ViT attention mask hiding padded keys (None when every key is real)."""
        if key_mask is None:
            return None
        neg = torch.finfo(dtype).min
        return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill(~key_mask, neg)[:, None, None]

    def _question_texts(self, input_ids, attention_mask, image_start) -> list[str] | None:
        if self.tokenizer is None:
            return None
        n = self.info.num_visual_tokens
        out = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b, int(image_start[b]) + n :][attention_mask[b, int(image_start[b]) + n :].bool()]
            out.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return out

    def _decode_step_inputs(self, kwargs: dict) -> None:
        """Translate generate()'s full-length bookkeeping to the shrunk prompt (pre-LLM stage)."""
        fw = self._fw
        if fw.keep_cols_pre is None:
            return
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] >= fw.orig_len:
            kwargs["attention_mask"] = torch.cat(
                [mask[:, : fw.orig_len].gather(1, fw.keep_cols_pre), mask[:, fw.orig_len :]], dim=1
            )
        pos = kwargs.get("position_ids")
        if pos is not None:
            kwargs["position_ids"] = pos - fw.removed_pre

    # ---- LLM stage --------------------------------------------------------------------------
    def _make_attn_capture(self, i: int):
        def hook(module, args, kwargs):
            if self._fw.phase == "prefill":
                hs = kwargs.get("hidden_states", args[0] if args else None)
                self._fw.attn_inputs[i] = (hs, kwargs["position_embeddings"])

        return hook

    def _make_key_capture(self, i: int):
        """Keep layer i's own key projection [B, L, Hkv*hd] (pre-RoPE) so scoring does not recompute it."""

        def hook(module, args, output):
            if self._fw.phase == "prefill":
                self._fw.attn_keys[i] = output

        return hook

    def _install_sublayer_capture(self, i: int) -> None:
        """Capture (input, output) of layer i's attention and MLP sub-layers at prefill (for TTV)."""
        layer = self.lm.layers[i]

        def attn_hook(module, args, kwargs, output):
            if self._fw.phase == "prefill":
                cap = self._fw.captures.setdefault(i, {})
                cap["attn_in"] = kwargs.get("hidden_states", args[0] if args else None)
                cap["attn_out"] = output[0]

        def mlp_hook(module, args, output):
            if self._fw.phase == "prefill":
                cap = self._fw.captures.setdefault(i, {})
                cap["mlp_in"], cap["mlp_out"] = args[0], output

        self._hooks.append(layer.self_attn.register_forward_hook(attn_hook, with_kwargs=True))
        self._hooks.append(layer.mlp.register_forward_hook(mlp_hook))

    def _llm_attention_rows(self, layer_idx: int, queries: str, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, Nv] head-mean attention of layer ``layer_idx`` from the chosen query rows to the visual tokens."""
        fw = self._fw
        layer = self.lm.layers[layer_idx]
        if layer_idx in fw.attn_inputs:
            x, (cos, sin) = fw.attn_inputs[layer_idx]
            if x.shape[1] != hidden_states.shape[1]:
                raise ValueError(f"attention inputs of layer {layer_idx} are from a different sequence length")
        else:
            raise ValueError(
                f"method {self.pruner.name!r} asked for the attention of LLM layer {layer_idx} but declared "
                f"llm_attention_layers()={sorted(self.pruner.llm_attention_layers())}"
            )
        return self._rows_from(layer, x, cos, sin, queries, fw.attn_keys.get(layer_idx))

    def _rows_from(self, layer, x, cos, sin, queries: str, k_raw: torch.Tensor | None = None) -> torch.Tensor:
        """[B, Nv] head-mean attention rows from layer input ``x`` (after its norm); ``k_raw`` is the
        layer's own key projection of ``x`` when it was captured (else recomputed)."""
        fw = self._fw
        attn = layer.self_attn
        B, Lc, _ = x.shape
        key_mask = self._current(fw.key_mask)
        if queries == "last":
            qpos = (torch.arange(Lc, device=x.device) * key_mask).argmax(1, keepdim=True)  # [B, 1]
            qvalid = torch.ones_like(qpos, dtype=torch.bool)
        elif queries == "instruction":
            qpos = self._current_positions(fw.instruction_pos)
            qvalid = qpos >= 0
            qpos = qpos.clamp(min=0)
        else:
            raise ValueError(f"queries must be 'last' or 'instruction', got {queries!r}")
        hd = attn.head_dim
        xq = _gather_seq(x, qpos)  # [B, Nq, D]
        q = attn.q_proj(xq).view(B, qpos.shape[1], -1, hd).transpose(1, 2)  # [B, Hq, Nq, hd]
        if k_raw is None or k_raw.shape[:2] != x.shape[:2]:
            k_raw = attn.k_proj(x)
        k = k_raw.view(B, Lc, -1, hd).transpose(1, 2)  # [B, Hkv, Lc, hd]
        cos_b, sin_b = cos.expand(B, *cos.shape[1:]), sin.expand(B, *sin.shape[1:])
        q, _ = apply_rotary_pos_emb(q, q, _gather_seq(cos_b, qpos), _gather_seq(sin_b, qpos))
        k, _ = apply_rotary_pos_emb(k, k, cos_b, sin_b)
        vis = fw.visual_pos
        rows = attention_rows(
            q, k, key_mask=key_mask, query_pos=qpos, key_start=vis[:, 0], key_len=vis.shape[1], scale=attn.scaling
        )  # [B, Nq, Nv]
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
            if fw.visual_pos is None or fw.visual_pos.shape[1] == 0:
                return None
            hs = args[0] if args else kwargs.pop("hidden_states")
            rest = args[1:] if args else ()
            if fw.phase == "prefill":
                hs = self._prefill_layer(i, hs, kwargs)
            else:
                self._decode_layer(i, kwargs)
            return (hs, *rest), kwargs

        return hook

    def _prefill_layer(self, i: int, hs: torch.Tensor, kwargs: dict) -> torch.Tensor:
        fw, pruner = self._fw, self.pruner
        if fw.key_mask is None:  # no image went through the top-level hook
            return hs
        if i == self._llm_layers[0] and not fw.full_kwargs:
            fw.full_kwargs = {"attention_mask": kwargs.get("attention_mask"),
                         "position_ids": kwargs.get("position_ids"),
                         "position_embeddings": kwargs.get("position_embeddings")}
        if i in self._llm_layers and not pruner.keeps_all:
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
                captures=fw.captures,
                token_scores=fw.visual_scores,
            )
            keep = self._call_pruner(pruner.prune_llm, ctx).sort(dim=1).values  # [B, k] into visual tokens
            B, Lc = hs.shape[:2]
            vis = fw.visual_pos
            nv, k = vis.shape[1], keep.shape[1]
            ar = torch.arange(Lc, device=hs.device).expand(B, Lc)
            drop = torch.ones(B, nv, dtype=torch.bool, device=hs.device)
            drop.scatter_(1, keep, False)
            drop_full = torch.zeros(B, Lc, dtype=torch.bool, device=hs.device)
            drop_full.scatter_(1, vis, drop)
            local = ar[~drop_full].view(B, Lc - (nv - k))  # [B, Lc'] positions kept in the current sequence
            hs = _gather_seq(hs, local)
            base = fw.cur_cols if fw.cur_cols is not None else torch.arange(fw.prompt_len, device=hs.device).expand(B, -1)
            fw.cur_cols = base.gather(1, local)
            fw.visual_index = fw.visual_index.gather(1, keep)
            if fw.visual_scores is not None:
                fw.visual_scores = fw.visual_scores.gather(1, keep)
            fw.visual_pos = vis[:, :1] + torch.arange(k, device=hs.device)[None, :]
            fw.cur_kwargs = None
            idx = fw.visual_index
            self.handle.kept_indices = [idx[b][idx[b] >= 0] for b in range(B)]
            self.handle.kept_by_layer[i] = list(self.handle.kept_indices)
            counts = self.handle.token_counts.setdefault("llm_visual", [nv] * self.info.llm_num_layers)
            for j in range(i, self.info.llm_num_layers):
                counts[j] = k
        if fw.cur_cols is not None:
            fw.layer_cols[i] = fw.cur_cols
            if fw.cur_kwargs is None:
                fw.cur_kwargs = self._slice_prefill_kwargs()
            kwargs.update(fw.cur_kwargs)
        return hs

    def _rows_next(self, i: int, hs: torch.Tensor, queries: str) -> torch.Tensor:
        """Attention rows of layer i itself, computed from its input (its norm, q/k projections, RoPE)."""
        layer = self.lm.layers[i]
        x = layer.input_layernorm(hs)
        fw = self._fw
        # cur_kwargs is always computed by the time a later layer runs with cur_cols set
        current = fw.cur_kwargs if fw.cur_cols is not None else fw.full_kwargs
        cos, sin = current["position_embeddings"]
        return self._rows_from(layer, x, cos, sin, queries)

    def _advancing(self) -> torch.Tensor | None:
        """[B, L] True for LLM-prompt columns that advance the RoPE position count; None when all do.

        LLaVA-1.5 prompts have none that do not. Subclasses that insert inert slots (the LLaVA-NeXT
        adapter, to align ragged visual runs in a batch) override this so that dropping such a slot
        never shifts the positions of the tokens after it."""
        return None

    def _compact_positions(self, cols: torch.Tensor, orig_pos: torch.Tensor) -> torch.Tensor:
        """Renumber kept prompt columns contiguously: original position minus dropped columns before it."""
        B, L = self._fw.key_mask.shape
        kept = torch.zeros(B, L, dtype=torch.long, device=cols.device)
        kept.scatter_(1, cols, 1)
        dropped = 1 - kept  # [B, L]
        adv = self._advancing()
        if adv is not None:
            dropped = dropped * adv.long()
        dropped_before = dropped.cumsum(1)
        return orig_pos.expand(B, -1).gather(1, cols) - dropped_before.gather(1, cols)

    def _slice_prefill_kwargs(self) -> dict:
        fw, cols = self._fw, self._fw.cur_cols
        src = fw.full_kwargs
        out: dict[str, Any] = {}
        mask = src.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            out["attention_mask"] = _gather_seq(_gather_seq(mask, cols, dim=2), cols, dim=3)
        pos = src.get("position_ids")
        if pos is None:
            pos = torch.arange(fw.prompt_len, device=cols.device)[None, :]
        if self.positions == "compact":
            new_pos = self._compact_positions(cols, pos)
            out["position_ids"] = new_pos
            hs_dummy = src["position_embeddings"][0]
            out["position_embeddings"] = self.lm.rotary_emb(hs_dummy, position_ids=new_pos)
        else:
            out["position_ids"] = _gather_seq(pos, cols)
            cos, sin = src["position_embeddings"]
            out["position_embeddings"] = (_gather_seq(cos, cols), _gather_seq(sin, cols))
        return out

    def _decode_layer(self, i: int, kwargs: dict) -> None:
        fw = self._fw
        cols = fw.layer_cols.get(i)
        if cols is None:
            return
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            total = mask.shape[-1]
            B = cols.shape[0]
            new = torch.arange(fw.prompt_len, total, device=mask.device).expand(B, -1)
            key_cols = torch.cat([cols, new], dim=1)
            kwargs["attention_mask"] = _gather_seq(mask, key_cols, dim=3)
        if self.positions == "compact":
            adv = self._advancing()
            if adv is None:
                shift = fw.prompt_len - cols.shape[1]
            else:  # [B, 1] dropped columns that advanced the position count
                shift = (adv.sum(1) - adv.gather(1, cols).sum(1))[:, None]
            pos = kwargs.get("position_ids")
            if pos is None:
                raise ValueError("positions='compact' needs position_ids during decoding")
            new_pos = pos - shift
            kwargs["position_ids"] = new_pos
            kwargs["position_embeddings"] = self.lm.rotary_emb(kwargs["position_embeddings"][0], position_ids=new_pos)
