"""Load a model and its processor from a ``conf/model/*.yaml`` config.

Sources:
- ``embedded``: the small LLaVA shipped in ``benchmarks/assets/embedded/`` (weights, processor and a
  ``prunebench.json`` holding its ``prompt_template``); runs offline on CPU in minutes.
- ``hub``: a Hugging Face hub id or a local checkpoint folder loaded with
  ``LlavaForConditionalGeneration`` (or ``model_class``) and ``AutoProcessor``.
- ``tiny``: a randomly initialised tiny LLaVA built from config (tests, smoke runs);
  ``model_class: LlavaNextForConditionalGeneration`` builds a tiny LLaVA-NeXT instead (anyres tiles).

Everything family-dependent is asked of the model's family spec (`family_spec`): for LLaVA-NeXT
(anyres) an image's visual-token count depends on its size (`LoadedModel.image_tokens`),
`LoadedModel.num_visual_tokens` is the longest run any image can have, and answer-relevant recall maps
kept positions back to image regions (`LoadedModel.recall_cover`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# content fingerprints live in the lowest layer, which pruners read too (gsearch's found_on, dyvte's
# routers); re-exported here for the runner and the tests
from pruners.fingerprint import (  # noqa: F401
    _DIGEST_MEMO,
    IGNORED_NAMES,
    IGNORED_SUFFIXES,
    digest_cache_path,
    file_digest,
    weights_fingerprint,
)

EMBEDDED_DIR = Path(__file__).resolve().parent / "assets" / "embedded"
SOURCES = ("embedded", "hub", "tiny")
DEFAULT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def family_spec(config: Any) -> Any:
    """The `FamilySpec` class of a model config (`mllm_adapters.registry.family_of_config`): what every
    family-dependent question (visual-token counts, layouts, recall cover, FLOPs geometry) is asked of."""
    from mllm_adapters.registry import family_of_config

    return family_of_config(config)


def size_dependent(config: Any) -> bool:
    """True when an image's visual-token count depends on its size (LLaVA-NeXT's anyres tiles)."""
    return bool(family_spec(config).size_dependent)


def visual_tokens_of(config: Any) -> int:
    """Visual tokens per image reaching the LLM unpruned; for size-dependent families the longest run
    any image can have (LLaVA-NeXT-7B: 2,928), what budgets are validated against; an image's own
    count is `LoadedModel.image_tokens`."""
    return int(family_spec(config).max_visual_tokens(config))


#: conf/model keys of a ``source: tiny`` model passed to its family's ``build_tiny`` / ``tiny_config``.
TINY_KEYS = ("image_size", "patch_size", "vision_layers", "text_layers", "grid_pinpoints", "min_pixels", "max_pixels")


def _tiny_family(cfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The family (`mllm_adapters.registry`) of a tiny model config and the builder's keyword arguments."""
    from mllm_adapters.registry import family_of_class

    model_class = cfg.get("model_class") or "LlavaForConditionalGeneration"
    try:
        family = family_of_class(model_class)
    except TypeError:
        from mllm_adapters.registry import supported_model_classes

        raise ValueError(f"model {cfg.get('name', '?')!r}: model.model_class={model_class!r} has no tiny builder; "
                         f"accepted for source=tiny: {', '.join(supported_model_classes())}") from None
    return family, {k: cfg[k] for k in TINY_KEYS if cfg.get(k) is not None}


def peek_config(model_cfg: Any) -> Any:
    """The transformers config of the model ``model_cfg`` describes, without loading any weights
    (config.json only; the tiny models' configs are built): what settings are checked against before
    the model loads."""
    cfg = dict(model_cfg)
    name = str(cfg.get("name", "?"))
    source = cfg.get("source")
    if source == "tiny":
        family, kwargs = _tiny_family(cfg)
        return family.tiny_config(**kwargs)
    from transformers import AutoConfig

    if source == "embedded":
        path, local_only = str(cfg.get("path") or EMBEDDED_DIR), True
    else:
        path, local_only = str(cfg.get("path")), bool(cfg.get("local_files_only", False))
    check_checkpoint(path, local_only, name)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"model {name!r}: cannot read the config of {path!r}: {e}") from e


