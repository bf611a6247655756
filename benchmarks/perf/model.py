"""Model-level performance: pruner overhead and realised prefill speed-up on a LLaVA-shaped model.

Models (``--model``):
- ``llava-1.5`` (default): a ``LlavaForConditionalGeneration`` built from config with LLaVA-1.5-7B's
  real sizes (CLIP-L/14-336 vision tower: hidden 1024, 16 heads, 576 patches; Llama LLM: hidden 4096,
  32 heads, MLP 11008, vocab 32064) but only a few layers and random weights, SDPA attention
  everywhere, fp32 on CPU.
- ``llava-next``: the same towers as a ``LlavaNextForConditionalGeneration`` with LLaVA-NeXT-7B's anyres
  pinpoints (336 px tiles; a 672 x 672 image is 5 tiles and 2,928 visual tokens).
- any ``conf/model`` name (e.g. ``tiny-next``, ``tiny``): that model as the runner loads it.
The prompt is 35 text tokens, the image's placeholder run, then 20 text tokens (LLaVA-1.5's system
prompt + question length), batch 1, random pixels. Anyres models: the image is ``image_size`` px
(default: the largest pinpoint, i.e. the longest run any image can have) and its run is that image's
own count (`benchmarks.models.LoadedModel.image_tokens`); budgets are validated as the runner does
(`benchmarks.run.validate_budgets`) and default to 1/3, 2/9 and 1/9 of the image's tokens (192, 128
and 64 of LLaVA-1.5's 576).

Measured, per method and budget (runs are interleaved across configurations so load from other
processes on a shared machine hits all of them alike; medians over ``repeats``):
- ``overhead_ms``: wall time inside the pruning code during one prefill: every pruner call
  (scoring, e.g. the q/k projections + ``attention_rows`` for FastV, and selection) plus the
  adapter's in-LLM bookkeeping at the hooked layers (gathers of hidden states, positions, RoPE).
- ``overhead_fraction`` = overhead CPU time / the unpruned prefill CPU time of the same model (goal <= 1%);
  wall-clock and process CPU time are both recorded (CPU time is robust to other processes on the cores).
  Because the shaped models have only a few layers, the fraction is also projected to the full
  32-layer LLM + 24-layer ViT by scaling the unpruned time with the analytic FLOPs
  (``projected_fraction_7b``; not given for ``conf/model`` models).
- ``speedup`` = unpruned prefill time / pruned prefill time, against ``flops_bound`` = unpruned
  prefill FLOPs / pruned prefill FLOPs (``benchmarks.flops`` on the sample's own counts, the pruner's
  own FLOPs excluded; the unpruned figure is the unhooked model's: every ViT layer, on every tile);
  ``of_bound`` = speedup / flops_bound (goal >= 0.9).
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

N_BEFORE, N_AFTER = 35, 20  # text tokens before / after the image (BOS + system prompt, question)
SHAPED = ("llava-1.5", "llava-next")
#: Qwen-shaped models (real widths, few layers, random weights, the tiny offline processor with 14 px
#: patches): name -> (model class, the 7B's block indexes with full attention)
QWEN_SHAPED = {"qwen2.5-vl-7b-shape": "Qwen2_5_VLForConditionalGeneration",
               "qwen3-vl-8b-shape": "Qwen3VLForConditionalGeneration"}
#: LLaVA-NeXT-7B's anyres pinpoints (llava-hf/llava-v1.6-vicuna-7b-hf)
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
BUDGET_FRACTIONS = (1 / 3, 2 / 9, 1 / 9)  # of the image's visual tokens: 192, 128, 64 of 576
CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"


def shaped_config(text_layers: int, vision_layers: int, family: str = "llava-1.5", attn: str = "sdpa"):
    """LLaVA-1.5-7B's shapes (``family="llava-next"``: as LLaVA-NeXT-7B, anyres) with ``text_layers``
    decoder layers and ``vision_layers`` ViT layers."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    if family not in SHAPED:
        raise ValueError(f"shaped model family must be one of {SHAPED}, got {family!r}")
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=text_layers, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    common = dict(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg = LlavaConfig(**common) if family == "llava-1.5" else LlavaNextConfig(**common, image_grid_pinpoints=NEXT_PINPOINTS)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    return cfg


def build_model(text_layers: int, vision_layers: int, seed: int = 0, family: str = "llava-1.5"):
    """A shaped model (`shaped_config`) with random weights, in eval mode."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    cls = LlavaForConditionalGeneration if family == "llava-1.5" else LlavaNextForConditionalGeneration
    return cls(shaped_config(text_layers, vision_layers, family)).eval()


def qwen_shaped(text_layers: int, vision_layers: int, seed: int = 0, attn: str = "sdpa") -> tuple[Any, Any]:
    """Qwen2.5-VL-7B's shapes (ViT width 1280, 16 heads, SwiGLU 3420, 112 px windows, PatchMerger to 3584;
    Qwen2 decoder 3584 wide, 28 q / 4 kv heads, MLP 18944, M-RoPE 16/24/24) with ``vision_layers`` blocks
    (every 8th with full attention, as the 7B's 7/15/23/31) and ``text_layers`` decoder layers, random
    weights; and an offline processor (14 px patches, up to 1,280 units) with the tiny word tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from mllm_adapters import tiny

    tokenizer = tiny.make_qwen_tokenizer(tiny.TINY_WORDS)
    processor = tiny.make_qwen_processor(tokenizer, "qwen2_5_vl", 14, 56 * 56, 28 * 28 * 1280)
    vision = dict(depth=vision_layers, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, window_size=112, spatial_merge_size=2, temporal_patch_size=2,
                  fullatt_block_indexes=[i for i in range(vision_layers) if i % 8 == 7] or [vision_layers - 1])
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=text_layers,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                pad_token_id=0, bos_token_id=2, eos_token_id=3)
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tiny._qwen_token_ids(len(tokenizer)))
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval(), processor


