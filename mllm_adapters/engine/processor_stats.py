"""The image processor's normalisation statistics of a checkpoint (`ModelInfo.pixel_mean` / ``pixel_std``).

A model's ``pixel_values`` are ``(x - mean) / std`` per channel with x in [0, 1]; methods that look
at the pixels themselves (VFlowOpt's patch entropy) undo it with these numbers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

PREPROCESSOR_CONFIG = "preprocessor_config.json"


def _channels(value: Any, key: str, path: str, positive: bool) -> tuple[float, ...]:
    ok = (
        isinstance(value, (list, tuple)) and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )
    if ok and positive:
        ok = all(v > 0 for v in value)
    if not ok:
        need = "3 finite floats > 0" if positive else "3 finite floats"
        raise ValueError(f"{path}: {key} must be a list of {need} (R, G, B), got {value!r}")
    return tuple(float(v) for v in value)


def pixel_stats(
    checkpoint_dir: str | None, default_mean: Sequence[float], default_std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the checkpoint's image processor normalises with.

    Read from ``<checkpoint_dir>/preprocessor_config.json`` (keys ``image_mean`` / ``image_std``) when
    ``checkpoint_dir`` is a local folder holding that file; otherwise (hub id, unknown folder, or a
    key missing from the file) the family processor's defaults. A value that is not 3 finite floats
    (std > 0), or a file that is not a JSON object, is a ValueError naming the file.
    """
    mean, std = tuple(float(v) for v in default_mean), tuple(float(v) for v in default_std)
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        return mean, std
    path = os.path.join(checkpoint_dir, PREPROCESSOR_CONFIG)
    if not os.path.isfile(path):
        return mean, std
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the image processor config ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object (the image processor config), got {type(cfg).__name__}")
    if "image_mean" in cfg:
        mean = _channels(cfg["image_mean"], "image_mean", path, positive=False)
    if "image_std" in cfg:
        std = _channels(cfg["image_std"], "image_std", path, positive=True)
    return mean, std
