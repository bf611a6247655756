"""`dyvte` (dynamic visual-token exit, "Accelerating Multimodal Large Language Models via Dynamic
Visual-Token Exit and the Empirical Findings"; authors' code DoubtedSteam/DyVTE): a learned per-sample
exit. At each candidate decoder layer K a small hyper-network (the router) reads the text tokens'
state and decides, per sample, whether every visual token leaves the sequence now; an exited sample
sees no visual token from layer K on (its KV cache of those layers holds none). Doc: docs/methods/dyvte.md.

The router (authors: ``Router`` in ``llava/model/language_model/modeling_llama.py``, one per layer):
``Linear(2D, H, bias=False) -> GELU -> Linear(H, 2, bias=False)`` on ``[mean of the text tokens after
the image except the last, the last token]`` of the layer's input hidden states (the residual
stream after layer K-1), logits ``(keep, exit)``; exit when ``softmax(...)[exit] > threshold`` (0.5:
the authors' ``logits[0] < logits[1]``). The decision is made once, at prefill; decoding follows it.

Weights: ``weights`` is a folder holding ``router.safetensors`` + ``router.json`` (prunebench's format,
written by ``python -m benchmarks.embedded.train_dyvte``; the embedded model's ship in
``benchmarks/assets/dyvte/embedded``), or a checkpoint in the authors' format (safetensors with
``model.visual_gates_router.{i}.w1/w2.weight``; they publish none). ``router.json`` records the model
the router was trained on; weights for another model are refused. A relative path is resolved against
the current directory, then the repository root.

Budget: ``None`` = the router decides (`chooses_budget`). An int budget ``b < N`` is an upper bound:
every sample that has not exited earlier exits at ``K_b = vte_layer(N, L, b)`` (the layer `vte` exits at
for that budget), so the cost is at most `vte`'s at ``b``. ``b >= N`` keeps everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pruners.base import LLMLayerContext, ModelInfo, Pruner
from pruners.fingerprint import file_digest
from pruners.params import Param
from pruners.registry import register_pruner
from pruners.vte import vte_layer

#: the repository root (relative ``weights`` paths are tried against the current directory first)
REPO_ROOT = Path(__file__).resolve().parent.parent
ROUTER_FILE = "router.safetensors"
ROUTER_JSON = "router.json"
FORMAT = "prunebench-dyvte-router"
FORMAT_VERSION = 1
#: the shipped routers of the embedded model (relative to the repository root)
SHIPPED_EMBEDDED = "benchmarks/assets/dyvte/embedded"
TRAIN_COMMAND = "python -m benchmarks.embedded.train_dyvte"
#: the authors' checkpoint keys: ``model.visual_gates_router.<i>.w1.weight`` (i: exit *after* layer i)
AUTHORS_KEY = re.compile(r"^(?:.*\.)?visual_gates_router\.(\d+)\.(w1|w2)\.weight$")
AUTHORS_THRESHOLD = 0.5  # their rule: exit when logits[0] < logits[1]


# ---- the router -----------------------------------------------------------------------------------
def text_state(hidden: torch.Tensor, instruction_pos: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 2D] fp32 router input: the mean hidden state of the text tokens after the image except the
    last one, then the last token's (the authors' ``cat([text_mean, text_dec])``).

    hidden [B, L, D]; instruction_pos [B, Ni] positions of the real tokens after the image (ascending,
    -1 padded). A sample whose only text token after the image is the last uses it as the mean too; one
    with none after the image uses its last real token (``key_mask`` [B, L]) for both."""
    B, L, D = hidden.shape
    h = hidden.float()
    pos = instruction_pos
    valid = pos >= 0  # [B, Ni]
    n = valid.sum(1)  # [B]
    if key_mask is not None:
        last_real = (torch.arange(L, device=hidden.device)[None, :] * key_mask.long()).argmax(1)
    else:
        last_real = torch.full((B,), L - 1, dtype=torch.long, device=hidden.device)
    if pos.shape[1] == 0:
        last_pos = last_real
    else:
        last_pos = torch.where(n > 0, pos.gather(1, (n - 1).clamp(min=0)[:, None])[:, 0], last_real)  # [B]
    last = h[torch.arange(B, device=hidden.device), last_pos]  # [B, D]
    body = valid & (pos != last_pos[:, None])  # [B, Ni]
    if pos.shape[1] == 0:
        mean = last
    else:
        g = h.gather(1, pos.clamp(min=0)[..., None].expand(-1, -1, D))  # [B, Ni, D]
        w = body.float()
        cnt = w.sum(1, keepdim=True)
        mean = torch.where(cnt > 0, (g * w[..., None]).sum(1) / cnt.clamp(min=1), last)
    return torch.cat([mean, last], dim=-1)