def qwen3_shaped(text_layers: int, vision_layers: int, seed: int = 0, attn: str = "sdpa") -> tuple[Any, Any]:
    """Qwen3-VL-8B's shapes (ViT width 1152, 16 heads, GELU MLP 4304, 16 px patches, a 48 x 48 learned position
    table, PatchMerger to 4096; DeepStack from up to three blocks spread over the tower as the 8B's 8/16/24 of
    27, added after decoder layers 0, 1, 2 (as many as there are layers); Qwen3 decoder 4096 wide, 32 q / 8 kv
    heads of 128, MLP 12288, interleaved M-RoPE 24/20/20) with ``vision_layers`` blocks and ``text_layers``
    decoder layers, random weights; and an offline processor (16 px patches, up to 1,280 units) with the tiny
    word tokenizer."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from mllm_adapters import tiny
    from mllm_adapters.tiny_qwen3_vl import make_qwen3_vl_processor

    tokenizer = tiny.make_qwen_tokenizer(tiny.TINY_WORDS)
    processor = make_qwen3_vl_processor(tokenizer, 16, 64 * 64, 32 * 32 * 1280)
    levels = sorted({max(0, k * vision_layers // 3 - 1) for k in (1, 2, 3)})  # 27 blocks: 8, 17, 26
    vision = dict(depth=vision_layers, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  hidden_act="gelu_pytorch_tanh", deepstack_visual_indexes=levels)
    text = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=text_layers,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True},
                pad_token_id=0, bos_token_id=2, eos_token_id=3)
    cfg = Qwen3VLConfig(vision_config=vision, text_config=text, **tiny._qwen_token_ids(len(tokenizer)))
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(cfg).eval(), processor


def load_perf_model(name: str, text_layers: int, vision_layers: int) -> Any:
    """`benchmarks.models.LoadedModel` of a shaped model (`SHAPED`) or of ``conf/model/<name>.yaml``."""
    from omegaconf import OmegaConf

    from benchmarks.models import DEFAULT_TEMPLATE, LoadedModel, load_model

    if name in SHAPED:
        return LoadedModel(name=name, model=build_model(text_layers, vision_layers, family=name), processor=None,
                           prompt_template=DEFAULT_TEMPLATE)
    if name in QWEN_SHAPED:
        build = qwen3_shaped if QWEN_SHAPED[name] == "Qwen3VLForConditionalGeneration" else qwen_shaped
        model, processor = build(text_layers, vision_layers)
        return LoadedModel(name=name, model=model, processor=processor, prompt_template=DEFAULT_TEMPLATE)
    path = CONF_MODEL / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"--model {name!r}: accepted: {', '.join([*SHAPED, *QWEN_SHAPED])} or a conf/model name "
                         f"({', '.join(known)})")
    return load_model(OmegaConf.to_container(OmegaConf.load(path), resolve=True), "cpu")


#: image size (h, w) px for models whose images have their own size (Qwen) when --image-size is not given
PROCESSOR_IMAGE_SIZE = (448, 448)


def default_image_size(lm: Any) -> tuple[int, int] | None:
    """Anyres: the pinpoint whose image packs the longest run (no unpadding); a family whose processor
    sizes each image (Qwen): `PROCESSOR_IMAGE_SIZE`; None otherwise."""
    if not lm.size_dependent:
        return None
    if not hasattr(lm.config, "image_grid_pinpoints"):
        return PROCESSOR_IMAGE_SIZE
    pins = [tuple(int(v) for v in p) for p in lm.config.image_grid_pinpoints]
    return max(pins, key=lambda hw: lm.image_tokens(hw))


def _processor_inputs(lm: Any, image_size: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    """Batch of one through the model's own processor: a random image of ``image_size`` px and a prompt
    of `N_BEFORE` + `N_AFTER` words around it (words the tokenizer knows)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    image = Image.fromarray(rng.randint(0, 255, (*image_size, 3), dtype=np.uint8))
    before, after = " ".join(["what"] * N_BEFORE), " ".join(["colour"] * N_AFTER)
    text = f"{before} {lm.spec.prompt_image} {after}"
    return dict(lm.processor(images=[image], text=[text], return_tensors="pt"))


