"""The Pruner interface and the contexts the adapter hands to it.

A pruner never touches transformers internals. The adapter (`mllm_adapters/`) runs the model and
calls the pruner at the stage(s) it declares, handing it a context object whose expensive fields
(attention rows, q/k/v, embeddings) are computed only when the pruner asks for them.

Stages (how the engine runs each: docs/engine.md; what ``budget`` counts at each: docs/flops.md):
- ``vision``: after chosen ViT layers; the pruner returns which patch tokens continue (CLS is kept).
- ``pre_llm``: on the selected vision features (CLS dropped, before the projector); the pruner
  returns the patches to keep and optionally merged tokens. The LLM sees a shorter, contiguous prompt.
- ``llm``: before decoder layer K (after K full layers); the pruner returns which of the current
  visual tokens continue, optionally with extra (merged) tokens inserted after them (`LLMDecision`).
  Later layers (and their KV cache) see only those.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from pruners.ops import attention_rows
from pruners.params import Param

STAGES = ("vision", "pre_llm", "llm")
#: Every pruner's ``seed`` argument (``uses_seed`` says whether the result depends on it).
SEED = Param(int, 0, doc="seed of the method's random draws")


@dataclass(frozen=True)
class ModelInfo:
    """What a pruner may know about the model it is attached to (filled by the adapter)."""

    family: str  # "llava"
    num_visual_tokens: int  # visual tokens per image reaching the LLM unpruned (576 for LLaVA-1.5)
    grid_hw: tuple[int, int]  # patch grid (rows, cols)
    has_cls: bool  # vision encoder has a [CLS] token at position 0
    vision_num_layers: int
    vision_feature_layer: int  # non-negative index of the ViT layer whose output LLaVA feeds the LLM
    vision_num_heads: int
    llm_num_layers: int
    llm_hidden_size: int
    #: the folder (or hub id) the model was loaded from, for methods that ship an extra tower beside
    #: the checkpoint (recoverable's CLIP text tower in ``<checkpoint_dir>/text_tower``); None if unknown
    checkpoint_dir: str | None = None
    #: the per-channel mean/std the model's image processor normalised ``pixel_values`` with
    #: ((x - mean) / std, x in [0, 1]; R, G, B); None if unknown
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None


@dataclass
class PreLLMDecision:
    """What a pre-LLM pruner returns.

    keep:    [B, k] indices into ``ctx.features``' token axis (the adapter sorts them into raster order).
    merged:  optional [B, m, Dv] extra tokens (vision-feature space, before the projector), e.g. merged
             or recycled tokens. Appended after the kept tokens unless ``merged_anchor`` is given.
    merged_anchor: optional [B, m] indices (same axis as ``keep``) giving where each merged token sits
             in raster order, right after that token (VFlowOpt places a recycled token at its cell's most
             important token); -1 puts it before every token of the image (of the tile, on LLaVA-NeXT:
             VisionZip's CLS token). Merged tokens sharing an anchor keep their order.
    info:    free-form facts for the results (e.g. ``{"text_similarity": "llm_embeddings"}``).
    scores:  optional [B, k + m] per-token scores (kept tokens in ``keep``'s order, then merged ones);
             the adapter carries them with the tokens into the LLM stage as
             ``LLMLayerContext.token_scores`` (e.g. VFlowOpt's progressive in-LLM drops).
    """

    keep: torch.Tensor
    merged: torch.Tensor | None = None
    merged_anchor: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LLMDecision:
    """What an in-LLM pruner may return instead of a plain [B, k] index tensor.

    keep:    [B, k] indices into the current visual tokens (``ctx.visual_pos``' axis), as a plain return;
             pick them with ``ctx.keep_top`` (its filler slots are honoured as for a plain return).
    merged:  optional [B, m, D] hidden states of extra tokens (e.g. SparseVLM's recycled cluster means)
             inserted right after the kept visual tokens, in this order. From layer K on they are visual
             tokens like the kept ones (grid index -1 in ``ctx.visual_index``; a later stage may keep or
             drop them) and they enter the KV cache. Their positions: ``positions="compact"`` numbers them
             right after the last kept visual token (the tokens after them shift by their count);
             ``"original"`` gives each the original position of its sample's last visual token.
    merged_counts: optional [B] real merged tokens per sample (the first ``merged_counts[b]`` of
             ``merged[b]``); the slots beyond are padding, turned into inert slots. None: all m are real.
    """

    keep: torch.Tensor
    merged: torch.Tensor | None = None
    merged_counts: torch.Tensor | None = None


class Pruner:
    """Base class. Subclasses set ``stages``, ``parameters`` and implement the matching ``prune_*``.

    ``budget`` is the number of visual tokens per image that reach the LLM (for in-LLM methods: that
    remain after the last pruning layer); ``None`` keeps everything.
    """

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ()
    requires_cls: ClassVar[bool] = False
    #: (parameter, what to pass instead) when the method needs [CLS] only with that parameter set to
    #: ``"cls"`` (vispruner's ``importance``, fopru's ``significance``): refused at attach on encoders
    #: without one, naming the alternative
    cls_param: ClassVar[tuple[str, str] | None] = None
    #: Behaviour version: bump it whenever the method's output for the same inputs changes. It is part
    #: of every result cell's identity, so cells computed by the old behaviour are never reused.
    version: ClassVar[int] = 1
    #: True when the result depends on ``seed`` (a random draw): ``seeds=[...]`` runs it once per seed.
    uses_seed: ClassVar[bool] = False
    #: Conformance-suite invariants this method is exempt from, each with the reason
    #: (``{"pre_llm_equals_kept_tokens": "merges tokens: no kept-token prompt to compare with"}``);
    #: tests/test_conformance.py lists the invariant names.
    conformance_opt_outs: ClassVar[dict[str, str]] = {}
    #: Parameters the conformance suite attaches with, when the defaults refuse models the method has
    #: found nothing for (``{"schedule": "depth_scaled"}``: gsearch's documented depth-scaled default)
    conformance_params: ClassVar[dict[str, Any]] = {}
    #: parameter name -> its typed declaration (`pruners.params.Param`); anything else passed to the
    #: constructor is an error. The only place a pruner lists its parameters.
    parameters: ClassVar[dict[str, Param]] = {}
    #: Derived from ``parameters`` (never set by hand): name -> default value.
    defaults: ClassVar[dict[str, Any]] = {}
    #: Derived from ``parameters`` (never set by hand): name -> the tuner's range,
    #: ("int"|"float", low, high) or ("categorical", [choices]).
    search_space: ClassVar[dict[str, tuple]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        by_hand = [k for k in ("defaults", "search_space") if k in own]
        if by_hand:
            # Test-only pruners outside the package may still list untyped defaults (any value accepted).
            legacy = by_hand == ["defaults"] and "parameters" not in own and not cls.__module__.startswith("pruners.")
            if not legacy:
                raise TypeError(
                    f"{cls.__qualname__} sets {' and '.join(by_hand)} by hand; declare every parameter once in "
                    f"`parameters = {{name: Param(kind, default, ..., search=...)}}` (pruners.params.Param): "
                    f"defaults and search_space are derived from it"
                )
            cls.parameters = {k: Param(object, v) for k, v in own["defaults"].items()}
        for pname, param in cls.parameters.items():
            if not isinstance(param, Param):
                raise TypeError(f"{cls.__qualname__}.parameters[{pname!r}] must be a pruners.params.Param, got {param!r}")
            param.validate_declaration(pname, cls.__qualname__)
            if param.folds_into is not None and param.folds_into not in cls.parameters:
                raise TypeError(f"{cls.__qualname__}.parameters[{pname!r}] folds into unknown {param.folds_into!r}")
        cls.defaults = {k: p.default for k, p in cls.parameters.items() if p.folds_into is None}
        cls.search_space = {k: p.search for k, p in cls.parameters.items() if p.search is not None}

    #: a declared configuration's fixed parameter values (`Pruner.configuration`): not settable, recorded
    fixed_params: ClassVar[dict[str, Any]] = {}

    @classmethod
    def configuration(cls, name: str, fixed: dict[str, Any], doc: str) -> type[Pruner]:
        """A registered method that is this one with ``fixed`` parameter values (FasterVLM is vtc_cls at
        the feature layer only): a few lines of data, not a copied class. Its other parameters stay
        settable; the fixed ones are recorded in results like any parameter."""
        from pruners.registry import register_pruner

        for k, v in fixed.items():
            if k not in cls.parameters:
                raise TypeError(f"configuration {name!r}: {cls.__name__} has no parameter {k!r}")
            cls.parameters[k].check(k, v, name)
        body = {"parameters": {k: p for k, p in cls.parameters.items() if k not in fixed},
                "fixed_params": {**cls.fixed_params, **fixed}, "__doc__": doc,
                "__module__": cls.__module__, "__qualname__": f"{cls.__qualname__}[{name}]"}
        return register_pruner(name)(type(f"{cls.__name__}_{name}", (cls,), body))

    def __init__(self, budget: int | None = None, seed: int = 0, **params: Any) -> None:
        declared = self.parameters
        for k, v in self.fixed_params.items():  # copies of a configuration pass its fixed values back
            if k in params:
                if params[k] != v:
                    raise ValueError(f"parameter {k!r} of method {self.name!r} is fixed to {v!r} (a declared "
                                     f"configuration); got {params[k]!r}")
                del params[k]
        unknown = sorted(set(params) - set(declared))
        if unknown:
            accepted = ", ".join(sorted(declared)) or "(none)"
            raise ValueError(
                f"unknown parameter(s) {unknown} for method {self.name!r}; accepted: budget, seed, {accepted}"
            )
        if isinstance(budget, float) and not isinstance(budget, bool):
            if not 0.0 < budget < 1.0:
                raise ValueError(f"budget={budget!r}: a float budget is a fraction of each image's visual tokens, "
                                 "accepted: 0 < budget < 1 (or a positive int, or None)")
        elif budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise TypeError(f"budget must be a positive int, a fraction in (0, 1) or None, got {budget!r}")
        elif budget is not None and budget <= 0:
            raise ValueError(f"budget must be a positive int (visual tokens per image), a fraction in (0, 1) or "
                             f"None, got {budget}")
        #: a fraction budget: that share of each image's own visual tokens (`resolve_budget`), else None
        self.budget_fraction: float | None = float(budget) if isinstance(budget, float) else None
        SEED.check("seed", seed, self.name)
        for k, v in params.items():
            declared[k].check(k, v, self.name)
        self.budget = budget
        self.seed = int(seed)
        given = {k: v for k, v in params.items() if declared[k].folds_into is None}
        #: the resolved parameters (defaults + given), as recorded in results
        self.params: dict[str, Any] = {**copy.deepcopy(self.defaults), **given, **copy.deepcopy(self.fixed_params)}
        #: given flat spellings (``Param.folds_into``; null = not given), for ``check_params`` to fold
        #: into ``self.params``
        self.folded_params: dict[str, Any] = {k: v for k, v in params.items() if k not in given and v is not None}
        self.info: ModelInfo | None = None
        self.check_params()

    def content_identity(self) -> dict[str, str]:
        """Digests of the files the method reads that define its behaviour (dyvte's router weights), by
        parameter name; {} for methods that read none. Part of every result cell's identity, so files
        retrained or replaced under the same path never reuse old cells."""
        return {}

    def check_params(self) -> None:
        """Constraints between parameters (each declared value is already checked): raise a ValueError
        naming the parameters involved. Model-dependent checks belong in ``attach(info)``."""

    # ---- attachment -------------------------------------------------------------------------
    def attach(self, info: ModelInfo) -> None:
        """Validate against the model. Subclasses extending this must call super().attach(info)."""
        if self.requires_cls and not info.has_cls:
            raise ValueError(
                f"method {self.name!r} scores tokens with the vision encoder's [CLS] token, but the vision encoder "
                f"of this {info.family} model has none; use a method that does not need CLS (e.g. random, pooling, "
                f"divprune, fastv)"
            )
        if self.cls_param is not None and self.params[self.cls_param[0]] == "cls" and not info.has_cls:
            param, instead = self.cls_param
            raise ValueError(
                f"method {self.name!r} with {param}='cls' scores tokens by the vision encoder's [CLS] attention, "
                f"but the vision encoder of this {info.family} model has no [CLS] token; pass {instead}"
            )
        if self.budget_fraction is not None:  # the model's count; the engine resolves each image's own
            self.budget = resolve_budget(self.budget_fraction, info.num_visual_tokens)
        check_budget_fits(self.budget, info)
        self.info = info

    def budget_for(self, n_tokens: int) -> int | None:
        """The budget of an image of ``n_tokens`` visual tokens: a fraction budget's share of them
        (`resolve_budget`), else ``budget``."""
        return resolve_budget(self.budget_fraction, n_tokens) if self.budget_fraction is not None else self.budget

    @property
    def chooses_budget(self) -> bool:
        """True when this configuration picks its own token count (run it with ``budget=None``; the
        benchmark's ``budgets=[auto]``). For every other method ``None`` means keep all."""
        return False

    @property
    def positions(self) -> str | None:
        """How the engine numbers the visual tokens an in-LLM stage keeps: ``"original"`` (their RoPE
        positions, as FastV does), ``"compact"`` (renumbered contiguously) or None (compact where the
        model family defines it, else original). The ``positions`` parameter where a method declares one
        (`pruners.params.POSITIONS`), else ``"original"``."""
        return self.params.get("positions", "original")

    @property
    def keeps_all(self) -> bool:
        if self.chooses_budget:  # budget=None means "the method decides", not "keep all"
            return False
        return self.budget is None or (self.info is not None and self.budget >= self.info.num_visual_tokens)

    # ---- stage: vision ------------------------------------------------------------------------
    def vision_layers(self) -> list[int]:
        """Non-negative ViT layer indices after which ``prune_vision`` is called."""
        return []

    def prune_vision(self, ctx: VisionLayerContext) -> torch.Tensor | None:
        """Return [B, k] indices into the current patch tokens (CLS excluded) to keep, or None.

        A sample that keeps fewer tokens than others pads its row with -1 (ragged batch: the adapter
        masks the padding as keys in later layers, so each image is processed as if alone). Every
        sample must keep the same count by the feature layer.
        """
        raise NotImplementedError

    # ---- stage: pre_llm ----------------------------------------------------------------------
    def vision_probe_layers(self) -> list[int]:
        """ViT layers (non-negative) whose attention / q,k,v / output ``prune_pre_llm`` will read."""
        return []

    def prune_pre_llm(self, ctx: PreLLMContext) -> PreLLMDecision:
        raise NotImplementedError

    # ---- stage: llm ----------------------------------------------------------------------------
    def llm_layers(self) -> list[int]:
        """Decoder-layer indices K (1..L-1): layers K.. see only the tokens kept at K."""
        return []

    def llm_attention_layers(self) -> list[int]:
        """Already-run decoder layers whose attention rows ``prune_llm`` reads (default: K-1 for each K)."""
        return [k - 1 for k in self.llm_layers()]

    def llm_capture_layers(self) -> list[int]:
        """Decoder layers whose attention/MLP sub-layer inputs and outputs are captured at prefill
        (``ctx.captures[layer]`` = {"attn_in", "attn_out", "mlp_in", "mlp_out"}, each [B, L, D], and
        "layer_in", the decoder layer's own input: for layer 0 the LLM's input embeddings)."""
        return []

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor | LLMDecision:
        """Return [B, k] indices into the current visual tokens (``ctx.visual_pos``' axis) to keep; pick
        them with ``ctx.keep_top(scores, self.llm_keep_count(ctx.layer))`` so each sample keeps its own
        count. An `LLMDecision` adds merged tokens after the kept ones."""
        raise NotImplementedError

    def llm_keep_count(self, layer: int) -> int:
        """Visual tokens of one image kept from in-LLM pruning layer ``layer`` on (after attach; the engine
        asks a copy attached to each image's own token count): the budget, unless a schedule says
        otherwise."""
        return self.budget

    # ---- helpers -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Parameters as recorded in results (JSON-serialisable)."""
        return {"method": self.name, "budget": self.budget, "seed": self.seed, **self.params}


def resolve_budget(fraction: float, n_tokens: int) -> int:
    """``fraction`` of ``n_tokens``, rounded half up, at least 1 (a fraction budget of one image)."""
    return max(1, int(math.floor(fraction * n_tokens + 0.5)))


def check_budget_fits(budget: int | None, info: ModelInfo) -> None:
    """A budget above the model's visual tokens per image is an error naming the accepted range."""
    if budget is not None and budget > info.num_visual_tokens:
        raise ValueError(
            f"budget={budget} is above the {info.num_visual_tokens} visual tokens per image this model "
            f"produces; accepted: 1..{info.num_visual_tokens} or None (keep all)"
        )


def sample_generators(seed: int, pixel_values: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per image, seeded from (seed, image content).

    Seeding from the content (not the batch position) makes random choices identical whether an
    image is processed alone or inside a batch: the batch-of-two = two-batches-of-one invariant.
    """
    gens = []
    for img in pixel_values:
        digest = hashlib.sha256(img.detach().float().cpu().numpy().tobytes()).digest()
        g = torch.Generator()
        g.manual_seed((int.from_bytes(digest[:8], "little") ^ (seed * 0x9E3779B97F4A7C15)) % (2**63))
        gens.append(g)
    return gens


LazyTensor = Callable[..., torch.Tensor]


@dataclass
class VisionLayerContext:
    """Handed to ``prune_vision`` after ViT layer ``layer``.

    hidden_states: [B, 1+N, Dv] output of the layer (CLS at 0 when the encoder has one).
    patch_index:   [B, N] original raster index of each current patch token.
    state:         dict that lives for one forward pass, shared by every stage (e.g. FlowCut's cumulative score).
    cls_attention(): [B, N] head-mean CLS->patch softmax attention of this layer (softmax over all keys).
    qkv():         (q, k, v) each [B, H, 1+N, Dh] of this layer's attention.
    patch_mask:    [B, N] True for real patches, or None when every sample has all N (a vision pruner
                   returned -1 padding earlier: padded patches are masked out as keys in later ViT
                   layers and get 0 from cls_attention(); qkv() includes them, so mask them yourself).
    """

    layer: int
    hidden_states: torch.Tensor
    patch_index: torch.Tensor
    info: ModelInfo
    state: dict[str, Any]
    cls_attention: LazyTensor
    qkv: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    generators: list[torch.Generator]
    patch_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class TextPatchSimilarity:
    """What ``PreLLMContext.text_patch_similarity`` returns when it found a CLIP text tower.

    folder:     the text tower folder used.
    similarity: [B, N] cosine between each patch feature (vision post-norm, CLIP visual projection)
                and its sample's question text (text tower embedding), or None when the question text
                was unavailable (no tokenizer given to the adapter).
    """

    folder: str
    similarity: torch.Tensor | None


@dataclass
class PreLLMContext:
    """Handed to ``prune_pre_llm``.

    features:     [B, N, Dv] selected vision features (CLS dropped), before the projector.
    patch_index:  [B, N] original raster index of each feature (arange unless the vision stage pruned).
    cls_attention(layer): [B, N] head-mean CLS->patch attention of ViT layer ``layer`` (negative ok).
    vision_hidden(layer): [B, 1+N, Dv] output of ViT layer ``layer``.
    vision_qkv(layer): (q, k, v) [B, H, 1+N, Dh] of ViT layer ``layer``.
    vision_attention(layer): [B, T, T] head-mean softmax attention of ViT layer ``layer`` between its
                  tokens at the features' granularity: T = 1 + N with the CLS token first on CLIP towers
                  (from ``vision_qkv``); on Qwen T = N merged units, each unit's query row the mean of
                  its 2x2 patches' rows and its key column the sum of theirs, 0 across Qwen2.5-VL's
                  windows (`mllm_adapters.engine.probes`). On Qwen ``vision_qkv`` and ``vision_hidden``
                  have one row per patch, the 4 patches of feature token j at rows 4j..4j+3.
    received_attention(layer): [B, N] the mean attention each feature token receives (column means of
                  ``vision_attention`` over all T queries, the feature tokens' columns): VisPruner's
                  "global attention" on encoders without CLS.
    project(x):   the model's projector, [B, M, Dv] -> [B, M, Dt].
    input_ids / attention_mask: [B, L] the prompt as given (image placeholder run not yet shrunk).
    image_start:  [B] index of the first image placeholder token; the run is N long.
    text_embeddings(): [B, L, Dt] the LLM's input embeddings of the prompt.
    question_texts(): list of the prompt text after the image per sample (needs a tokenizer), or None.
    state:        dict that lives for one forward pass, shared by every stage of the pruner.
    text_patch_similarity(folder, prepare=None): a CLIP text tower's similarity between ``features`` and
                  each sample's question (`TextPatchSimilarity`: the folder used and the [B, N] cosine,
                  None without question text), or None when there is no tower. ``folder`` is the
                  method's text-tower parameter: a folder (ValueError unless it holds the tower's
                  ``config.json`` and ``visual_projection.safetensors``) or None (auto: the
                  checkpoint's ``text_tower/`` if present); ``prepare`` maps each question text to the
                  text embedded (e.g. its first line). None on contexts without the service.
    """

    features: torch.Tensor
    patch_index: torch.Tensor
    info: ModelInfo
    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_start: torch.Tensor
    cls_attention: Callable[[int], torch.Tensor]
    vision_hidden: Callable[[int], torch.Tensor]
    vision_qkv: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    project: Callable[[torch.Tensor], torch.Tensor]
    text_embeddings: LazyTensor
    question_texts: Callable[[], list[str] | None]
    generators: list[torch.Generator]
    state: dict[str, Any] = field(default_factory=dict)
    #: the vision encoder's final norm (CLIP's post_layernorm) as a function of features, or None when
    #: it has none: what projects patch features into the CLIP joint space with the text tower
    vision_post_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: the CLIP text tower service (see the docstring); None when the engine offers none
    text_patch_similarity: Callable[..., TextPatchSimilarity | None] | None = None
    #: see the docstring; None (the default) computes it from ``vision_qkv`` over all 1 + N tokens
    vision_attention: Callable[[int], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.vision_attention is None:
            qkv = self.vision_qkv

            def from_qkv(layer: int) -> torch.Tensor:
                q, k, _ = qkv(layer)  # [B, H, T, Dh]
                return attention_rows(q, k, scale=q.shape[-1] ** -0.5).float()  # [B, T, T]

            self.vision_attention = from_qkv

    def received_attention(self, layer: int) -> torch.Tensor:
        """[B, N] mean attention each feature token receives in ViT layer ``layer`` (see the docstring)."""
        a = self.vision_attention(layer)  # [B, T, T]
        return a.mean(1)[:, a.shape[-1] - self.features.shape[1]:]


@dataclass
class LLMLayerContext:
    """Handed to ``prune_llm`` before decoder layer ``layer`` runs (layers < layer saw every token).

    hidden_states: [B, Lc, D] input of layer ``layer`` (current, possibly already pruned sequence).
    visual_pos:    [B, Nv] positions of the current visual tokens in that sequence (sorted; one span per
                   sample unless it holds several images: text lies between their runs, so gather at
                   these positions, or use `pruners.ops.attention_rows_at`, rather than slicing a span).
    visual_index:  [B, Nv] original raster index of each current visual token.
    key_mask:      [B, Lc] True for real (non-padding) tokens.
    instruction_pos: [B, Ni] positions (in the current sequence) of the text tokens after the (last) image;
                   padded with -1 where samples have fewer.
    attention_rows(layer, queries="last"): [B, Nv] head-mean softmax attention of an already-run
                   decoder layer (declared in ``llm_attention_layers()``) from the last real token
                   (``"last"``) or the mean over the instruction tokens after the image
                   (``"instruction"``) to the current visual tokens (softmax over all allowed keys).
    layer_rows(queries="last"): the same for layer ``layer`` itself, computed from its input with its
                   own norm, q/k projections and RoPE (TransPrune's instruction-guided attention).
    layer_qkv(layer, queries="last"): (q [B, Hq, Nq, hd] of the chosen query rows, k and v
                   [B, Hkv, Lc, hd] of every current token) of an already-run decoder layer declared in
                   ``llm_attention_layers()``, q and k with the layer's RoPE (Hq = Hkv x groups under
                   GQA): for scores other than softmax rows over all keys (FlowCut's).
    captures:      {layer: {"attn_in", "attn_out", "mlp_in", "mlp_out", "layer_in"}, each [B, L, D]}:
                   sub-layer inputs/outputs (and the layer's own input) of the layers in
                   ``llm_capture_layers()``, over that layer's sequence.
    state:         dict that lives for one forward pass, shared by every stage of the pruner.
    token_scores:  [B, Nv] scores the pre-LLM stage attached to the current visual tokens, or None.
    """

    layer: int
    hidden_states: torch.Tensor
    visual_pos: torch.Tensor
    visual_index: torch.Tensor
    key_mask: torch.Tensor
    instruction_pos: torch.Tensor
    info: ModelInfo
    state: dict[str, Any]
    attention_rows: Callable[..., torch.Tensor]
    generators: list[torch.Generator]
    layer_rows: Callable[..., torch.Tensor] | None = None
    layer_qkv: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    #: the LLM's final norm (before the LM head) as a function of hidden states [B, L, D], or None:
    #: DART compares hidden states through it, as its authors do
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    captures: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    token_scores: torch.Tensor | None = None
    #: [B] visual tokens each sample keeps from this layer on (the engine's per-sample counts: the sum
    #: over its images of the pruner's `Pruner.llm_keep_count` for an image of that size), or None
    keep_counts: torch.Tensor | None = None
    #: [B, Nv] set by `keep_top`: the slots it returned beyond a sample's count (the engine masks them)
    fillers: torch.Tensor | None = None

    def keep_top(self, scores: torch.Tensor, count: int) -> torch.Tensor:
        """[B, k] indices of each sample's highest ``scores`` [B, Nv] among its real visual tokens, best
        first: ``keep_counts[b]`` of them where the engine gives per-sample counts (k = the largest;
        a sample's entries beyond its own count are filler slots, recorded in ``fillers``, which the
        engine turns into inert slots masked from every later layer), else ``count`` for every sample."""
        n = scores.shape[1]
        if self.keep_counts is None:
            return scores.topk(min(count, n), dim=1).indices
        counts = self.keep_counts.to(scores.device)
        k = min(int(counts.max()), n) if counts.numel() else 0
        real = self.key_mask.gather(1, self.visual_pos)  # [B, Nv]
        s = scores if bool(real.all()) else scores.masked_fill(~real, float("-inf"))
        idx = s.topk(k, dim=1).indices  # [B, k] best first
        fill = torch.arange(k, device=scores.device)[None, :] >= counts[:, None]  # [B, k]
        self.fillers = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(1, idx, fill)
        return idx
