"""The engine: one pruner attached to one model through a family spec (hooks, handle, per-call state).

Three stages (`pruners.base`):
- ``vision`` and ``pre_llm``: a forward pre-hook on the top-level model runs the vision tower itself
  block by block (`VisionLoop`, `MultiView`), lets the pruner shrink the ViT sequence between blocks
  and/or pick the features that reach the LLM, projects them and rewrites the prompt to the kept
  tokens (`PromptSurgery`); the model's own forward then runs on that prompt with those features.
- ``llm``: forward pre-hooks on decoder layers >= K slice the sequence (`LLMStage`).

Per-call state lives in a per-thread `Forward`, so concurrent forwards and generates on one pruned
model give exactly their single-threaded results. Everything family-specific is asked of
``self.spec`` (`FamilySpec`).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import torch
from torch import nn

from mllm_adapters.engine.diagnostics import Diagnostics
from mllm_adapters.engine.encoded import EncodedImages
from mllm_adapters.engine.layout import ImageRun
from mllm_adapters.engine.llm import LLMStage
from mllm_adapters.engine.prompt import PromptSurgery
from mllm_adapters.engine.spec import FamilySpec
from mllm_adapters.engine.state import Forward
from mllm_adapters.engine.text_tower import TextTowers
from mllm_adapters.engine.views import MultiView
from mllm_adapters.engine.vision import VisionLoop
from mllm_adapters.handle import BatchCounts, PruningHandle, TokenCounts
from pruners.base import Pruner, sample_generators

#: guards the lazy creation of an engine's text-tower cache (`Engine._text_patch_similarity`)
_TOWERS_LOCK = threading.Lock()


class Engine(VisionLoop, MultiView, EncodedImages, PromptSurgery, LLMStage, Diagnostics):
    """Attach one pruner to a model of any registered family (see the module docstring)."""

    def __init__(self, spec: FamilySpec, pruner: Pruner, handle: PruningHandle) -> None:
        self.spec = spec
        self.model = spec.model
        self.pruner = pruner
        self.handle = handle
        self._hooks: list[Any] = []
        self._local = threading.local()  # per-call state: one forward state per thread (`_fw`)
        self._tile_pruners: dict[tuple, Pruner] = {}
        #: False when the model keeps per-call state of its own (`FamilySpec.keeps_call_state`): only
        #: the first thread that runs it may use it while attached, others get a RuntimeError
        self.thread_safe = not spec.keeps_call_state
        self._owner: int | None = None
        self._owner_lock = threading.Lock()
        self.tokenizer = None
        spec.check_pruner(pruner)
        self.info = spec.model_info()
        pruner.attach(self.info)
        self.positions = pruner.positions  # the position handling the pruner declares
        if self.positions is None:  # the family's: compact where it is defined
            self.positions = "compact" if spec.compact_llm_positions else "original"
        if not spec.compact_llm_positions and self.positions == "compact" and "llm" in pruner.stages:
            raise ValueError(
                f"method {pruner.name!r}: positions='compact' is not defined for {type(self.model).__name__}, whose "
                "tokens keep their original (M-RoPE) positions; pass positions='original'"
            )
        if self.positions not in ("original", "compact"):
            raise ValueError(f"positions must be 'original' or 'compact', got {self.positions!r}")
        self._llm_layers = sorted(set(pruner.llm_layers())) if "llm" in pruner.stages else []
        for k in self._llm_layers:
            if not 1 <= k < self.info.llm_num_layers:
                raise ValueError(
                    f"layer K={k} for method {pruner.name!r} is outside this model's decoder layers; "
                    f"accepted: 1..{self.info.llm_num_layers - 1} (layers before K see every token)"
                )
        if not spec.vision_loop and not spec.vision_probes and "pre_llm" in pruner.stages \
                and pruner.vision_probe_layers():
            raise ValueError(
                f"method {pruner.name!r} reads the vision encoder's blocks, which the engine cannot read for "
                f"{type(self.model).__name__}; methods scoring the image features or pruning inside the LLM run "
                "on it (e.g. random, divprune, pooling, fastv, pdrop, transprune)"
            )
        if not spec.vision_loop and "vision" in pruner.stages:
            raise ValueError(f"method {pruner.name!r} prunes inside the vision encoder, which the engine does not "
                             f"run block by block for {type(self.model).__name__}")
        for layer in pruner.vision_probe_layers() if "pre_llm" in pruner.stages else ():
            if not -self.info.vision_num_layers <= layer < self.info.vision_num_layers:
                raise ValueError(f"method {pruner.name!r}: vision probe layer {layer} is outside this model's "
                                 f"{self.info.vision_num_layers} ViT layers")
        self._vision_layers = sorted(set(pruner.vision_layers())) if "vision" in pruner.stages else []
        for k in self._vision_layers:
            if not 0 <= k <= self.info.vision_feature_layer:
                raise ValueError(
                    f"vision layer {k} for method {pruner.name!r} is outside 0..{self.info.vision_feature_layer} "
                    "(the ViT layers up to the one the model feeds to the LLM)"
                )
        self._install()

    @property
    def family(self) -> str:
        return self.spec.name

    # ---- hook life cycle ------------------------------------------------------------------------
    def _install(self) -> None:
        self._hooks.append(self.model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True))
        self.spec.follow_llm_sequence(lambda: self._fw.cur_cols)  # this thread's sequence inside the LLM
        self.spec.prepare()
        if self._llm_layers:
            first = self._llm_layers[0]
            for i, layer in enumerate(self.spec.decoder_layers()):
                if i >= first:
                    self._hooks.append(layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))
            for i in set(self.pruner.llm_attention_layers()):
                attn = self.spec.text_attention(i)
                self._hooks.append(attn.module.register_forward_pre_hook(self._make_attn_capture(i), with_kwargs=True))
                keys = attn.key_output if attn.key_output is not None else attn.k
                self._hooks.append(keys.register_forward_hook(self._make_key_capture(i)))
                if attn.v is not None:
                    self._hooks.append(attn.v.register_forward_hook(self._make_key_capture(i, values=True)))
            for i in set(self.pruner.llm_capture_layers()):
                self._install_sublayer_capture(i)

    def remove(self) -> None:
        self.spec.restore()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._diag_installed = False
        self._fw = Forward()

    # ---- pruner calls (optionally FLOP-counted) -----------------------------------------------
    def _call_pruner(self, fn, *args):
        if not self.handle.count_overhead_flops:
            return fn(*args)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            out = fn(*args)
        self.handle.overhead_flops += counter.get_total_flops()
        return out

    # ---- per-call state -------------------------------------------------------------------------
    @property
    def _fw(self) -> Forward:
        """This thread's forward state (prefill bookkeeping, then decode steps of its generate()).

        Kept per thread so two threads sharing one pruned model never see each other's positions,
        masks or kept tokens: each gets exactly its single-threaded result."""
        fw = getattr(self._local, "fw", None)
        if fw is None:
            fw = self._local.fw = Forward()
        return fw

    @_fw.setter
    def _fw(self, value: Forward) -> None:
        self._local.fw = value

    def _start_forward(self, args: tuple, kwargs: dict) -> bool:
        """Common start of the top-level hook: positional ``args`` moved into ``kwargs``; in cached
        decoding the decode bookkeeping is done and False returned; on prefill a fresh forward state
        and cleared handle info, and True."""
        for name, value in zip(self.spec.forward_args, args):
            kwargs[name] = value
        if not self.thread_safe:
            self._check_thread()
        past = kwargs.get("past_key_values")
        if past is not None and past.get_seq_length() > 0:
            if kwargs.get("pixel_values") is not None:
                raise NotImplementedError("pruning an image into a non-empty KV cache is not supported")
            self._fw.phase = "decode"
            self._decode_step_inputs(kwargs)
            return False
        self._fw = Forward()
        self.handle.token_counts = []
        self.handle.batch_counts = BatchCounts()
        self.handle.overhead_flops = 0
        self.handle.kept_by_layer = {}
        self.handle.info = {}
        self.handle.diagnostics = None
        return True

    def _check_thread(self) -> None:
        """Refuse a second thread on a model that keeps per-call state on itself (`thread_safe`)."""
        me = threading.get_ident()
        with self._owner_lock:
            if self._owner is None:
                self._owner = me
            elif self._owner != me:
                raise RuntimeError(
                    f"this {type(self.model).__name__} keeps per-call state on the model itself, so one pruned "
                    f"model cannot serve two threads: it is in use by thread {self._owner}, called from thread "
                    f"{me}. Attach a pruner to one model copy per thread."
                )

    # ---- top-level hook: vision / pre-LLM stages and decode bookkeeping ------------------------
    def _top_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, prefill = (), self._start_forward(args, kwargs)
        if not prefill:
            return args, kwargs
        fw = self._fw
        pixel_values = kwargs.get("pixel_values")
        input_ids = kwargs.get("input_ids")
        if not self.spec.has_images(kwargs):
            self.handle.kept_indices = []
            fw.prompt_len = input_ids.shape[1] if input_ids is not None else 0
            if self.handle.record_diagnostics:
                self._diag_begin(kwargs)
            return args, kwargs
        if input_ids is None:
            raise ValueError("pruning needs input_ids (with image placeholder tokens), not inputs_embeds")
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        layouts = self.spec.image_layouts(kwargs)
        runs = self._image_runs(input_ids, layouts)
        fw.sample_runs = [[r.n_packed for r in runs if r.sample == b] for b in range(input_ids.shape[0])]
        one_each = [r.sample for r in runs] == list(range(input_ids.shape[0]))
        if self.spec.vision_loop and one_each and all(r.layout.is_single_view for r in runs):
            starts = torch.tensor([r.start for r in runs], device=input_ids.device)
            self._uniform_prefill(kwargs, pixel_values, input_ids, attention_mask, starts)
        else:
            self._ragged_prefill(kwargs, pixel_values, input_ids, attention_mask, runs)
        if self.handle.record_diagnostics:
            self._diag_begin(kwargs)  # observes the LLM prompt; never changes it
        return args, kwargs

    def _uniform_prefill(self, kwargs, pixel_values, input_ids, attention_mask, image_start) -> None:
        """Every image is one full view of the same size: the batch goes through the ViT and the
        pruner together, and every run keeps the same number of tokens."""
        self._fw.generators = sample_generators(self.pruner.seed, pixel_values)
        features, patch_index, merged, anchor, scores = self._vision_and_pre_llm(
            pixel_values, input_ids, attention_mask, image_start
        )
        # [B, n, Dv] tokens for the LLM, in raster order (merged tokens interleaved by anchor or appended)
        tokens, token_index, token_scores = self._assemble(features, patch_index, merged, anchor, scores)
        self._shrink_uniform(kwargs, input_ids, attention_mask, image_start, tokens, token_index, token_scores)

    def _ragged_prefill(self, kwargs, pixel_values, input_ids, attention_mask, runs: list[ImageRun]) -> None:
        """Images of several views, extra slots or different sizes, or samples with several images or
        none: per-view pruning (`MultiView`), then each run rewritten to a common width with inert slots
        (`PromptSurgery._rewrite_prompt`). Counts are made per image, then summed per sample."""
        layouts = [r.layout for r in runs]
        n_packed = [lay.n_packed for lay in layouts]
        n_layers = self.info.llm_num_layers
        if self.pruner.keeps_all:  # the model runs untouched
            self.handle.kept_indices = [torch.arange(n, device=input_ids.device) for n in n_packed]
            # the untouched model projects every patch of every view (before unpadding); an image the spec
            # encodes itself projects one feature per slot of its run, on each view's grid (`encoded.py`)
            own = self.spec.vision_loop
            self.handle.token_counts = [
                TokenCounts(visual_in=lay.n_packed, views=lay.n_tiles,
                            projector=lay.n_tiles * self._n2 if own else lay.n_packed,
                            llm_visual=[lay.n_packed] * n_layers,
                            feature_grids=None if own else [(r1 - r0, c1 - c0) for r0, r1, c0, c1 in lay.rects])
                for lay in layouts
            ]
            self.handle.batch_counts = BatchCounts(llm_visual_width=[max(n_packed, default=0)] * n_layers)
            self._per_sample_counts(runs, input_ids.shape[0])
            self._fw.prompt_len = input_ids.shape[1]
            return
        if "vision" in self.pruner.stages and len(self.pruner.stages) > 1:
            raise ValueError(
                f"method {self.pruner.name!r} combines vision-stage pruning with {list(self.pruner.stages)}: "
                "supported only for batches of one single-view image per sample"
            )
        if not self.spec.vision_loop:  # the spec encodes the images; pruners see their features only
            per_image = self._encoded_pre_llm(kwargs, runs, input_ids, attention_mask)
            self._rewrite_prompt(kwargs, input_ids, attention_mask, runs, per_image)
            self._per_sample_counts(runs, input_ids.shape[0])
            return
        tiles = self.spec.views(pixel_values, layouts)  # [T, 3, S, S]
        first_tile = [0]
        for lay in layouts[:-1]:
            first_tile.append(first_tile[-1] + lay.n_tiles)
        if "vision" in self.pruner.stages:
            per_image = self._views_vision_stage(tiles, first_tile, layouts)
        else:
            per_image = self._views_vision_and_pre_llm(tiles, first_tile, runs, input_ids, attention_mask)
        self._rewrite_prompt(kwargs, input_ids, attention_mask, runs, per_image)
        self._per_sample_counts(runs, input_ids.shape[0])

    def _image_keep_count(self, n: int, layer: int) -> int:
        """Visual tokens an image of ``n`` tokens keeps from in-LLM layer ``layer`` on: all of them within
        its budget, else the pruner's `llm_keep_count` on a copy attached to an image of that size (its
        own schedule, and a fraction budget's own share)."""
        p = self.pruner
        budget = p.budget_for(n)
        if budget is None or budget >= n:
            return n
        key = ("llm", budget, n)
        if key not in self._tile_pruners:
            clone = type(p)(budget=budget, seed=p.seed, **p.params)
            clone.attach(dataclasses.replace(self.info, num_visual_tokens=n))
            self._tile_pruners[key] = clone
        return min(n, self._tile_pruners[key].llm_keep_count(layer))

    def _per_sample_counts(self, runs: list[ImageRun], batch: int) -> None:
        """Turn the per-image ``handle.token_counts`` into per-sample ones (`TokenCounts.total`)."""
        per_image = self.handle.token_counts
        n_layers = self.info.llm_num_layers
        if not self.spec.vision_loop:  # what the spec's own encoding ran (`FamilySpec.encoded_image_counts`)
            for c, r in zip(per_image, runs):
                for field, value in (self.spec.encoded_image_counts(r.layout) or {}).items():
                    setattr(c, field, value)
        self.handle.token_counts = [
            TokenCounts.total([c for c, r in zip(per_image, runs) if r.sample == b], n_layers) for b in range(batch)
        ]

    # ---- services offered to pruners through their contexts ------------------------------------
    def _text_patch_similarity(self, folder, features, texts_fn, prepare=None):
        """`PreLLMContext.text_patch_similarity`: ``features`` against the question texts through a CLIP
        text tower (``folder``, or the checkpoint's ``text_tower/``), the towers cached on this engine."""
        towers = getattr(self, "_text_towers", None)
        if towers is None:
            with _TOWERS_LOCK:
                towers = getattr(self, "_text_towers", None)
                if towers is None:
                    towers = self._text_towers = TextTowers()
        return towers.similarity(folder, self.info.checkpoint_dir, features, self.spec.vision_post_norm(),
                                 texts_fn, prepare)