@dataclass
class LoadedModel:
    """A model ready for evaluation, with what the runner needs to prompt it."""

    name: str
    model: Any
    processor: Any
    prompt_template: str
    #: Fingerprint of the weights (see `weights_fingerprint`); part of every result cell's hash, so
    #: retrained or swapped weights under the same model name never reuse stale cells.
    weights: str | None = None

    _cover_cache: dict[tuple[int, int] | None, tuple[tuple[int, int], Any]] = field(default_factory=dict, repr=False)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def spec(self) -> Any:
        """The model's `FamilySpec` class (`family_spec`)."""
        return family_spec(self.model.config)

    @property
    def size_dependent(self) -> bool:
        """True when an image's visual-token count depends on its size (LLaVA-NeXT)."""
        return bool(self.spec.size_dependent)

    @property
    def grid_hw(self) -> tuple[int, int]:
        """The patch grid of one ViT input (LLaVA-1.5: the image; LLaVA-NeXT: one tile)."""
        return tuple(self.spec.view_grid(self.config))

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image reaching the LLM unpruned; see `visual_tokens_of`."""
        return visual_tokens_of(self.model.config)

    def image_layout(self, image_size: tuple[int, int] | None) -> Any:
        """The `mllm_adapters.engine.ImageLayout` (views, packed run) of an image of ``image_size`` =
        (height, width) px."""
        return self.spec.layout_for(self.config, image_size)

    def image_tokens(self, image_size: tuple[int, int] | None) -> int:
        """Visual tokens of an image of ``image_size`` = (height, width) px reaching the LLM unpruned."""
        if not self.size_dependent:
            return self.num_visual_tokens
        return self.image_layout(image_size).n_packed

    def recall_cover(self, image_size: tuple[int, int] | None,
                     grid: tuple[int, int] | None = None) -> tuple[tuple[int, int], Any]:
        """(grid over the whole image to ask the task's relevant patches on, token cover of its cells or
        None); see `benchmarks.metrics.relevant_recall` and `FamilySpec.recall_cover`, cached per size.
        ``grid``: the image's own token grid where the family has one (`image_grids`)."""
        if grid is not None:
            return tuple(grid), None  # cell i = token i over the image's own grid
        key = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        if key not in self._cover_cache:
            if key is None and self.size_dependent:
                raise ValueError(f"model {self.name!r}: an image's tokens depend on its size; recall needs each "
                                 "image's size")
            self._cover_cache[key] = self.spec.recall_cover(self.config, key)
        return self._cover_cache[key]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self, question: str, n_images: int = 1) -> str:
        """The prompt for ``question``: ``prompt_template`` with its ``<image>`` written the way the family
        writes one image (`FamilySpec.prompt_image`), ``n_images`` times one per line, or, for
        ``prompt_template: chat``, the processor's own chat template on one user turn holding the images and
        the question."""
        if n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {n_images}")
        if self.prompt_template == CHAT:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        images = "\n".join([self.spec.prompt_image] * n_images)
        return self.prompt_template.format(question=question).replace("<image>", images)

    @property
    def image_processor_settings(self) -> dict[str, Any]:
        """What the image processor resizes images to (Qwen: ``min_pixels``/``max_pixels``, which set each
        image's token count; LLaVA: ``size``/``crop_size``; LLaVA-NeXT: the pinpoints), as recorded in
        every cell's metrics."""
        ip = getattr(self.processor, "image_processor", None)
        keys = ("min_pixels", "max_pixels", "size", "crop_size", "image_grid_pinpoints", "patch_size", "merge_size")
        out: dict[str, Any] = {}
        for k in keys:
            v = getattr(ip, k, None)
            if dataclasses.is_dataclass(v) and not isinstance(v, type):  # transformers' SizeDict
                v = {key: val for key, val in dataclasses.asdict(v).items() if val is not None}
            elif hasattr(v, "items"):
                v = {key: val for key, val in dict(v).items() if val is not None}
            elif isinstance(v, (list, tuple)):
                v = [list(x) if isinstance(x, (list, tuple)) else x for x in v]
            if v is not None:
                out[k] = json.loads(json.dumps(v, default=str))
        return out

    def image_grids(self, enc: dict[str, Any], n_images: int | None = None) -> list[tuple[int, int] | None]:
        """Per image of a processed batch (``n_images`` of them; default one per sample), its token grid when
        the family's images have one of their own (Qwen: each image's merged-unit grid), else None per image
        (`FamilySpec.image_grids`)."""
        n = len(enc["input_ids"]) if n_images is None else int(n_images)
        grids = self.spec.image_grids(self.config, enc)
        return list(grids) if grids is not None else [None] * n


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """``auto`` -> float16 on CUDA, float32 elsewhere; else one of DTYPES."""
    if dtype in (None, "auto"):
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not supported; accepted: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


#: ``prompt_template: chat``: the processor's chat template (one user turn: the image, then the question)
CHAT = "chat"


def _check_template(template: str, where: str) -> str:
    if template == CHAT:
        return template
    if "{question}" not in template or "<image>" not in template:
        raise ValueError(
            f"prompt_template from {where} must contain '<image>' and '{{question}}', got {template!r}"
        )
    return template