def make_inputs(lm: Any, image_size: tuple[int, int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Batch of one: [BOS, 34 text, the image's placeholder run, 20 text] and random pixels
    (LLaVA-1.5: one image; anyres: the tiles of an image of ``image_size`` px, with ``image_sizes``)."""
    config = lm.config
    g = torch.Generator().manual_seed(seed)
    img = int(config.image_token_id)
    vocab = int(config.text_config.vocab_size)
    text = torch.randint(3, min(31999, vocab - 1), (N_BEFORE + N_AFTER,), generator=g)
    text = text + (text >= img).long()  # never the image placeholder
    text[0] = 1
    if lm.processor is not None and not lm.spec.vision_loop:  # the processor decides the image's tokens
        return _processor_inputs(lm, image_size or PROCESSOR_IMAGE_SIZE, seed)
    n_vis = lm.image_tokens(image_size) if lm.size_dependent else lm.num_visual_tokens
    ids = torch.cat([text[:N_BEFORE], torch.full((n_vis,), img), text[N_BEFORE:]])[None]
    px = int(config.vision_config.image_size)
    if not lm.size_dependent:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.randn(1, 3, px, px, generator=g)}
    tiles = lm.image_layout(image_size).n_tiles
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, tiles, 3, px, px, generator=g),  # [B, tiles, 3, S, S]
            "image_sizes": torch.tensor([list(image_size)])}


def untouched_flops(lm: Any, n_text: int, image_size: tuple[int, int] | None = None, config: Any = None) -> int:
    """Prefill FLOPs of the unhooked model on `make_inputs`' prompt: every ViT layer (anyres: on every
    tile, `benchmarks.flops.reference_counts`), the LLM on the text and the image's whole run.
    ``config``: count another depth of the same model (same image geometry), default ``lm.config``."""
    from benchmarks.flops import prefill_flops, reference_counts

    config = config if config is not None else lm.config
    from mllm_adapters.handle import TokenCounts

    if not lm.spec.vision_loop:  # the untouched model's own counts (every unit, the tower on the whole image)
        from mllm_adapters import apply_pruner

        with apply_pruner(lm.model, "none") as h, torch.inference_mode():
            lm.model(**make_inputs(lm, image_size), use_cache=False, logits_to_keep=1)
            (counts,) = h.token_counts
        return prefill_flops(config, n_text, reference_counts(config, counts)).total
    if not lm.size_dependent:
        return prefill_flops(config, n_text).total
    counts = TokenCounts(views=lm.image_layout(image_size).n_tiles, visual_in=lm.image_tokens(image_size))
    return prefill_flops(config, n_text, reference_counts(config, counts)).total


def perf_budgets(lm: Any, n_vis: int, budgets: list[int] | tuple[int, ...] | None) -> list[int]:
    """``budgets`` (default `BUDGET_FRACTIONS` of the image's ``n_vis`` tokens), validated as the runner does."""
    from benchmarks.run import validate_budgets

    if budgets is None:
        budgets = sorted({max(1, round(n_vis * f)) for f in BUDGET_FRACTIONS}, reverse=True)
    checked = validate_budgets(list(budgets), lm.num_visual_tokens, lm.name, size_dependent=lm.size_dependent)
    return sorted((b for b in checked if isinstance(b, int)), reverse=True)


class OverheadTimer:
    """Times the pruning code of an attached adapter: pruner calls + in-LLM bookkeeping per prefill.

    ``ms`` is wall time, ``cpu_ms`` this process's CPU time (robust to other processes sharing the
    cores; with one torch thread the two agree on an idle machine).
    """

    def __init__(self, adapter: Any, cuda: bool = False) -> None:
        self.adapter = adapter
        self.cuda = cuda  # synchronise around each timed call: GPU work is asynchronous
        self.ms = 0.0
        self.cpu_ms = 0.0
        self._depth = 0
        for name in ("_call_pruner", "_prefill_layer"):  # instance attributes shadow the methods
            setattr(adapter, name, self._wrap(getattr(adapter, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            if self._depth:  # nested (a pruner call inside a hooked layer): counted by the outer one
                return fn(*args, **kwargs)
            self._depth += 1
            if self.cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                self.ms += (time.perf_counter() - t0) * 1e3
                self.cpu_ms += (time.process_time() - c0) * 1e3
                self._depth -= 1

        return timed


def _prefill_ms(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one prefill (forward with cache, logits of the last position). On a
    CUDA model the first is the GPU time between two CUDA events (the host CPU time stays the second)."""
    cuda = next(model.parameters()).device.type == "cuda"
    with torch.inference_mode():
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            c0 = time.process_time()
            start.record()
            model(**inputs, use_cache=True, logits_to_keep=1)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end), (time.process_time() - c0) * 1e3
        t0, c0 = time.perf_counter(), time.process_time()
        model(**inputs, use_cache=True, logits_to_keep=1)
        return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def model_perf(
    text_layers: int = 2,
    vision_layers: int = 2,
    methods: list[str] | tuple[str, ...] = ("fastv", "random"),
    budgets: list[int] | tuple[int, ...] | None = None,
    repeats: int = 3,
    verbose: bool = True,
    model: str = "llava-1.5",
    image_size: tuple[int, int] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Overhead fraction and realised speed-up vs FLOPs bound; prints a table, returns the figures.

    ``model``: a shaped model (`SHAPED`, ``text_layers`` / ``vision_layers`` deep) or a ``conf/model``
    name; ``image_size``: (height, width) px of the image for anyres models (default `default_image_size`);
    ``device``: ``cpu`` or ``cuda`` (prefills timed with CUDA events, the pruning code synchronised).
    """
    from benchmarks.flops import sample_cost
    from benchmarks.perf.table import print_table
    from mllm_adapters import apply_pruner

    t0 = time.perf_counter()
    lm = load_perf_model(model, text_layers, vision_layers)
    cfg = lm.config
    if lm.size_dependent:
        image_size = tuple(int(v) for v in image_size) if image_size else default_image_size(lm)
    elif image_size:
        raise ValueError(f"--image-size is for models whose image tokens depend on the image's size (LLaVA-NeXT, "
                         f"Qwen); {model!r} takes one fixed grid")
    inputs = make_inputs(lm, image_size)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        lm.model.to(device)
        inputs = {k: v.to(device) for k, v in inputs.items()}
    n_vis = int((inputs["input_ids"] == int(cfg.image_token_id)).sum())  # the image's placeholders
    n_text = int(inputs["input_ids"].shape[1]) - n_vis
    budgets = perf_budgets(lm, n_vis, budgets)
    build_s = time.perf_counter() - t0
    n_layers = int(cfg.text_config.num_hidden_layers)
    params = {"fastv": {"layer": min(2, n_layers - 1)}}  # FastV's K=2 when the model has >2 layers
    from pruners import get_pruner_class

    for m in methods:  # a method's declared stand-in parameters (e.g. gsearch's depth-scaled schedule)
        declared = get_pruner_class(m).conformance_params
        if declared and "*" not in declared:
            params.setdefault(m, dict(declared))

    refused: dict[str, str] = {}
    for m in methods:  # methods that cannot run on this model (weights for another model, ...) say why
        try:
            apply_pruner(lm.model, m, budget=budgets[0], **params.get(m, {})).remove()
        except (ValueError, NotImplementedError, TypeError) as err:
            refused[m] = str(err).splitlines()[0]
    methods = [m for m in methods if m not in refused]
    configs: list[tuple[str, int | None]] = [("none", None)] + [(m, b) for m in methods for b in budgets]
    wall: dict[tuple, list[float]] = {c: [] for c in configs}
    cpu: dict[tuple, list[float]] = {c: [] for c in configs}
    ov_wall: dict[tuple, list[float]] = {c: [] for c in configs}
    ov_cpu: dict[tuple, list[float]] = {c: [] for c in configs}
    counts: dict[tuple, Any] = {}
    _prefill_ms(lm.model, inputs)  # warm-up (allocator, lazy init)
    for _ in range(repeats):
        for c in configs:
            method, budget = c
            if method == "none":  # the unhooked model is the baseline
                w, u = _prefill_ms(lm.model, inputs)
            else:
                handle = apply_pruner(lm.model, method, budget=budget, **params.get(method, {}))
                try:
                    timer = OverheadTimer(handle.adapter, cuda=cuda)
                    w, u = _prefill_ms(lm.model, inputs)
                    ov_wall[c].append(timer.ms)
                    ov_cpu[c].append(timer.cpu_ms)
                    counts[c] = copy.deepcopy(handle.token_counts[0])
                finally:
                    handle.remove()
            wall[c].append(w)
            cpu[c].append(u)

    med = statistics.median
    flops_base = untouched_flops(lm, n_text, image_size)
    to_7b = None
    if model in SHAPED:  # the 7B's depth, for projecting the overhead fraction
        to_7b = untouched_flops(lm, n_text, image_size, shaped_config(32, 24, model)) / flops_base
    base_w, base_c = med(wall[("none", None)]), med(cpu[("none", None)])
    rows = []
    for c in configs[1:]:
        method, budget = c
        sample = sample_cost(cfg, n_text, counts[c], n_vis)
        bound = flops_base / sample.flops.total
        sw, sc = base_w / med(wall[c]), base_c / med(cpu[c])
        rows.append({
            "method": method, "params": params.get(method) or None, "budget": budget, "prefill_ms": med(wall[c]), "prefill_cpu_ms": med(cpu[c]),
            "overhead_ms": med(ov_wall[c]), "overhead_cpu_ms": med(ov_cpu[c]),
            "overhead_fraction": med(ov_cpu[c]) / base_c,
            "projected_fraction_7b": None if to_7b is None else med(ov_cpu[c]) / (base_c * to_7b),
            "speedup_wall": sw, "speedup_cpu": sc, "flops_bound": bound,
            "of_bound_wall": sw / bound, "of_bound_cpu": sc / bound,
            "llm_visual_tokens": sample.counts.llm_visual,
        })
    if model == "llava-1.5":
        desc = (f"LLaVA-1.5-shaped, {text_layers} LLM layers (4096 hidden), {vision_layers} ViT layers "
                f"(CLIP-L/14-336), random weights, fp32, SDPA")
    elif model == "llava-next":
        desc = (f"LLaVA-NeXT-shaped, {text_layers} LLM layers (4096 hidden), {vision_layers} ViT layers "
                f"(CLIP-L/14-336 per tile), random weights, fp32, SDPA")
    elif model == "qwen3-vl-8b-shape":
        desc = (f"Qwen3-VL-8B-shaped, {text_layers} LLM layers (4096 hidden), {vision_layers} ViT blocks "
                f"(1152 wide, DeepStack levels {list(cfg.vision_config.deepstack_visual_indexes)}), random weights, "
                "fp32, SDPA")
    elif model in QWEN_SHAPED:
        desc = (f"Qwen2.5-VL-7B-shaped, {text_layers} LLM layers (3584 hidden), {vision_layers} ViT blocks "
                f"(1280 wide, 112 px windows), random weights, fp32, SDPA")
    else:
        depth = getattr(cfg.vision_config, "num_hidden_layers", None) or getattr(cfg.vision_config, "depth", "?")
        desc = f"conf/model {model} ({n_layers} LLM layers, {depth} ViT layers)"
    if lm.size_dependent:
        views = (f"{lm.image_layout(image_size).n_tiles} tiles" if lm.spec.vision_loop
                 else f"{n_vis} merged units")  # Qwen: the processor's grid
        desc += f", image {image_size[0]} x {image_size[1]} px ({views})"
    desc += f", {torch.cuda.get_device_name(device)}" if cuda else f", CPU threads={torch.get_num_threads()}"
    result = {
        "model": desc, "device": str(device), "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
        "prompt_tokens": n_text + n_vis, "visual_tokens": n_vis, "budgets": budgets, "repeats": repeats,
        "build_s": build_s, "unpruned_prefill_ms": base_w, "unpruned_prefill_cpu_ms": base_c,
        "flops_7b_over_this_model": to_7b, "rows": rows, "refused": refused,
        "prefill_ms_all": {f"{m}@{b}": wall[(m, b)] for m, b in configs},
        "prefill_cpu_ms_all": {f"{m}@{b}": cpu[(m, b)] for m, b in configs},
    }
    if verbose:
        print(f"## (c) model level: {result['model']}\n")
        print(f"unpruned prefill ({n_text + n_vis} tokens, {n_vis} visual): {base_w:.0f} ms wall, {base_c:.0f} ms "
              f"CPU (median of {repeats}; wall runs: {', '.join(f'{t:.0f}' for t in wall[('none', None)])})\n")
        print_table(rows, ["method", "budget", "prefill_ms", "prefill_cpu_ms", "overhead_cpu_ms",
                           "overhead_fraction", "projected_fraction_7b", "speedup_wall", "speedup_cpu",
                           "flops_bound", "of_bound_wall", "of_bound_cpu"])
        for m in methods:
            if params.get(m):
                print(f"- {m}: timed with {params[m]}")
        for m, why in refused.items():
            print(f"- {m}: not timed, it refuses this model: {why}")
        if refused or any(params.get(m) for m in methods):
            print()
        print("overhead_fraction = pruning-code CPU time / unpruned prefill CPU time on this model; "
              "projected_fraction_7b scales the unpruned time by FLOPs to 32 LLM + 24 ViT layers.\n"
              "speedup = unpruned / pruned prefill time; flops_bound = unpruned / pruned prefill FLOPs; "
              "of_bound = speedup / flops_bound (goal >= 0.9).\n")
    return result

