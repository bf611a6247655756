"""The authors' released code, for the reference tests (tests/test_reference_*.py).

Their packages cannot be imported as released (visionzip 0.1.3's wheel installs nothing and its source
imports ``llava``, which is not on PyPI; ``flowcut`` imports it too; both patch transformers-4.x CLIP
with ``self._shape``, which transformers 5 lacks). So a test fetches the pinned release archive from
PyPI by version, checks its sha256 against the pin below, unpacks it under ``.cache/authors/`` (not
part of the repository: nothing of theirs is copied into it) and imports single modules of it as a
package without running its ``__init__`` (`authors_module`), with ``llava`` stubbed. A test then calls
only the authors' tensor functions on our module instances.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
import tarfile
import types
import urllib.request
from pathlib import Path

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "authors"
#: name -> (version, sha256 of the sdist on PyPI)
PINNED = {
    "visionzip": ("0.1.3", "1a289a849d1b589ee1c64b218eb56c067998ad3be60a991434d1b2b1ed13f36c"),
    "flowcut": ("1.0.2", "a73f3966ea1dcc0ebfc979858ae660799ef03aa744e60a1b8291de7378d366f2"),
}


def _sdist_url(name: str, version: str) -> str:
    """The sdist's URL from PyPI's simple index (what pip reads)."""
    with urllib.request.urlopen(f"https://pypi.org/simple/{name}/", timeout=60) as r:
        page = r.read().decode()
    want = f"{name}-{version}.tar.gz"
    for href in re.findall(r'href="([^"]+)"', page):
        if href.split("#")[0].endswith("/" + want):
            return href.split("#")[0]
    raise RuntimeError(f"{name}=={version}: no {want} on PyPI's simple index")


def authors_source(name: str) -> Path:
    """The unpacked package folder of the pinned release of ``name`` (downloaded once, sha256 checked)."""
    version, sha = PINNED[name]
    root = CACHE / f"{name}-{version}"
    pkg = root / name
    if pkg.is_dir():
        return pkg
    CACHE.mkdir(parents=True, exist_ok=True)
    archive = CACHE / f"{name}-{version}.tar.gz"
    if not archive.is_file() or hashlib.sha256(archive.read_bytes()).hexdigest() != sha:
        with urllib.request.urlopen(_sdist_url(name, version), timeout=120) as r:
            data = r.read()
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise RuntimeError(f"{name}=={version}: sha256 {got} is not the pinned {sha}")
        archive.write_bytes(data)
    with tarfile.open(archive) as t:
        t.extractall(CACHE, filter="data")
    if not pkg.is_dir():
        raise RuntimeError(f"{archive} has no {name}/ package folder")
    return pkg


def authors_module(name: str, module: str) -> types.ModuleType:
    """``<name>.<module>`` of the pinned release, imported without the package's ``__init__`` (which
    imports ``llava``); ``llava`` is stubbed for modules that import it at the top, and transformers 4.x's
    ``CLIPVisionTransformer`` (imported, not used, by the functions the tests call) is given its 5.x
    counterpart."""
    pkg_dir = authors_source(name)
    key = f"_authors_{name}"
    if key not in sys.modules:
        pkg = types.ModuleType(key)
        pkg.__path__ = [str(pkg_dir)]
        sys.modules[key] = pkg
    from transformers.models.clip import modeling_clip

    if not hasattr(modeling_clip, "CLIPVisionTransformer"):  # 4.x's inner vision model, merged into
        modeling_clip.CLIPVisionTransformer = modeling_clip.CLIPVisionModel  # CLIPVisionModel in 5.x
    if "llava" not in sys.modules:
        stub = types.ModuleType("llava")
        stub.__path__ = []
        sys.modules["llava"] = stub
    return importlib.import_module(f"{key}.{module}")


def clip_shape_shim(attn) -> None:
    """Give a transformers-5 ``CLIPAttention`` instance transformers 4.x's ``_shape`` helper, which the
    authors' patched attention calls: [B, T, H*Dh] -> [B, H, T, Dh]."""

    def _shape(tensor, seq_len, bsz):
        return tensor.view(bsz, seq_len, attn.num_heads, attn.head_dim).transpose(1, 2).contiguous()

    attn._shape = _shape