class ExitRouter(torch.nn.Module):
    """One layer's hyper-network: ``Linear(2D, H) -> GELU -> Linear(H, 2)``, no biases (the authors'
    ``Router``; their unused dropout is left out). Logits (keep, exit)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = torch.nn.Linear(in_dim, hidden, bias=False)
        self.w2 = torch.nn.Linear(hidden, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class RouterBank(torch.nn.Module):
    """The routers of every candidate layer K (``routers.<K>``; K = the first layer without visual
    tokens after an exit there). ``state_dict`` keys: ``routers.<K>.w1.weight`` [H, 2D], ``.w2.weight`` [2, H]."""

    def __init__(self, layers: list[int], in_dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = sorted(int(k) for k in layers)
        self.in_dim, self.hidden = int(in_dim), int(hidden)
        self.routers = torch.nn.ModuleDict({str(k): ExitRouter(in_dim, hidden) for k in self.layers})

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """[B, 2] logits (keep, exit) of layer ``layer``'s router on ``x`` [B, 2D]."""
        return self.routers[str(layer)](x.float())


def exit_probability(bank: RouterBank, layer: int, features: torch.Tensor) -> torch.Tensor:
    """[B] softmax probability of "exit" at ``layer``."""
    return bank(layer, features).softmax(-1)[:, 1]


# ---- model identity and weights -------------------------------------------------------------------
def model_identity(info: ModelInfo, weight_files: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """What ``router.json`` records of the model a router was trained on: family, LLM depth and width,
    the sha256 of the checkpoint's ``config.json`` and of the ``weight_files`` (names in the checkpoint
    folder), each None when the checkpoint is not a local folder holding it."""
    folder = Path(info.checkpoint_dir) if info.checkpoint_dir else None
    local = folder is not None and folder.is_dir()
    cfg = folder / "config.json" if local else None
    return {
        "family": info.family,
        "llm_hidden_size": int(info.llm_hidden_size),
        "llm_num_layers": int(info.llm_num_layers),
        "config_sha256": file_digest(cfg) if cfg is not None and cfg.is_file() else None,
        "weights_sha256": {f: (file_digest(folder / f) if local and (folder / f).is_file() else None)
                           for f in weight_files},
    }


def resolve_weights(path: str) -> Path:
    """The ``weights`` folder: an absolute path as given; a relative one against the current directory,
    then the repository root. ValueError naming ``weights`` when no folder is found."""
    p = Path(os.path.expanduser(path))
    tried = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]
    for cand in tried:
        if cand.is_dir():
            return cand.resolve()
    raise ValueError(
        f"dyvte: parameter weights={path!r} is not a folder (tried {', '.join(str(t) for t in tried)}); "
        f"accepted: a folder holding {ROUTER_FILE} + {ROUTER_JSON} ({TRAIN_COMMAND} writes one; the embedded "
        f"model's ship in {SHIPPED_EMBEDDED}) or the authors' safetensors checkpoint with "
        f"visual_gates_router weights")


@dataclass
class LoadedRouter:
    """Router weights read from a ``weights`` folder (`load_router`)."""

    bank: RouterBank
    threshold: float
    meta: dict[str, Any]
    folder: Path
    fmt: str  # "prunebench" | "authors"
    #: the model identity recorded with the weights (prunebench format), else None
    model: dict[str, Any] | None = None
    sha256: dict[str, str] = field(default_factory=dict)