def check_checkpoint(path: str, local_only: bool, name: str) -> None:
    """Fail fast, once, with what to do, when ``path`` can be neither a folder nor a reachable hub model.

    A local folder must exist. Anything that cannot be a hub id (``/abs``, ``./rel``, ``a/b/c``) is a
    folder that is not there. A hub id is fine when cached; otherwise one metadata request (5 s
    timeout) tells a missing network from a missing repository, instead of transformers' retries
    (about 50 s offline) and a hint to allow downloads that were already allowed.
    """
    import huggingface_hub as hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise FileNotFoundError(f"model {name!r}: model.path={path!r} is a file, not a checkpoint folder")
        return
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise FileNotFoundError(f"model {name!r}: folder not found: {path}") from None
    if isinstance(hub.try_to_load_from_cache(path, "config.json"), str):
        return  # cached: transformers loads it without the network
    not_folder = f"no folder {path!r} here"
    if local_only:
        raise FileNotFoundError(
            f"model {name!r}: {path!r} is not in the local Hugging Face cache ({not_folder}) and "
            "model.local_files_only=true forbids downloading: set model.path=<checkpoint folder>, or "
            "model.local_files_only=false on a machine with network")
    try:
        hub.get_hf_file_metadata(hub.hf_hub_url(path, "config.json"), timeout=5)
    except (hub.errors.RepositoryNotFoundError, hub.errors.EntryNotFoundError, hub.errors.GatedRepoError) as e:
        raise FileNotFoundError(
            f"model {name!r}: {path!r} is not a downloadable hub model ({type(e).__name__}; {not_folder}): "
            "check the id, or set model.path=<checkpoint folder>") from None
    except Exception as e:  # no network, DNS, proxy, timeout: all the same to the user
        raise ConnectionError(
            f"model {name!r}: cannot reach the Hugging Face hub to download {path!r} "
            f"({type(e).__name__}: {e}; {not_folder}): download it on a machine with network and set "
            "model.path=<checkpoint folder>") from None


def _load_pretrained(path: str, model_class: str, dtype: torch.dtype, attn: str | None, local_only: bool, name: str):
    import transformers
    from transformers import AutoProcessor

    cls = getattr(transformers, model_class, None)
    if cls is None:
        raise ValueError(f"model.model_class={model_class!r} is not a transformers class")
    check_checkpoint(path, local_only, name)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": local_only}
    if attn:
        kwargs["attn_implementation"] = attn
    try:
        model = cls.from_pretrained(path, **kwargs)
        processor = AutoProcessor.from_pretrained(path, local_files_only=local_only)
    except OSError as e:
        raise FileNotFoundError(f"model {name!r}: cannot load checkpoint {path!r}: {e}") from e
    return model.eval(), processor


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

def check_model_fields(cfg: dict[str, Any]) -> None:
    """``model.source`` and ``model.dtype`` are supported, and a hub model has a ``model.path``:
    checked by `load_model` and, before anything loads, by the runner's settings check."""
    name = str(cfg.get("name", "?"))
    source = cfg.get("source")
    if source not in SOURCES:
        raise ValueError(f"model.source={source!r} for model {name!r} is not supported; accepted: {', '.join(SOURCES)}")
    resolve_dtype(cfg.get("dtype", "auto"), "cpu")
    if source == "hub" and not cfg.get("path"):
        raise ValueError(f"model {name!r}: model.path (hub id or local folder) is required for source=hub")


def load_model(model_cfg: Any, device: str = "cpu") -> LoadedModel:
    """Build the model described by ``model_cfg`` (a conf/model mapping) on ``device``, in eval mode."""
    cfg = dict(model_cfg)
    check_model_fields(cfg)
    name = str(cfg.get("name", "?"))
    source = cfg.get("source")
    dtype = resolve_dtype(cfg.get("dtype", "auto"), device)
    attn = cfg.get("attn_implementation")
    template = cfg.get("prompt_template")
    if source == "tiny":
        family, kwargs = _tiny_family(cfg)
        model, processor = family.build_tiny(seed=int(cfg.get("seed", 0)), attn_implementation=attn or "eager",
                                             **kwargs)
        model = model.to(dtype)
        where = "conf/model"
        template = template or DEFAULT_TEMPLATE
        weights = None  # built from the config and its seed, both hashed already
    elif source == "embedded":
        folder = Path(cfg.get("path") or EMBEDDED_DIR)
        meta_path = folder / "prunebench.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"model {name!r}: the embedded model is missing ({meta_path} not found). It ships with the "
                "repository in benchmarks/assets/embedded/; `make train-embedded` rebuilds it."
            )
        meta = json.loads(meta_path.read_text())
        model, processor = _load_pretrained(
            str(folder), cfg.get("model_class") or "LlavaForConditionalGeneration", dtype, attn, True, name
        )
        where = str(meta_path)
        template = template or meta.get("prompt_template") or DEFAULT_TEMPLATE
        weights = weights_fingerprint(folder)
    else:
        path = cfg.get("path")
        model, processor = _load_pretrained(
            str(path),
            cfg.get("model_class") or "LlavaForConditionalGeneration",
            dtype,
            attn,
            bool(cfg.get("local_files_only", False)),
            name,
        )
        where = "conf/model"
        template = template or DEFAULT_TEMPLATE
        # A local folder is fingerprinted; a hub id is pinned by the commit transformers resolved.
        weights = (weights_fingerprint(path) if Path(str(path)).is_dir()
                   else getattr(model.config, "_commit_hash", None))
    model = model.to(device).eval()
    return LoadedModel(name=name, model=model, processor=processor, prompt_template=_check_template(template, where),
                       weights=weights)
