"""CLIP text towers as an engine service (`PreLLMContext.text_patch_similarity`).

A text tower folder holds a ``CLIPTextModelWithProjection`` with its tokenizer and the matching
visual projection (``visual_projection.safetensors``, key ``weight``, [proj_dim, Dv]). The engine
keeps one `TextTowers` cache per attached model, so each folder loads once however many pruner
copies (tile views) or threads ask for it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from pruners.base import TextPatchSimilarity

#: the sub-folder of a checkpoint probed for a text tower when the method names none
AUTO_SUBFOLDER = "text_tower"


class ClipTextSimilarity:
    """A CLIP text tower (CLIPTextModelWithProjection + its tokenizer) and the matching visual
    projection ([proj_dim, Dv] in ``visual_projection.safetensors``, key ``weight``) from one folder."""

    def __init__(self, folder: str) -> None:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        self.folder = folder
        self.model = CLIPTextModelWithProjection.from_pretrained(folder, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        proj_path = os.path.join(folder, "visual_projection.safetensors")
        if not os.path.exists(proj_path):
            raise ValueError(f"text_tower folder {folder!r} has no visual_projection.safetensors (the CLIP visual projection)")
        self.visual_projection = load_file(proj_path)["weight"].float()  # [P, Dv]
        self._device_lock = threading.Lock()

    def text_embeds(self, texts: list[str], device: torch.device | None = None) -> torch.Tensor:
        """[B, P] normalised text embeddings (EOT token through the text projection), on ``device``
        (the tower moves there on first use)."""
        tok = self.tokenizer
        max_len = self.model.config.max_position_embeddings
        eos = tok.eos_token_id
        rows = []
        for t in texts:
            ids = tok(t, add_special_tokens=True)["input_ids"][: max_len - 1]
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            rows.append(ids)
        L = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        if device is not None and self.model.device != torch.device(device):
            with self._device_lock:
                if self.model.device != torch.device(device):
                    self.model.to(device)
        input_ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows], device=self.model.device)
        mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows], device=self.model.device)
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=mask).text_embeds  # [B, P]
        return F.normalize(out.float(), dim=-1)

    def similarity(self, features: torch.Tensor, post_layernorm: Any, texts: list[str]) -> torch.Tensor:
        """[B, N] cosine between each patch feature (post-LN, visual projection) and its question."""
        with torch.no_grad():
            x = post_layernorm(features) if post_layernorm is not None else features  # [B, N, Dv]
            img = F.normalize(x.float() @ self.visual_projection.T.to(x.device), dim=-1)  # [B, N, P]
        txt = self.text_embeds(texts, img.device)  # [B, P]
        return (img * txt[:, None]).sum(-1)


def text_tower_folder(folder_param: str | None, checkpoint_dir: str | None) -> str | None:
    """The text tower folder to use: ``folder_param`` (a ValueError unless it holds ``config.json``),
    else ``<checkpoint_dir>/text_tower`` when it holds one, else None (no tower)."""
    if folder_param is not None:
        if not os.path.isfile(os.path.join(folder_param, "config.json")):
            raise ValueError(
                f"text_tower={folder_param!r} is not a folder with a CLIPTextModelWithProjection (config.json)"
            )
        return folder_param
    cand = os.path.join(checkpoint_dir, AUTO_SUBFOLDER) if checkpoint_dir else ""
    return cand if cand and os.path.isfile(os.path.join(cand, "config.json")) else None


class TextTowers:
    """The loaded text towers of one engine, by folder (loaded once, thread-safe)."""

    def __init__(self) -> None:
        self._towers: dict[str, ClipTextSimilarity] = {}
        self._lock = threading.Lock()

    def get(self, folder: str) -> ClipTextSimilarity:
        with self._lock:
            tower = self._towers.get(folder)
            if tower is None:
                tower = self._towers[folder] = ClipTextSimilarity(folder)
            return tower

    def similarity(
        self,
        folder_param: str | None,
        checkpoint_dir: str | None,
        features: torch.Tensor,
        post_norm: Callable[[torch.Tensor], torch.Tensor] | None,
        texts: Callable[[], list[str] | None],
        prepare: Callable[[str], str] | None = None,
    ) -> TextPatchSimilarity | None:
        """None when there is no tower (see `text_tower_folder`); else the folder and the [B, N]
        cosine of ``features`` to ``texts()`` (each mapped by ``prepare``), or a None similarity when
        ``texts()`` is None (no tokenizer). ``texts`` is only called once a tower is found."""
        folder = text_tower_folder(folder_param, checkpoint_dir)
        if folder is None:
            return None
        questions = texts()
        if questions is None:
            return TextPatchSimilarity(folder=folder, similarity=None)
        if prepare is not None:
            questions = [prepare(t) for t in questions]
        sim = self.get(folder).similarity(features, post_norm, questions)
        return TextPatchSimilarity(folder=folder, similarity=sim)