def bank_from_state_dict(sd: dict[str, torch.Tensor], layers: list[int] | None = None) -> RouterBank:
    """A `RouterBank` from prunebench's keys ``routers.<K>.w1.weight`` / ``.w2.weight`` (ValueError
    naming ``weights`` on missing, extra or mis-shaped tensors)."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = re.fullmatch(r"routers\.(\d+)\.(w1|w2)\.weight", key)
        if m is None:
            raise ValueError(f"dyvte: weights: unexpected tensor {key!r} in {ROUTER_FILE}")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = t
    if not found:
        raise ValueError(f"dyvte: weights: {ROUTER_FILE} holds no router")
    ks = sorted(found)
    if layers is not None and sorted(layers) != ks:
        raise ValueError(f"dyvte: weights: {ROUTER_JSON} lists layers {sorted(layers)} but {ROUTER_FILE} "
                         f"holds routers for {ks}")
    return _bank(found, "weights")


def _bank(found: dict[int, dict[str, torch.Tensor]], what: str) -> RouterBank:
    shapes = set()
    for k, ws in sorted(found.items()):
        if set(ws) != {"w1", "w2"}:
            raise ValueError(f"dyvte: {what}: router of layer {k} lacks {sorted({'w1', 'w2'} - set(ws))}")
        w1, w2 = ws["w1"], ws["w2"]
        if w1.dim() != 2 or w2.dim() != 2 or w2.shape != (2, w1.shape[0]) or w1.shape[1] % 2:
            raise ValueError(f"dyvte: {what}: router of layer {k} has shapes w1 {tuple(w1.shape)}, "
                             f"w2 {tuple(w2.shape)}; expected [H, 2D] and [2, H]")
        shapes.add(tuple(w1.shape))
    if len(shapes) != 1:
        raise ValueError(f"dyvte: {what}: routers of different sizes {sorted(shapes)}")
    hidden, in_dim = shapes.pop()
    bank = RouterBank(sorted(found), in_dim, hidden)
    with torch.no_grad():
        for k, ws in found.items():
            bank.routers[str(k)].w1.weight.copy_(ws["w1"].float())
            bank.routers[str(k)].w2.weight.copy_(ws["w2"].float())
    return bank.eval().requires_grad_(False)


def bank_from_authors(sd: dict[str, torch.Tensor], n_layers: int | None = None) -> RouterBank:
    """A `RouterBank` from the authors' keys ``[model.]visual_gates_router.<i>.w1.weight`` /
    ``.w2.weight``: their router ``i`` runs after decoder layer ``i``, so it becomes our layer
    ``K = i + 1``; the one after the last layer (``i = L - 1``), which removes nothing any layer sees,
    is dropped. Other keys (the rest of their checkpoint) are ignored."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = AUTHORS_KEY.match(key)
        if m is not None:
            found.setdefault(int(m.group(1)) + 1, {})[m.group(2)] = t
    if not found:
        raise ValueError("dyvte: weights: no visual_gates_router tensor in the authors' checkpoint")
    top = n_layers if n_layers is not None else max(found)
    found = {k: v for k, v in found.items() if 1 <= k < top}
    if not found:
        raise ValueError("dyvte: weights: the authors' checkpoint has no router before the last layer")
    return _bank(found, "weights (authors' format)")


def _authors_files(folder: Path) -> list[Path]:
    """Safetensors files of an authors'-format checkpoint folder that hold router tensors."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text()).get("weight_map", {})
        names = sorted({f for k, f in wm.items() if AUTHORS_KEY.match(k)})
        return [folder / n for n in names]
    out = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            if any(AUTHORS_KEY.match(k) for k in fh.keys()):
                out.append(f)
    return out


def load_router(folder: str | Path, n_layers: int | None = None) -> LoadedRouter:
    """Read router weights from ``folder``: prunebench's ``router.safetensors`` + ``router.json``, else
    the authors' checkpoint format (see the module docstring). ValueError naming ``weights``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / ROUTER_JSON, folder / ROUTER_FILE
    if cfg_path.is_file() or w_path.is_file():
        if not (cfg_path.is_file() and w_path.is_file()):
            missing = ROUTER_JSON if not cfg_path.is_file() else ROUTER_FILE
            raise ValueError(f"dyvte: weights={str(folder)!r} lacks {missing} (a router folder holds both "
                             f"{ROUTER_FILE} and {ROUTER_JSON}; {TRAIN_COMMAND} writes them)")
        try:
            meta = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise ValueError(f"dyvte: weights: {cfg_path} is not valid JSON: {e}") from e
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"dyvte: weights: {cfg_path} is not a {FORMAT} v{FORMAT_VERSION} file "
                             f"(format={meta.get('format')!r}, format_version={meta.get('format_version')!r})")
        arch = meta.get("router", {})
        bank = bank_from_state_dict(load_file(str(w_path)), arch.get("layers"))
        if (bank.in_dim, bank.hidden) != (arch.get("in_dim"), arch.get("hidden")):
            raise ValueError(f"dyvte: weights: {ROUTER_JSON} says in_dim={arch.get('in_dim')}, "
                             f"hidden={arch.get('hidden')} but {ROUTER_FILE} holds {bank.in_dim}, {bank.hidden}")
        thr = meta.get("threshold", AUTHORS_THRESHOLD)
        if not isinstance(thr, (int, float)) or not 0.0 < float(thr) < 1.0:
            raise ValueError(f"dyvte: weights: {ROUTER_JSON} threshold={thr!r}; accepted: 0 < threshold < 1")
        return LoadedRouter(bank, float(thr), meta, folder, "prunebench", meta.get("model"),
                            {ROUTER_FILE: file_digest(w_path)})
    files = _authors_files(folder) if folder.is_dir() else []
    if not files:
        raise ValueError(
            f"dyvte: weights={str(folder)!r} holds neither {ROUTER_FILE} + {ROUTER_JSON} nor an authors'-format "
            f"checkpoint (safetensors with visual_gates_router tensors); train routers with {TRAIN_COMMAND} "
            f"(embedded model) or use {SHIPPED_EMBEDDED}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if AUTHORS_KEY.match(k):
                    sd[k] = fh.get_tensor(k)
    bank = bank_from_authors(sd, n_layers)
    return LoadedRouter(bank, AUTHORS_THRESHOLD, {"format": "authors"}, folder, "authors", None,
                        {f.name: file_digest(f) for f in files})


def check_identity(router: LoadedRouter, info: ModelInfo) -> None:
    """ValueError naming ``weights`` unless the router was trained for this model: family, LLM depth and
    width, and the checkpoint's ``config.json`` / weight files' sha256 where ``router.json`` records them
    (authors' format: the router input must be twice the hidden size and every router before the last
    layer; they carry no further identity)."""
    where = f"dyvte: weights={str(router.folder)!r}"
    if router.bank.in_dim != 2 * info.llm_hidden_size:
        raise ValueError(f"{where} were trained for another model: router input {router.bank.in_dim} != 2 x this "
                         f"model's hidden size {info.llm_hidden_size}; train routers for this model "
                         f"({TRAIN_COMMAND} for the embedded model)")
    bad = [k for k in router.bank.layers if not 1 <= k < info.llm_num_layers]
    if bad:
        raise ValueError(f"{where} were trained for another model: router layers {bad} are outside this model's "
                         f"1..{info.llm_num_layers - 1}")
    if router.fmt == "authors":
        return
    rec = router.model or {}
    have = model_identity(info, tuple((rec.get("weights_sha256") or {}).keys()))
    for key in ("family", "llm_hidden_size", "llm_num_layers", "config_sha256"):
        want = rec.get(key)
        if want is not None and want != have[key]:
            raise ValueError(
                f"{where} were trained for another model: {key}={want!r} in {ROUTER_JSON}, this model has "
                f"{have[key]!r}; train routers for this model ({TRAIN_COMMAND} for the embedded model)")
    for name, want in (rec.get("weights_sha256") or {}).items():
        if want is not None and have["weights_sha256"].get(name) != want:
            raise ValueError(
                f"{where} were trained for another model: the checkpoint's {name} has sha256 "
                f"{have['weights_sha256'].get(name)!r}, {ROUTER_JSON} records {want!r}; retrain the routers "
                f"({TRAIN_COMMAND})")


def exit_layers(handle: Any) -> list[int | None]:
    """Per sample of the last forward: the first decoder layer that saw no visual token (the exit layer
    K), or None when its visual tokens stayed to the end (from ``handle.token_counts``)."""
    out: list[int | None] = []
    for c in handle.token_counts:
        seq = list(c.llm_visual or [])
        out.append(None if not seq or seq[0] == 0 else next((j for j, v in enumerate(seq) if v == 0), None))
    return out


# ---- the pruner ---------------------------------------------------------------------------------
@register_pruner("dyvte")
class DyVTE(Pruner):
    """Learned per-sample visual-token exit; see the module docstring."""

    stages = ("llm",)
    conformance_opt_outs = {"*": "needs router weights trained for the model (weights=...); the tiny models have none"}
    parameters = {
        "weights": Param(str, None, doc=f"router folder ({ROUTER_FILE} + {ROUTER_JSON}, or the authors' checkpoint); "
                                        f"null refuses (embedded model: {SHIPPED_EMBEDDED})"),
        "threshold": Param(float, None, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False,
                           doc="exit when the router's exit probability exceeds it; null: router.json's "
                               "(0.5, the authors' argmax rule)"),
    }

    def __init__(self, budget: int | None = None, seed: int = 0, **params: Any) -> None:
        super().__init__(budget=budget, seed=seed, **params)
        self._router: LoadedRouter | None = None
        self._forced: int | None = None

    def check_params(self) -> None:
        w = self.params["weights"]
        if w is not None:
            if not w.strip():
                raise ValueError("dyvte: parameter weights='' is empty; accepted: a router folder or null")
            resolve_weights(w)  # a ValueError naming weights, before any model loads

    def content_identity(self) -> dict[str, str]:
        """sha256 over the ``weights`` folder's files (names and contents), when one is given."""
        w = self.params["weights"]
        if w is None:
            return {}
        folder = resolve_weights(w)
        h = hashlib.sha256()
        for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() != ".md"):
            h.update(f"{f.relative_to(folder).as_posix()}:{file_digest(f)}\n".encode())
        return {"weights": h.hexdigest()}

    @property
    def chooses_budget(self) -> bool:
        return self.budget is None and self.budget_fraction is None

    def attach(self, info: ModelInfo) -> None:
        super().attach(info)
        if self.params["weights"] is None:
            raise ValueError(
                f"dyvte needs router weights trained for this model: parameter weights is null. For the embedded "
                f"model pass weights={SHIPPED_EMBEDDED} (shipped; conf/method/dyvte.yaml sets it, "
                f"`method=dyvte`) or retrain them with `{TRAIN_COMMAND}`; for another model train routers for it "
                f"(the authors publish no weights; their checkpoint format is also read)")
        router = load_router(resolve_weights(self.params["weights"]), info.llm_num_layers)
        check_identity(router, info)
        self._router = router
        n, n_layers = info.num_visual_tokens, info.llm_num_layers
        self._forced = None if self.keeps_all or self.budget is None else vte_layer(n, n_layers, self.budget)

    @property
    def router(self) -> LoadedRouter:
        assert self._router is not None, "attach() first"
        return self._router

    @property
    def threshold(self) -> float:
        t = self.params["threshold"]
        return self.router.threshold if t is None else float(t)

    @property
    def forced_exit_layer(self) -> int | None:
        """K_b of an int budget (every sample not exited before leaves there), else None."""
        return self._forced

    def llm_layers(self) -> list[int]:
        if self.keeps_all or self._router is None:
            return []
        layers = list(self._router.bank.layers)
        if self._forced is not None:
            layers = sorted({k for k in layers if k < self._forced} | {self._forced})
        return layers

    def llm_attention_layers(self) -> list[int]:
        return []  # the router reads hidden states only

    def llm_keep_count(self, layer: int) -> int:
        assert self.info is not None, "attach() first"
        if self._forced is not None and layer >= self._forced:
            return 0
        return self.info.num_visual_tokens

    def prune_llm(self, ctx: LLMLayerContext) -> torch.Tensor:
        B, nv = ctx.visual_pos.shape
        dev = ctx.visual_pos.device
        counts = ctx.keep_counts
        if counts is None:  # no per-sample counts from the engine: every current token
            counts = torch.full((B,), nv, dtype=torch.long, device=dev)
            if self._forced is not None and ctx.layer >= self._forced:
                counts = torch.zeros_like(counts)
        counts = counts.to(dev).clone()
        bank = self.router.bank
        if ctx.layer in bank.layers and (self._forced is None or ctx.layer < self._forced):
            feats = text_state(ctx.hidden_states, ctx.instruction_pos, ctx.key_mask)
            leave = exit_probability(bank, ctx.layer, feats) > self.threshold  # [B]
            counts = torch.where(leave.to(dev), torch.zeros_like(counts), counts)
        ctx.keep_counts = counts
        # nothing is ranked: a staying sample keeps all its tokens, an exiting one none (fillers)
        order = -torch.arange(nv, dtype=torch.float32, device=dev).expand(B, nv)
        return ctx.keep_top(order, nv)
